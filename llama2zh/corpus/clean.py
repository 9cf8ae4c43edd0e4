"""`llama2zh clean`: normalise, filter and deduplicate a corpus into .jsonl shards and a report.

Each document is normalised (Unicode NFC, spaces collapsed, lines trimmed, at most one blank
line), loses its boilerplate lines (URLs, 「本章未完」, 「请收藏」, ...; Rules.boilerplate), and is
dropped when what remains fails a rule: length, language (CJK against Latin letters), repeated
lines, repeated 5-character shingles. Then it is dropped as an exact duplicate (a 64-bit hash of
its text) or a near-duplicate of a document kept before it, across all inputs: MinHash LSH
(minhash.py) finds the kept documents sharing a band key with it, and their signatures, compared
with its own, confirm or clear each. Workers do the per-document work; the main process decides
duplicates in input order, so any worker count gives the same bytes.

Kept records (as they came, the text field replaced by the cleaned text) go to DIR/part-NNNNN.jsonl,
shard_docs at a time, each written atomically with its documents' dedup keys (part-NNNNN.keys.npy)
and MinHash signatures (part-NNNNN.sig) beside it, and then recorded in DIR/journal.jsonl with the
input position after it. A rerun reloads the keys and continues from that position, so an
interrupted run ends with the bytes of an uninterrupted one. Memory: one shard of output and its
signatures plus a few chunks in flight, and the dedup keys of the kept documents, each 12 bytes
(the key and its document's number), 1 + bands (17 at the default threshold) a document: about
200 bytes. The signatures (512 bytes a document) stay on disk and are read only for candidates.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import xxhash
from tqdm import tqdm

from llama2zh.corpus.journal import Journal, read_journal
from llama2zh.corpus.minhash import NUM_PERM, KeyMap, band_keys, lsh_rows, shingle_hashes, signature, similar
from llama2zh.corpus.parallel import chunked, ordered_map, worker_pool
from llama2zh.corpus.sources import Record, describe, read_records, source_files
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output, atomic_write_bytes
from llama2zh.vocab.corpus import CJK_RE, LATIN_RE

LANGS = ("zh", "en", "any")
CHUNK = 256  # documents per task sent to a worker
SAMPLES = 3  # examples kept in the report per reason
SAMPLE_CHARS = 200
BOILERPLATE = (
    r"https?://|www\.[\w-]+\.[a-z]{2,}",
    r"本章未完|请收藏|最新章节|加入书签|求收藏|求推荐|求月票|天才一秒记住|笔趣阁|更新最快|无弹窗|手机阅读|"
    r"免费阅读|全文阅读|点击下一页|请记住本书|首发域名|本书首发",
    r"(?i:\bclick here\b|\ball rights reserved\b|\bcookie policy\b|\bsubscribe to\b)",
)


@dataclass(frozen=True)
class Rules:
    lang: str = "any"  # zh, en or any
    min_chars: int = 50  # after cleaning
    max_chars: int = 100_000
    min_lang_share: float = 0.7  # of the letters (CJK + Latin), those of `lang`
    max_repeated_lines: float = 0.3  # share of the characters in lines that repeat an earlier line
    max_repeated_shingles: float = 0.5  # share of 5-character shingles that repeat an earlier one
    near_threshold: float = 0.8  # Jaccard similarity of shingle sets that makes a near-duplicate
    boilerplate: tuple[str, ...] = BOILERPLATE  # a line matching one of these is removed


@dataclass(frozen=True)
class Verdict:
    text: str  # cleaned
    reason: str | None  # the rule that drops it, or None
    removed_lines: list[str]
    keys: list[int] | None  # exact hash, then the LSH band keys; None when dropped
    signature: np.ndarray | None  # MinHash, uint32; None when dropped


SPACES = re.compile(r"[^\S\n]+")  # any whitespace but a newline, full-width spaces included
INVISIBLE = re.compile("[\u200b-\u200d\u2060\ufeff]")
BLANK_LINES = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    text = INVISIBLE.sub("", unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n"))
    return BLANK_LINES.sub("\n\n", "\n".join(SPACES.sub(" ", line).strip() for line in text.split("\n"))).strip()


@lru_cache(maxsize=4)
def _boilerplate(patterns: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def problem(text: str, hashes: np.ndarray, rules: Rules) -> str | None:
    """The first whole-document rule the cleaned text fails, or None."""
    if len(text) < rules.min_chars:
        return "too_short"
    if len(text) > rules.max_chars:
        return "too_long"
    if rules.lang != "any":
        cjk, latin = len(CJK_RE.findall(text)), len(LATIN_RE.findall(text))
        if (cjk if rules.lang == "zh" else latin) < rules.min_lang_share * max(1, cjk + latin):
            return "language"
    lines = [line for line in text.split("\n") if line]
    seen, repeated = set(), 0
    for line in lines:
        repeated += len(line) if line in seen else 0
        seen.add(line)
    if repeated > rules.max_repeated_lines * sum(map(len, lines)):
        return "repeated_lines"
    if len(hashes) - len(np.unique(hashes)) > rules.max_repeated_shingles * len(hashes):
        return "repeated_shingles"
    return None


def judge(texts: list[str], rules: Rules) -> list[Verdict]:
    """Cleans and checks a chunk of documents (in a worker): everything but the duplicate decisions."""
    boilerplate, rows = _boilerplate(rules.boilerplate), lsh_rows(rules.near_threshold)
    verdicts = []
    for text in texts:
        kept, removed = [], []
        for line in normalise(text).split("\n"):
            (removed if boilerplate.search(line) else kept).append(line)
        text = "\n".join(kept)
        text = normalise(text) if removed else text  # a removed line may leave blank lines to merge
        hashes = shingle_hashes(text)
        reason = problem(text, hashes, rules)
        minhash = None if reason else signature(np.unique(hashes))
        keys = None if reason else [xxhash.xxh3_64_intdigest(text.encode()), *band_keys(minhash, rows)]
        verdicts.append(Verdict(text, reason, removed, keys, minhash))
    return verdicts


def _judge_records(chunk: list[Record], rules: Rules) -> list[Verdict]:
    return judge([r.text for r in chunk], rules)


def _judged(records: Iterator[Record], rules: Rules, pool, workers: int) -> Iterator[tuple[Record, Verdict]]:
    """(record, verdict) in input order, a few chunks in flight: memory does not grow with the input."""
    for chunk, verdicts in ordered_map(partial(_judge_records, rules=rules), chunked(records, CHUNK), pool,
                                       2 * workers):
        yield from zip(chunk, verdicts, strict=True)


class Tally:
    """What the report counts; its state goes into each journal entry, so a resumed run continues it."""

    def __init__(self, state: dict | None = None):
        state = state or {"read": 0, "kept": 0, "dropped": {}, "boilerplate_lines": 0, "samples": {}}
        self.read, self.kept, self.dropped = state["read"], state["kept"], state["dropped"]
        self.boilerplate_lines, self.samples = state["boilerplate_lines"], state["samples"]

    def sample(self, reason: str, text: str) -> None:
        kept = self.samples.setdefault(reason, [])
        if len(kept) < SAMPLES:
            kept.append(text[:SAMPLE_CHARS])

    def drop(self, reason: str, text: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.sample(reason, text)

    def state(self) -> dict:
        return {"read": self.read, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "boilerplate_lines": self.boilerplate_lines, "samples": dict(sorted(self.samples.items()))}


def clean(sources: list[str | Path], out_dir: Path, text_field: str = "text", rules: Rules = Rules(),
          workers: int = 2, shard_docs: int = 10_000, force: bool = False) -> dict:
    """Cleans `sources` (files or folders) into out_dir; returns the report (also out_dir/report.json)."""
    if rules.lang not in LANGS:
        raise UserError(f"unknown --lang {rules.lang!r}; one of {', '.join(LANGS)}")
    if not 0 < rules.near_threshold <= 1 or shard_docs < 1 or workers < 1:
        raise UserError("--near-threshold must be in (0, 1], --shard-docs and --workers at least 1")
    for pattern in rules.boilerplate:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"boilerplate pattern {pattern!r}: {e}") from None
    files = source_files(sources)
    # format 2: shards have .sig files beside them; a folder made before them cannot be continued
    settings = {"format": 2, "sources": [describe(f) for f in files], "text_field": text_field,
                "rules": asdict(rules), "shard_docs": shard_docs}
    settings = json.loads(json.dumps(settings))  # as the journal gives it back: lists for tuples
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = _entries(out_dir, settings, force)
    with Journal(out_dir / "journal.jsonl") as journal:
        if not journal.records:
            journal.append([{"settings": settings}])
        if not (entries and entries[-1]["done"]):
            _run(files, out_dir, text_field, rules, workers, shard_docs, journal, entries)
        entries = journal.records[1:]
    report = {**entries[-1]["tally"], "shards": [e["shard"] for e in entries if e["shard"]], "settings": settings}
    with atomic_output(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def _entries(out_dir: Path, settings: dict, force: bool) -> list[dict]:
    """The journal's shard entries to continue from; other settings need --force, which starts over."""
    path = out_dir / "journal.jsonl"
    records = read_journal(path)
    if records and records[0]["settings"] != settings:
        if not force:
            raise UserError(f"{out_dir} holds a clean with other inputs or settings; use --force to redo it")
        for old in [path, out_dir / "report.json", *out_dir.glob("part-*.jsonl"), *out_dir.glob("part-*.keys.npy"),
                    *out_dir.glob("part-*.sig")]:
            old.unlink()
        return []
    return records[1:]


