"""Translations of chunks, keyed by the sha256 of the source text, kept across runs (SQLite).

TinyStories repeats many paragraphs, so a chunk is translated once: later lookups are hits, and
a thread that needs a chunk another thread is translating waits for that answer instead of
sending it again. SQLite keeps memory flat on the full 2.7M-story corpus; every chunk is
committed as soon as it is translated, so a killed run loses no translation it received.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path


class ChunkCache:
    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # WAL without an fsync per commit: a commit survives a killed process (not a power cut: then a
        # few chunks are translated again). An fsync per chunk, under the lock, would serialize the workers.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS chunks (sha256 TEXT PRIMARY KEY, zh TEXT NOT NULL)")
        self._lock = threading.Lock()
        self._in_flight: dict[str, threading.Event] = {}
        self.lookups = self.hits = 0

    def translate(self, texts: list[str], translate_many: Callable[[list[str]], list[str]],
                  fresh: bool = False) -> list[str]:
        """The translations of texts: cached ones, the rest from one translate_many call, stored.
        `fresh` looks nothing up (a retried reject must not get its rejected translation back)."""
        keys = {hashlib.sha256(text.encode()).hexdigest(): text for text in texts}
        found, mine, theirs, claimed = {}, {}, {}, []
        with self._lock:
            self.lookups += len(keys)
            for key, text in keys.items():
                row = None if fresh else self._db.execute("SELECT zh FROM chunks WHERE sha256 = ?", (key,)).fetchone()
                if row:
                    found[key] = row[0]
                elif key in self._in_flight and not fresh:
                    theirs[key] = self._in_flight[key]
                else:
                    if key not in self._in_flight:
                        self._in_flight[key] = threading.Event()
                        claimed.append(key)
                    mine[key] = text
            self.hits += len(found)
        try:
            if mine:
                found.update(zip(mine, translate_many(list(mine.values())), strict=True))
                with self._lock:
                    self._db.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?)",
                                         [(key, found[key]) for key in mine])
        finally:
            with self._lock:
                for key in claimed:
                    self._in_flight.pop(key).set()
        for key, event in theirs.items():
            event.wait()
            with self._lock:
                row = self._db.execute("SELECT zh FROM chunks WHERE sha256 = ?", (key,)).fetchone()
                self.hits += row is not None
            # None: that thread gave up; try it ourselves
            found[key] = row[0] if row else self.translate([keys[key]], translate_many)[0]
        return [found[hashlib.sha256(text.encode()).hexdigest()] for text in texts]

    def close(self) -> None:
        self._db.close()
