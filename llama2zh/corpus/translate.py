"""`llama2zh translate`: TinyStories shards, English to Simplified Chinese, resumable at any moment.

SRC holds shards (JSON arrays or JSON lines of {"story": ...}); a story's id is "<shard stem>:<index>".
DEST receives, per input shard, `<stem>.json`: a JSON array of {"id", "story" (Chinese), "story_en"},
written atomically once every story of the shard is done. Its bookkeeping lives in DEST/translate/:
- `<stem>.journal.jsonl`: one fsync'd line per translated story; a story in it is done for good,
  so a rerun after a crash (kill -9 included) translates only the others, each exactly once;
- `rejects.jsonl`: stories that failed the quality checks, with the reason (`--retry-rejects`);
- `cache.<backend>.sqlite`: every chunk translation, by sha256 of its English, for all runs.
`--shard i/n` keeps the stories whose id hashes to part i of n (1 <= i <= n), so n machines can
share a corpus; their files are named `<stem>.<i>of<n>.json` and so on, and never collide.
Stories are translated by `workers` threads, chunk by chunk (see chunks.py), through client.py.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from llama2zh.corpus.cache import ChunkCache
from llama2zh.corpus.chunks import split_story
from llama2zh.corpus.client import CircuitBreaker, Client, Refused, Stopped, TransientError
from llama2zh.corpus.journal import Journal, read_journal
from llama2zh.corpus.quality import problem
from llama2zh.corpus.shards import read_records, shard_paths
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output


@dataclass(frozen=True)
class Options:
    backend: str = "google"
    endpoint: str | None = None
    workers: int = 16
    rate: float = 10.0  # requests per second, 0 for no limit
    timeout: float = 30.0  # seconds, per request
    limit: int | None = None  # only the first N stories (of this part), so reruns agree on the set
    part: tuple[int, int] = (1, 1)  # --shard i/n
    retry_rejects: bool = False


@dataclass
class Report:
    selected: int = 0  # stories this run is responsible for
    done_before: int = 0
    rejected_before: int = 0  # and not retried
    translated: int = 0
    rejected: int = 0
    failed: int = 0  # gave up after retries; a rerun tries them again
    cache_lookups: int = 0
    cache_hits: int = 0
    requests: int = 0
    unpacked: int = 0  # requests of several lines answered with a different number of lines
    retries: Counter = field(default_factory=Counter)
    pauses: int = 0
    seconds: float = 0.0
    written: list[Path] = field(default_factory=list)
    rejects_file: Path | None = None

    def lines(self) -> list[str]:
        rate = self.translated / self.seconds if self.seconds else 0.0
        hit_rate = self.cache_hits / self.cache_lookups if self.cache_lookups else 0.0
        retried = ", ".join(f"{reason}: {n}" for reason, n in self.retries.most_common())
        lines = [f"{self.selected} stories: {self.done_before} done before, {self.translated} translated now "
                 f"({rate:.1f} stories/s), {self.rejected} rejected, {self.failed} failed",
                 f"cache: {self.cache_hits}/{self.cache_lookups} chunks were hits ({hit_rate:.1%}); "
                 f"{self.requests} requests, {sum(self.retries.values())} failed and retried"
                 + (f" ({retried})" if retried else "") + (f"; paused {self.pauses}x" if self.pauses else "")
                 + (f"; {self.unpacked} answers lost lines, asked again line by line" if self.unpacked else "")]
        if self.rejected or self.rejected_before:
            lines.append(f"{self.rejected + self.rejected_before} rejects in {self.rejects_file} "
                         "(--retry-rejects translates them again)")
        lines += [f"wrote {path}" for path in self.written]
        return lines


def in_part(story_id: str, part: tuple[int, int]) -> bool:
    index, count = part
    return int.from_bytes(hashlib.sha256(story_id.encode()).digest()[:8], "big") % count == index - 1


@dataclass
class Shard:
    """One input shard's share of the work."""
    source: Path
    name: str  # of its output and journal: the stem, plus .<i>of<n> with --shard
    selected: list[int]  # story indices this run is responsible for, in order
    todo: list[int]


