"""Reading story shards: TinyStories' layout (JSON arrays) or JSON lines, one record per story.

A record holds "story" and, in a parallel (translated or built-in) corpus, "story_en" too:
there "story" is the Chinese text. A document's id is "<shard stem>:<index>" unless the record
carries its own "id".

`pretokenize` reads a single folder SOURCE this way when is_story_folder says so; any other
source goes through llama2zh.corpus.sources.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from llama2zh.errors import UserError

LANGS = ("en", "zh", "enzh")


def _shard_files(dataset_dir: Path) -> list[Path]:
    return sorted(p for p in dataset_dir.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file()
                  and p.name != "manifest.json")


def shard_paths(dataset_dir: Path) -> list[Path]:
    """The dataset's shards (*.json, *.jsonl) in name order; an error when there are none."""
    if not dataset_dir.is_dir():
        raise UserError(f"{dataset_dir}: no such dataset directory")
    paths = _shard_files(dataset_dir)
    if not paths:
        raise UserError(f"{dataset_dir}: no story shards (*.json, *.jsonl)")
    return paths


def is_story_folder(path: Path) -> bool:
    """Whether `path` is a folder of story shards: the first record of its first *.json/*.jsonl file
    (top level, name order) has a "story" field. Only that file's first 64 KiB are read, so a folder
    of large JSON files of another kind is told apart cheaply."""
    files = _shard_files(path) if path.is_dir() else []
    if not files:
        return False
    with files[0].open(encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16).lstrip().removeprefix("[").lstrip()  # an array's first element, or the first line
    try:
        record, _ = json.JSONDecoder().raw_decode(head)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "story" in record


def read_records(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
        records = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                   else json.loads(text))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a story shard ({e})".splitlines()[0]) from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "story" in r for r in records):
        raise UserError(f"{path}: not a story shard (expected a list of {{\"story\": ...}} records)")
    return records


def documents(path: Path, lang: str) -> Iterator[tuple[str, str]]:
    """(id, text) of every document of one shard in the chosen language(s)."""
    stem = path.stem
    for index, record in enumerate(read_records(path)):
        doc_id = str(record["id"]) if "id" in record else f"{stem}:{index}"
        parallel = "story_en" in record
        if lang in ("en", "enzh") and parallel:
            yield doc_id + "/en", record["story_en"]
        if lang in ("zh", "enzh") or not parallel:
            yield doc_id, record["story"]
