"""Documents for the vocab tools, streamed from .jsonl, .json and .txt files and picked by language.

- .jsonl: one record per line, {"story": ...} or {"text": ...}
- .json:  a TinyStories shard, one JSON array of {"story": ...} records (read whole: shards are small)
- .txt:   one document per line (SentencePiece's own input convention; blank lines are skipped)

A parallel record ({"story": Chinese, "story_en": English}) gives its English side to `en`, its
Chinese side to `zh` and both to `enzh`. A document is Chinese when it holds at least as many CJK
ideographs as Latin letters, English otherwise; `en` and `zh` keep only their own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from llama2zh.errors import UserError

LANGS = ("en", "zh", "enzh")
SUFFIXES = (".jsonl", ".json", ".txt")
# CJK ideographs: the unified blocks, Extension A, compatibility ideographs, Extensions B and up.
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
CJK_RE = re.compile(f"[{CJK}]")
LATIN_RE = re.compile("[A-Za-z\u00c0-\u024f]")


def language(text: str) -> str | None:
    """'zh' or 'en' by the script most of the text's letters are in; None without letters."""
    cjk, latin = len(CJK_RE.findall(text)), len(LATIN_RE.findall(text))
    if cjk == latin == 0:
        return None
    return "zh" if cjk >= latin else "en"


def check_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """The input files as Paths; a missing file or an unknown format is a UserError."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        if path.suffix not in SUFFIXES:
            raise UserError(f"{path}: unknown corpus format (expected {', '.join(SUFFIXES)})")
    return paths


def _texts(record, lang: str) -> list[str]:
    if not isinstance(record, dict) or not ({"story", "text"} & record.keys()):
        raise ValueError('expected a {"story": ...} or {"text": ...} record')
    if "story_en" in record:
        texts = {"en": ["story_en"], "zh": ["story"], "enzh": ["story", "story_en"]}[lang]
    else:
        texts = ["story" if "story" in record else "text"]
    if not all(isinstance(record[key], str) for key in texts):
        raise ValueError("the story or text is not a string")
    return [record[key] for key in texts]


def _records(path: Path, bar: tqdm) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of one file; a .txt line is the record {"text": line}."""
    if path.suffix == ".json":
        data = path.read_bytes()
        bar.update(len(data))
        try:
            records = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not JSON ({e})") from None
        if not isinstance(records, list):
            raise UserError(f"{path}: expected a JSON array of records (a TinyStories shard)")
        yield from ((f"{path}[{i}]", record) for i, record in enumerate(records))
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            bar.update(len(raw))
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    yield where, json.loads(line) if path.suffix == ".jsonl" else {"text": line.rstrip("\r\n")}
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{where}: not {'JSON' if path.suffix == '.jsonl' else 'UTF-8'} ({e})") from None


def _documents(paths: list[Path], lang: str, desc: str) -> Iterator[str]:
    with tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, desc=desc,
              disable=None, leave=False) as bar:
        for path in paths:
            for where, record in _records(path, bar):
                try:
                    texts = _texts(record, lang)
                except ValueError as e:
                    raise UserError(f"{where}: {e}") from None
                yield from (t for t in texts if t.strip() and (lang == "enzh" or language(t) == lang))


def read_documents(paths: Iterable[str | Path], lang: str = "enzh", desc: str = "reading") -> Iterator[str]:
    """The documents of `paths` in `lang`, streamed with a progress bar (on a terminal).

    The files are checked now; a bad record raises UserError when the stream reaches it."""
    if lang not in LANGS:
        raise UserError(f"unknown language {lang!r} (expected one of {', '.join(LANGS)})")
    return _documents(check_inputs(paths), lang, desc)


def lines(documents: Iterable[str]) -> Iterator[str]:
    """The non-blank lines of the documents: SentencePiece trains on lines, never across them."""
    for document in documents:
        yield from (line for line in document.splitlines() if line.strip())
