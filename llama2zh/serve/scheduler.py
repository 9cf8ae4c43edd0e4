"""The batching loop: one thread owns the model and its CBatch, and every served token comes out of it.

Why one thread: calls on a model and its batch must not overlap, and a batch step reads each weight once for
all the sequences in it, so N clients cost little more than one when they advance together. Each turn of the
loop admits waiting requests into free slots, feeds every new prompt one chunk (a long prompt delays the
others by a chunk, not by its whole length), then steps every sequence past its prompt by one token, samples
each with its own CSampler and hands the new text to the request's event loop. The loop ends a request at a
stop id, a stop string or max_tokens, and drops one whose client left, freeing its slot for the next.
A sequence here gets the tokens CModel.generate_ids gives it alone: same prompt, same stop ids, same sampler.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llama2zh.engine import CBatch, CDecoder, CModel, CSampler, CTokenizer

CHUNK = 64  # prompt tokens a slot is fed between two steps


@dataclass
class Request:
    """One completion: the prompt's ids, its limits and sampling settings, and emit, which the loop calls (from
    its thread) with ("text", str), then ("done", finish_reason, tokens generated) or ("error", message)."""

    ids: list[int]
    max_tokens: int
    stop_ids: tuple[int, ...]
    stop: list[str]
    emit: Callable[[tuple], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    presence: float = 0.0
    frequency: float = 0.0
    cancelled: bool = False  # set by the server when the client leaves; the loop drops the request
    # the loop's: slot, positions in the KV cache, tokens generated, the last one (fed by the next step), text
    slot: int = -1
    fed: int = 0
    generated: int = 0
    token: int = -1
    text: str = ""
    sent: int = 0  # text[:sent] is emitted; the rest might begin a stop string
    sampler: CSampler | None = None
    decoder: CDecoder | None = None


class Scheduler:
    """Serves Requests on slots sequences at once; at most max_waiting more wait for a slot."""

    def __init__(self, model: CModel, tokenizer: CTokenizer, slots: int, max_waiting: int):
        self.model, self.tokenizer = model, tokenizer
        self.batch = CBatch(model, slots)
        release_openmp_workers()  # this thread opened the model; _run's thread runs it
        self.slots, self.max_waiting = slots, max_waiting
        self.waiting: deque[Request] = deque()
        self.active: dict[int, Request] = {}  # slot -> request
        self.stats = Counter()  # requests finished, requests cancelled, tokens generated
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="llama2zh-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> bool:
        """Queues request; False when the server is full (every slot busy, max_waiting waiting) or closed."""
        with self._cond:
            if self.closed or len(self.waiting) + len(self.active) >= self.slots + self.max_waiting:
                return False
            self.waiting.append(request)
            self._cond.notify()
        return True

    def cancel(self, request: Request) -> None:
        """Stops request (its client left): the loop frees its slot before its next step."""
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """Ends the loop after the current step; every request not finished gets an error."""
        with self._cond:
            self.closed = True
            self._cond.notify()
        self._thread.join()

    def load(self) -> dict:
        with self._cond:
            return {"slots": self.slots, "active": len(self.active), "waiting": len(self.waiting),
                    **{key: self.stats[key] for key in ("requests", "cancelled", "tokens")}}

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self.closed or self.waiting or self.active):
                    self._cond.wait()
                if self.closed:
                    break
                self._admit()
                running = list(self.active.values())
            try:
                self._advance(running)
            except Exception as e:  # a bug or a C failure: fail those requests, keep serving the next ones
                for r in running:
                    if self.active.get(r.slot) is r:
                        self._finish(r, ("error", f"generation failed: {e}"))
        for r in [*self.active.values(), *self.waiting]:
            r.emit(("error", "the server is shutting down"))

    def _admit(self) -> None:
        """Waiting requests into free slots (under the lock)."""
        while self.waiting and len(self.active) < self.slots:
            r = self.waiting.popleft()
            if r.cancelled:  # its client left while it waited
                self.stats["cancelled"] += 1
                continue
            r.slot = next(s for s in range(self.slots) if s not in self.active)
            r.sampler = CSampler(self.model.vocab_size, r.temperature, r.top_p, r.seed, r.presence, r.frequency)
            r.decoder = CDecoder(self.tokenizer)
            self.active[r.slot] = r

    def _advance(self, running: list[Request]) -> None:
        """One turn: drop the cancelled, feed each new prompt a chunk, step the rest by one token."""
        stepping = []
        for r in running:
            if r.cancelled:
                self.stats["cancelled"] += 1
                self._free(r)
            elif r.fed < len(r.ids):
                chunk = r.ids[r.fed:r.fed + CHUNK]
                logits = self.batch.prefill(r.slot, chunk, r.fed)
                r.fed += len(chunk)
                if r.fed == len(r.ids):  # the prompt's last logits give the first token
                    self._take(r, sample(r, logits))
            else:
                stepping.append(r)
        if stepping:
            logits = self.batch.step([r.slot for r in stepping], [r.token for r in stepping],
                                     [r.fed for r in stepping])
            for r, row in zip(stepping, logits, strict=True):
                r.fed += 1
                self._take(r, sample(r, row))

    def _take(self, r: Request, token: int) -> None:
        """A sampled token: the end at a stop id, else its text out (held back while it might begin a stop
        string), and the end at a stop string or max_tokens (l2_generate's rule: the prompt and max_tokens were
        checked to fit the context)."""
        if token in r.stop_ids:
            return self._finish(r, ("done", "stop", r.generated), r.text[r.sent:] + r.decoder.finish())
        r.token, r.generated = token, r.generated + 1
        r.text += r.decoder.step(token)
        cut = min((i for i in (r.text.find(s, r.sent) for s in r.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._finish(r, ("done", "stop", r.generated), r.text[r.sent:cut])
        if r.generated == r.max_tokens:
            return self._finish(r, ("done", "length", r.generated), r.text[r.sent:] + r.decoder.finish())
        end = len(r.text) - held(r.text, r.stop)
        if end > r.sent:
            r.emit(("text", r.text[r.sent:end]))
            r.sent = end

    def _finish(self, r: Request, event: tuple, text: str = "") -> None:
        if text:
            r.emit(("text", text))
        r.emit(event)
        self.stats["requests"] += 1
        self._free(r)

    def _free(self, r: Request) -> None:
        self.stats["tokens"] += r.generated
        with self._cond:
            del self.active[r.slot]


def sample(r: Request, logits: np.ndarray) -> int:
    """r's next token. Greedy without penalties (the sampler then keeps no state) it is the argmax, taken here:
    l2_sample's own is the same first index of the largest value, but the call copies the logits and lets the
    event loop's thread take the GIL, which cost a step of 8 sequences a tenth of its time. Logits holding a
    NaN go to l2_sample, whose scan skips NaNs where numpy's argmax stops at the first."""
    if not r.temperature > 0 and r.presence == 0 and r.frequency == 0:
        token = int(logits.argmax())
        if not np.isnan(logits[token]):
            return token
    return r.sampler.sample(logits)


def held(text: str, stops: list[str]) -> int:
    """How many characters at the end of text begin some stop string (not emitted until the next ones show
    whether the stop string follows)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def release_openmp_workers() -> None:
    """Ends the OpenMP worker threads kept for the calling thread, where the model was opened (its load packs
    the weights in a parallel region), so that only the scheduler's thread keeps workers. Why: libgomp keeps a
    pool of workers for every thread that has run a parallel region, and once it manages more threads than
    there are CPUs, its workers stop spinning at barriers and sleep instead, a wake-up each: with the engine
    on every core (its default), a step run from another thread than the one that opened the model took 2.5
    times as long on 2 cores. A no-op unless the engine's libgomp is loaded."""
    try:
        gomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        pause = gomp.omp_pause_resource_all  # OpenMP 5.0 (GCC 9 and later)
    except (OSError, AttributeError):
        return
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    pause(1)  # omp_pause_soft: the threads end; the next parallel region of this thread starts new ones