class Seen:
    """The kept documents: their dedup keys in memory, their signatures on disk but for the current shard's.

    Kept document n is row n % shard_docs of shard n // shard_docs: every shard but the last is full.
    """

    def __init__(self, out_dir: Path, shard_docs: int, threshold: float):
        self.out_dir, self.shard_docs, self.threshold = out_dir, shard_docs, threshold
        self.texts, self.bands = KeyMap(), KeyMap()
        self.shards = 0  # committed
        self.keys, self.signatures = [], []  # the current shard's

    def reload(self, name: str) -> None:
        """Takes back the keys of a committed shard (the next one in order)."""
        keys = np.load(self.out_dir / name.replace(".jsonl", ".keys.npy"))
        numbers = self.shards * self.shard_docs + np.arange(len(keys), dtype=np.uint32)
        self.texts.extend(keys[:, 0], numbers)
        self.bands.extend(keys[:, 1:].ravel(), np.repeat(numbers, keys.shape[1] - 1))
        self.shards += 1

    def duplicate(self, verdict: Verdict) -> str | None:
        if self.texts.find(verdict.keys[:1]):
            return "exact_duplicate"
        candidates = self.bands.find(verdict.keys[1:])
        if any(similar(verdict.signature, self._signature(n), self.threshold) for n in candidates):
            return "near_duplicate"
        return None

    def _signature(self, number: int) -> np.ndarray:
        shard, row = divmod(number, self.shard_docs)
        if shard == self.shards:
            return self.signatures[row]
        fd = os.open(self.out_dir / f"part-{shard:05d}.sig", os.O_RDONLY)
        try:
            return np.frombuffer(os.pread(fd, 4 * NUM_PERM, 4 * NUM_PERM * row), "<u4")
        finally:
            os.close(fd)

    def add(self, verdict: Verdict) -> None:
        number = self.shards * self.shard_docs + len(self.keys)
        self.texts.add(verdict.keys[:1], number)
        self.bands.add(verdict.keys[1:], number)
        self.keys.append(verdict.keys)
        self.signatures.append(verdict.signature)

    def commit(self, name: str) -> None:
        """Writes the current shard's keys and signatures beside its documents (out_dir/name)."""
        with atomic_output(self.out_dir / name.replace(".jsonl", ".keys.npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, np.array(self.keys, np.uint64))
        atomic_write_bytes(self.out_dir / name.replace(".jsonl", ".sig"), [np.array(self.signatures, "<u4").tobytes()])
        self.shards += 1
        self.keys.clear()
        self.signatures.clear()


def _run(files, out_dir, text_field, rules, workers, shard_docs, journal, entries) -> None:
    seen = Seen(out_dir, shard_docs, rules.near_threshold)
    for entry in entries:
        if entry["shard"]:
            seen.reload(entry["shard"])
    tally = Tally(entries[-1]["tally"] if entries else None)
    number = {file: i for i, file in enumerate(files)}
    start = tuple(entries[-1]["next"]) if entries else (0, 0)
    lines = []

    def commit(next_position: list[int], done: bool) -> None:
        name = f"part-{seen.shards:05d}.jsonl" if lines else None
        if name:
            atomic_write_bytes(out_dir / name, lines)
            seen.commit(name)
        journal.append([{"shard": name, "docs": len(lines), "next": next_position, "done": done,
                         "tally": tally.state()}])
        lines.clear()

    with (worker_pool(workers) if workers > 1 else nullcontext()) as pool, \
            tqdm(unit="doc", initial=tally.read, desc=f"clean -> {out_dir.name}", disable=None) as bar:
        records = read_records(files, text_field, start)
        for record, verdict in _judged(records, rules, pool, workers):
            tally.read += 1
            tally.boilerplate_lines += len(verdict.removed_lines)
            for line in verdict.removed_lines:
                tally.sample("boilerplate_line", line)
            reason = verdict.reason or seen.duplicate(verdict)
            if reason:
                tally.drop(reason, verdict.text)
            else:
                tally.kept += 1
                seen.add(verdict)
                lines.append(json.dumps({**record.data, record.field: verdict.text}, ensure_ascii=False).encode()
                             + b"\n")
                if len(lines) == shard_docs:
                    commit([number[record.file], record.index + 1], done=False)
            bar.update()
            bar.set_postfix(kept=f"{tally.kept:,}", refresh=False)
        commit([len(files), 0], done=True)
