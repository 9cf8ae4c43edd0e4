"""`llama2zh download corpus NAME`: the corpora the seeds use, streamed from the hub into .jsonl shards.

Each entry names a dataset repo on the hub (HF_ENDPOINT mirrors honoured, read through
sources.py), the data files to read when the repo holds more than one set, and how a record
becomes a line of DEST/NAME/part-NNNNN.jsonl: {"text": ...} for a pretraining corpus (what clean,
vocab and pretokenize read with the default --text-field), a record in a form
conversations.py or preferences.py reads for an sft or dpo set (as it came where it already is).
A record whose text is empty is skipped and counted.

The download is resumable: a shard is written whole (atomically) and then recorded in
DEST/NAME/.journal with the position after its last record; a rerun (after Ctrl-C or a dropped
connection) reads the same commit of the repo from that position, so its shards are the bytes an
uninterrupted run writes. A shard ends at SHARD_RECORDS records or at the end of a source file
(a resumed run then starts at the next file instead of reading through this one). .complete is
written last.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llama2zh.corpus.conversations import SHAREGPT_ROLES
from llama2zh.corpus.download import COMPLETE
from llama2zh.corpus.journal import Journal, read_journal
from llama2zh.corpus.sources import describe, hub_files, read_records
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output, atomic_write_bytes

SHARD_RECORDS = 100_000
JOURNAL = ".journal"  # not .jsonl: the folder's .jsonl files are its data


@dataclass(frozen=True)
class Corpus:
    repo: str
    kind: str  # "pretrain", "sft" or "dpo"
    lang: str
    size: str  # approximate, as the hub lists it
    to_record: Callable[[dict], dict | None]  # the line written for a source record; None: skip it (no text)
    files: str | None = None  # the data files to read (a file, folder or glob in the repo); None: all
    license: str = ""


def text_of(*fields: str) -> Callable[[dict], dict | None]:
    """{"text": the record's fields joined by blank lines}; a field the record lacks is a KeyError
    (the registry does not fit the repo)."""
    return lambda record: _joined(record[f] for f in fields)


def baike(record: dict) -> dict | None:
    """An encyclopedia entry as one text: title, summary, then each section's title and content."""
    sections = [part for section in record["sections"] or [] for part in (section["title"], section["content"])]
    return _joined([record["title"], record["summary"], *sections])


def _joined(parts) -> dict | None:
    """{"text": the non-empty parts joined by blank lines}, None when there are none."""
    text = "\n\n".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
    return {"text": text} if text else None


def as_is(record: dict) -> dict:
    return record


def firefly(record: dict) -> dict:
    """firefly's {"kind", "input", "target"} as the Alpaca form conversations.py reads."""
    return {"instruction": record["input"], "input": "", "output": record["target"]}


def sharegpt_pair(record: dict) -> dict:
    """LLaMA-Factory's ShareGPT preference record ({"conversations": [{"from", "value"}], "chosen":
    {"from", "value"}, "rejected": {...}}, optional "system") as TRL's conversational pair."""
    prompt = [{"role": SHAREGPT_ROLES.get(turn["from"], turn["from"]), "content": turn["value"]}
              for turn in record["conversations"]]
    if record.get("system"):
        prompt.insert(0, {"role": "system", "content": record["system"]})
    return {"prompt": prompt, **{side: [{"role": "assistant", "content": record[side]["value"]}]
                                 for side in ("chosen", "rejected")}}


# Layouts and fields as the repos' file listings and dataset cards describe them (checked where a
# page was at hand; the rest is stated as assumed). A field the mapping names and a record lacks
# stops the download with a line naming the record's fields, so a wrong assumption shows at once.
CORPORA = {
    # one JSON array, records {"completion": article, "source": "wikipedia.zh2307"}; ~254k articles
    "wikipedia-cn": Corpus("pleisto/wikipedia-cn-20230720-filtered", "pretrain", "zh", "254k articles, 524 MB",
                           text_of("completion"), "wikipedia-cn-20230720-filtered.json", "CC-BY-SA-3.0"),
    # one JSON-lines file (563w_baidubaike.json, 16.8 GB on the hub's file list); records assumed
    # {"title", "summary", "sections": [{"title", "content"}]}
    "baidubaike": Corpus("xuqinyang/BaiduBaike-5.63M", "pretrain", "zh", "5.63M entries, 16.8 GB", baike,
                         "563w_baidubaike.json", "unstated (Baidu Baike's terms)"),
    # parquet shards in data/, records {"INSTRUCTION", "RESPONSE", "SOURCE", "METADATA"}: question and answer
    "zhihu-kol": Corpus("wangrui6/Zhihu-KOL", "pretrain", "zh", "1M answers, 1.5 GB",
                        text_of("INSTRUCTION", "RESPONSE"), "data", "MIT"),
    # parquet or JSON shards; records assumed {"dataType", "title", "content", "uniqueKey", ...}
    "tigerbot-pretrain-zh": Corpus("TigerResearch/pretrain_zh", "pretrain", "zh", "16.8M documents, 12 GB",
                                   text_of("title", "content"), None, "Apache-2.0"),
    # JSON-lines shards of novel text; records assumed {"text"}
    "webnovel-chinese": Corpus("wdndev/webnovel-chinese", "pretrain", "zh", "9k novels, 50 GB", text_of("text"),
                               None, "unstated (web novels)"),
    # minimind's pretraining set: one JSON-lines file of {"text"} (dialogue-like passages)
    "minimind-pretrain": Corpus("jingyaogong/minimind_dataset", "pretrain", "zh+en", "1.4M texts, 1.6 GB",
                                text_of("text"), "pretrain_hq.jsonl", "Apache-2.0"),
    # one JSON-lines file (train_2M_CN.json) of Alpaca records {"instruction", "input", "output"}
    "belle-2m": Corpus("BelleGroup/train_2M_CN", "sft", "zh", "2M conversations, 1.3 GB", as_is,
                       "train_2M_CN.json", "GPL-3.0 (research only)"),
    # one JSON-lines file of {"kind", "input", "target"}: 23 task kinds
    "firefly-1.1m": Corpus("YeungNLP/firefly-train-1.1M", "sft", "zh", "1.1M conversations, 1.2 GB", firefly,
                           "firefly-train-1.1M.jsonl", "unstated"),
    # minimind's SFT set: {"conversations": [{"role", "content"}]}, replies up to 512 characters
    "minimind-sft": Corpus("jingyaogong/minimind_dataset", "sft", "zh+en", "1.2M conversations, 1.2 GB", as_is,
                           "sft_mini_512.jsonl", "Apache-2.0"),
    # dpo_en.json and dpo_zh.json: JSON arrays of ShareGPT preference records, 10k pairs each
    "dpo-en-zh-20k": Corpus("hiyouga/DPO-En-Zh-20k", "dpo", "en+zh", "20k pairs, 70 MB", sharegpt_pair,
                            "dpo_*.json", "Apache-2.0"),
}


def format_registry() -> str:
    """The table `download corpus --list` prints."""
    rows = [("NAME", "KIND", "LANG", "SIZE", "REPO", "FILES", "LICENSE")]
    rows += [(name, c.kind, c.lang, c.size, c.repo, c.files or "(all)", c.license) for name, c in CORPORA.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def download_corpus(name: str, dest: Path, limit: int | None = None) -> Path:
    """dest/NAME/part-NNNNN.jsonl: the corpus's records (the first `limit` kept), resumed where a
    previous run stopped; skipped when one finished it with the same limit."""
    if name not in CORPORA:
        raise UserError(f"unknown corpus '{name}'; known: {', '.join(CORPORA)}")
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1")
    corpus, target = CORPORA[name], dest / name
    if (target / COMPLETE).exists():
        done = json.loads((target / COMPLETE).read_text(encoding="utf-8"))
        if done["limit"] != limit:
            raise UserError(f"{target}: already downloaded with --limit {done['limit'] or '(none)'}; "
                            "delete it to download again")
        print(f"{target}: already downloaded")
        return target
    entries = read_journal(target / JOURNAL)
    # a resumed run reads the commit the first one listed, whatever the repo holds now
    files = hub_files(corpus.repo, entries[0]["revision"] if entries else None, corpus.files, corpus.repo)
    settings = {"corpus": name, "repo": corpus.repo, "revision": files[0].revision,
                "files": [describe(f) for f in files]}
    if entries and entries[0] != settings:
        raise UserError(f"{target} holds a download of other files of {corpus.repo}; delete it to start over")
    target.mkdir(parents=True, exist_ok=True)
    with Journal(target / JOURNAL) as journal:
        if not journal.records:
            journal.append([settings])
        written, skipped = _copy_records(corpus, files, target, limit, journal)
    with atomic_output(target / COMPLETE) as tmp:
        tmp.write_text(json.dumps({**settings, "records": written, "skipped": skipped, "limit": limit},
                                  ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{target}: {written:,} records in {len(journal.records) - 1} shards from {corpus.repo} "
          f"at {settings['revision'][:12]}" + (f" ({skipped:,} without text skipped)" if skipped else ""))
    return target


def _copy_records(corpus: Corpus, files: list, target: Path, limit: int | None, journal: Journal) -> tuple[int, int]:
    """Writes the shards after those the journal records; returns the records written and skipped in all."""
    shards = journal.records[1:]
    written = sum(e["records"] for e in shards)
    skipped = shards[-1]["skipped"] if shards else 0
    first_file, first_index = shards[-1]["next"] if shards else (0, 0)
    lines: list[bytes] = []

    def commit(next_position: tuple[int, int]) -> None:
        nonlocal written
        if lines:
            atomic_write_bytes(target / f"part-{len(journal.records) - 1:05d}.jsonl", lines)
            written += len(lines)
            journal.append([{"records": len(lines), "skipped": skipped, "next": next_position}])
            lines.clear()

    if limit is not None and written >= limit:
        return written, skipped
    with tqdm(total=limit, initial=written, unit=" record", desc=f"download {target.name}", disable=None) as bar:
        for number in range(first_file, len(files)):
            skip = first_index if number == first_file else 0
            for record in read_records(files[number:number + 1], None, (0, skip)):
                try:
                    line = corpus.to_record(record.data)
                except (KeyError, TypeError, AttributeError) as e:
                    raise UserError(f"{record.file}: record {record.index} does not have the fields the registry "
                                    f"expects ({type(e).__name__}: {e}; fields: {', '.join(record.data)})") from None
                if line is None:
                    skipped += 1
                    continue
                lines.append(json.dumps(line, ensure_ascii=False).encode() + b"\n")
                bar.update()
                if written + len(lines) == limit:
                    commit((number, record.index + 1))
                    return written, skipped
                if len(lines) == SHARD_RECORDS:
                    commit((number, record.index + 1))
            commit((number + 1, 0))  # a file's end ends a shard: a resumed run starts at the next file
    return written, skipped
