"""An append-only JSON-lines file that survives kill -9: each batch is fsync'd, a torn last line dropped.

A record is on disk once `append` returns. A crash can only tear the line being written, the
last one; opening the journal drops it (and truncates it away, so the next line starts clean).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llama2zh.errors import UserError


def read_journal(path: Path) -> list[dict]:
    """The complete records of a journal (none if it does not exist)."""
    return _scan(path)[0]


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self.records, end = _scan(path)
        new = not path.exists()
        self._file = open(path, "ab")
        self._file.truncate(end)
        if new:  # the file's name must survive a crash too
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self._file.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.extend(records)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _scan(path: Path) -> tuple[list[dict], int]:
    """The records and the byte offset where the complete lines end."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    records, end = [], 0
    *complete, _torn = data.split(b"\n")  # after the last newline: a line whose write was cut short
    for number, line in enumerate(complete, 1):
        try:
            records.append(json.loads(line))
        except ValueError:  # JSON never holds a raw newline byte: a cut write cannot end like this
            raise UserError(f"{path}: line {number} is corrupt; move the file away to redo its shard") from None
        end += len(line) + 1
    return records, end
