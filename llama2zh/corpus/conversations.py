"""Reading conversation files for instruction tuning: .jsonl, one conversation a line, or any
other structured format sources.py reads (.json array, .parquet, .csv), one conversation a record.

Three forms, detected per file from its first well-formed record:
  native    {"conversations": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}  (minimind's)
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
  alpaca    {"instruction": ..., "input": ..., "output": ...} (input and "system" optional)
Each becomes a list of {"role", "content"} messages. A malformed record (bad JSON, another
form than the file's, an unknown role, a system message after the first, no assistant turn,
an empty content) is a Malformed error naming the file and line (the record's number, from 0,
in the other formats); read_conversations skips and counts them, or with strict=True stops at the
first. A .jsonl file is read line by line, not through datasets: a line that is not JSON is one
malformed record there, where datasets would refuse the whole file, and records keep their own
keys (datasets gives each the columns of all).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llama2zh.corpus import sources
from llama2zh.errors import UserError

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHOWN_PROBLEMS = 5  # malformed records reported one by one; the rest only counted
SUFFIXES = tuple(suffix for suffix, builder in sources.BUILDERS.items() if builder != "text")  # a record each


class Malformed(UserError):
    """A record that is not a usable conversation."""


def detect_format(record) -> str:
    """The form of one parsed record, or Malformed."""
    if isinstance(record, dict):
        if "instruction" in record and "output" in record:
            return "alpaca"
        turns = record.get("conversations")
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            if "from" in turns[0] and "value" in turns[0]:
                return "sharegpt"
            if "role" in turns[0] and "content" in turns[0]:
                return "native"
    raise Malformed("not a conversation (expected {\"conversations\": [...]} or {\"instruction\", \"output\"})")


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise Malformed(f"{what} is not a string")
    return value


def to_messages(record, form: str) -> list[dict]:
    """The record as checked {"role", "content"} messages."""
    if detect_format(record) != form:
        raise Malformed(f"a {detect_format(record)} record in a {form} file")
    if form == "alpaca":
        prompt = _text(record["instruction"], "instruction")
        extra = _text(record.get("input") or "", "input")
        messages = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra.strip() else prompt},
                    {"role": "assistant", "content": _text(record["output"], "output")}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _text(record["system"], "system")})
    else:
        role_key, text_key = ("role", "content") if form == "native" else ("from", "value")
        messages = []
        for turn in record["conversations"]:
            if not isinstance(turn, dict):
                raise Malformed("a turn is not an object")
            raw = turn.get(role_key)
            role = raw if form == "native" else SHAREGPT_ROLES.get(raw) if isinstance(raw, str) else None
            if role not in ("system", "user", "assistant"):
                raise Malformed(f"unknown role {raw!r}")
            messages.append({"role": role, "content": _text(turn.get(text_key), f"a {role} turn's {text_key}")})
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise Malformed(f"empty {m['role']} content")
        if m["role"] == "system" and i > 0:
            raise Malformed("a system message after the first")
    if not any(m["role"] == "assistant" for m in messages):
        raise Malformed("no assistant turn")
    return messages


@dataclass
class ReadReport:
    """What read_conversations kept and skipped, per file."""
    read: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str | None:
        if not self.skipped:
            return None
        return (f"skipped {self.skipped} malformed record(s) of {self.read + self.skipped} "
                f"(first: {self.problems[0]}); --strict stops at the first")


def read_conversations(path: Path, report: ReadReport, strict: bool = False) -> Iterator[list[dict]]:
    """The conversations of one file, malformed records skipped (and counted in report)."""
    return read_records(path, report, strict, detect_format, to_messages)


def read_records(path: Path, report: ReadReport, strict: bool, detect: Callable, convert: Callable) -> Iterator:
    """convert(record, form) of each record of one file, the file's form detect(record) of its
    first well-formed record; a Malformed record is skipped (and counted in report), or with
    strict=True stops the reading, named by file and line (or record)."""
    form = None
    for where, record in _parsed(path):
        try:
            if isinstance(record, Malformed):
                raise record
            form = form or detect(record)
            value = convert(record, form)
        except Malformed as e:
            where = f"{where}: {e}"
            if strict:
                raise Malformed(where) from None
            report.skipped += 1
            if len(report.problems) < SHOWN_PROBLEMS:
                report.problems.append(where)
            continue
        report.read += 1
        report.formats[str(path)] = form
        yield value


def _parsed(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of one file; where a .jsonl line is not JSON, a Malformed
    in place of the record."""
    if path.suffix != ".jsonl":
        for record in sources.read_records([path], text_field=None):
            yield f"{path}: record {record.index}", record.data
        return
    try:
        handle = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    with handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                record = Malformed("not UTF-8")
            except json.JSONDecodeError as e:
                record = Malformed(f"not valid JSON ({e.msg})")
            yield f"{path}:{line_no}", record
