"""Work on a stream in worker processes, in input order, with a bounded number of chunks in flight.

multiprocessing's imap reads its whole input ahead of the workers; a corpus of several GB would
then sit in memory. Here at most `window` chunks wait, so memory stays flat whatever the input.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice


def worker_pool(workers: int):
    """Forked worker processes that leave Ctrl-C to the main process: a worker interrupted while it waits
    for a task dies holding the task queue's lock, and the pool's shutdown would then hang forever."""
    return multiprocessing.get_context("fork").Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN))


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


def ordered_map(fn: Callable[[list], object], chunks: Iterable[list], pool=None,
                window: int = 4) -> Iterator[tuple[list, object]]:
    """(chunk, fn(chunk)) for each chunk in order; fn runs in `pool` (None: in this process)."""
    if pool is None:
        for chunk in chunks:
            yield chunk, fn(chunk)
        return
    pending = deque()
    for chunk in chunks:
        pending.append((chunk, pool.apply_async(fn, (chunk,))))
        if len(pending) > window:
            done, result = pending.popleft()
            yield done, result.get()
    for done, result in pending:
        yield done, result.get()