class _ShardRun:
    """A shard being translated: its English, its journal, and how many of its stories are still out."""

    def __init__(self, shard: Shard, journal: Path):
        self.shard = shard
        records = read_records(shard.source)
        self.ids = {i: _story_id(shard.source, i, records[i]) for i in shard.selected}
        self.english = {i: records[i]["story"] for i in shard.selected}
        self.journal = Journal(journal)
        self.outstanding = len(shard.todo)
        self.failed = 0


def _story_id(path: Path, index: int, record: dict) -> str:
    return str(record.get("id", f"{path.stem}:{index}"))  # the rule shards.documents reads ids by


def translate_corpus(src: Path, dest: Path, options: Options, progress: bool = True) -> Report:
    sources = shard_paths(src)
    if dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents:
        raise UserError(f"{dest}: DEST must be outside SRC (its shards would be read as input)")
    state = dest / "translate"
    state.mkdir(parents=True, exist_ok=True)
    i, n = options.part
    suffix = f".{i}of{n}" if n > 1 else ""
    return _Run(sources, dest, state, suffix, options, progress).run()


class _Run:
    def __init__(self, sources, dest, state, suffix, options, progress):
        self.sources, self.dest, self.state, self.suffix = sources, dest, state, suffix
        self.options, self.progress = options, progress
        self.report = Report(rejects_file=state / f"rejects{suffix}.jsonl")

    def run(self) -> Report:
        start = time.monotonic()
        with Journal(self.report.rejects_file) as rejects:
            self.rejects = rejects
            self.rejected = {r["id"]: r for r in rejects.records}  # the latest line of an id wins
            shards = self._plan()
            self._translate(shards)
        if self.options.retry_rejects:  # retried stories left lines behind: keep only the current ones
            with atomic_output(self.report.rejects_file) as tmp:
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rejected.values()),
                               encoding="utf-8")
        self.report.seconds = time.monotonic() - start
        return self.report

    def _plan(self) -> list[Shard]:
        shards, budget = [], self.options.limit
        for source in self.sources:
            if budget == 0:
                break
            records = read_records(source)
            ids = [_story_id(source, i, r) for i, r in enumerate(records)]
            selected = [i for i, story_id in enumerate(ids) if in_part(story_id, self.options.part)]
            if budget is not None:
                selected, budget = selected[:budget], budget - len(selected[:budget])
            name = source.stem + self.suffix
            done = {r["id"] for r in read_journal(self.state / f"{name}.journal.jsonl")}
            for story_id in done:
                self.rejected.pop(story_id, None)  # accepted by a --retry-rejects run that was cut short
            skip = done if self.options.retry_rejects else done | self.rejected.keys()
            todo = [i for i in selected if ids[i] not in skip]
            self.report.selected += len(selected)
            self.report.done_before += sum(ids[i] in done for i in selected)
            if not self.options.retry_rejects:
                self.report.rejected_before += sum(ids[i] in self.rejected for i in selected)
            shards.append(Shard(source, name, selected, todo))
        return shards

    def _translate(self, shards: list[Shard]) -> None:
        options = self.options
        total = sum(len(s.todo) for s in shards)
        bar = tqdm(total=total, unit="stories", disable=not self.progress or not total, mininterval=0.5,
                   dynamic_ncols=True)
        stop = threading.Event()
        client = Client(options.backend, options.endpoint, options.timeout, options.rate,
                        breaker=CircuitBreaker(log=bar.write), stop=stop)
        cache = ChunkCache(self.state / f"cache.{options.backend}.sqlite")
        jobs = self._jobs(shards)
        pending = {}
        pool = ThreadPoolExecutor(options.workers, thread_name_prefix="translate")
        try:
            while True:
                while len(pending) < 2 * options.workers and (job := next(jobs, None)):
                    run, index = job
                    fresh = run.ids[index] in self.rejected  # a retried reject: not from the cache
                    pending[pool.submit(self._story, client, cache, run.english[index], fresh)] = job
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                self._record({future: pending.pop(future) for future in finished})
                bar.set_postfix_str(f"cache hits {cache.hits / max(1, cache.lookups):.0%}, "
                                    f"retries {client.failed_attempts}, rejects {self.report.rejected}",
                                    refresh=False)
                bar.update(len(finished))
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            cache.close()
            self.report.cache_lookups, self.report.cache_hits = cache.lookups, cache.hits
            self.report.requests, self.report.retries = client.requests, +client.failures
            self.report.unpacked = client.unpacked
            self.report.pauses = client.breaker.trips

    def _jobs(self, shards: list[Shard]):
        """(shard run, story index) for every story to translate; a shard's file is read when it is reached."""
        for shard in shards:
            journal = self.state / f"{shard.name}.journal.jsonl"
            output = self.dest / f"{shard.name}.json"
            if not shard.todo and output.exists() and output.stat().st_mtime_ns >= _mtime_ns(journal):
                continue  # finished by an earlier run
            run = _ShardRun(shard, journal)
            if not shard.todo:
                self._finish(run)
            for index in shard.todo:
                yield run, index

    @staticmethod
    def _story(client: Client, cache: ChunkCache, english: str, fresh: bool) -> tuple[str, str | None]:
        """A worker's job: the story's translation, and why it fails the quality checks (None: it passes)."""
        pieces = split_story(english, client.backend.max_chunk)
        translations = iter(cache.translate([text.strip() for text, translate in pieces if translate],
                                            client.translate_many, fresh))
        chinese = "".join(next(translations) if translate else text for text, translate in pieces)
        return chinese, problem(english, chinese)

    def _record(self, finished: dict) -> None:
        """Journals a batch of finished stories (one fsync per file), then finishes the shards they complete."""
        accepted, rejected, refused = {}, [], None
        for future, (run, index) in finished.items():
            run.outstanding -= 1
            story_id = run.ids[index]
            try:
                chinese, reason = future.result()
            except (TransientError, Stopped):
                run.failed += 1
                self.report.failed += 1
                continue
            except Refused as e:
                refused = e
                continue
            if reason is None:
                accepted.setdefault(run, []).append({"id": story_id, "story": chinese})
                self.rejected.pop(story_id, None)
                self.report.translated += 1
            else:
                record = {"id": story_id, "reason": reason, "story": chinese, "story_en": run.english[index]}
                rejected.append(record)
                self.rejected[story_id] = record
                self.report.rejected += 1
        for run, records in accepted.items():
            run.journal.append(records)
        self.rejects.append(rejected)
        if refused:
            raise UserError(f"the translation service refused the request: {refused} (check --backend, --endpoint)")
        for run in {run for run, _ in finished.values()}:
            if run.outstanding == 0:
                self._finish(run)

    def _finish(self, run: _ShardRun) -> None:
        """Writes the shard's output, when every story of it is translated or rejected."""
        run.journal.close()
        if run.failed:
            return
        chinese = {r["id"]: r["story"] for r in run.journal.records}
        stories = [{"id": run.ids[i], "story": chinese[run.ids[i]], "story_en": run.english[i]}
                   for i in run.shard.selected if run.ids[i] in chinese]
        output = self.dest / f"{run.shard.name}.json"
        for stale in self.dest.glob(f"{output.name}.*.tmp"):  # left by a run killed while writing it
            stale.unlink()
        with atomic_output(output) as tmp:
            tmp.write_text(json.dumps(stories, ensure_ascii=False), encoding="utf-8")
        self.report.written.append(output)


def _mtime_ns(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0
