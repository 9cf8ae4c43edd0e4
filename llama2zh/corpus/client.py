"""deep-translator's clients, made fit for a long run: timeouts, a rate limit, retries, a circuit breaker.

The requests are deep-translator's own (its GoogleTranslator GETs translate.google.com/m and parses
the result div). What this adds, shared by all worker threads:
- `endpoint` replaces the client's base URL on the instance (`_base_url`): self-hosted services, tests;
- a timeout on every request. deep-translator calls `requests.get(...)` with none, through the
  `requests` name of its backend module, so that name is pointed at `_TimedRequests`: the real
  requests module, except that a call made inside `Client.translate` gets the client's timeout
  (a thread-local; calls from anywhere else are untouched). It also notes the HTTP status, which
  deep-translator's RequestError does not carry, to tell a refusal (404) from a hiccup (503);
- a rate limit (requests/s, evenly spaced), retries with exponential backoff and jitter on 429,
  5xx, timeouts, connection errors, malformed bodies, and None / empty / unchanged-English
  results, and a circuit breaker that pauses every thread when the service keeps failing.
`translate_many` sends several texts per request, one a line, and uses the answer only when it
has one line per text (else it asks text by text). One deep-translator instance per thread:
its `translate` keeps per-request state on the instance.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import requests
from deep_translator import GoogleTranslator, MyMemoryTranslator
from deep_translator.exceptions import TooManyRequests

from llama2zh.corpus.chunks import pack


@dataclass(frozen=True)
class Backend:
    translator: type
    source: str
    target: str
    max_chunk: int  # characters per request: well under what the service takes


BACKENDS = {
    # deep-translator lets 5,000 characters through, but Google's /m page is a GET and long requests
    # fail (from about 1,800 characters of Chinese-heavy text): stay well under.
    "google": Backend(GoogleTranslator, "en", "zh-CN", 1000),
    "mymemory": Backend(MyMemoryTranslator, "en-GB", "zh-CN", 450),  # deep-translator allows < 500
}


class TransientError(Exception):
    """An attempt failed in a way a later attempt may not."""


class Refused(Exception):
    """The request cannot succeed as sent (HTTP 4xx other than 408/429, a malformed URL): retrying cannot help."""


class Stopped(Exception):
    """The run is stopping; the worker should give up its story."""


@dataclass(frozen=True)
class Retry:
    attempts: int = 8
    base: float = 0.5  # seconds before the first retry; doubled for each next one
    cap: float = 30.0

    def delay(self, attempt: int) -> float:
        """Half the exponential delay, plus up to as much again at random, so threads do not retry in step."""
        delay = min(self.cap, self.base * 2 ** attempt)
        return delay / 2 + random.uniform(0, delay / 2)


class RateLimiter:
    """At most `rate` requests per second over all threads, evenly spaced (0: no limit)."""

    def __init__(self, rate: float):
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event) -> None:
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self._interval
        if slot > now and stop.wait(slot - now):
            raise Stopped


class CircuitBreaker:
    """After `threshold` failures in a row (over all threads), every thread pauses for `cooldown` seconds."""

    def __init__(self, threshold: int = 10, cooldown: float = 30.0, log: Callable[[str], None] = print):
        self.threshold, self.cooldown, self._log = threshold, cooldown, log
        self._streak = 0
        self._open_until = 0.0
        self._lock = threading.Lock()
        self.trips = 0

    def wait(self, stop: threading.Event) -> None:
        delay = self._open_until - time.monotonic()
        if delay > 0 and stop.wait(delay):
            raise Stopped

    def success(self) -> None:
        with self._lock:
            self._streak = 0

    def failure(self, reason: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._open_until:  # requests sent before the pause: the pause already covers them
                return
            self._streak += 1
            if self._streak >= self.threshold:
                self._streak = 0
                self._open_until = now + self.cooldown
                self.trips += 1
                self._log(f"{self.threshold} failures in a row (last: {reason}): pausing {self.cooldown:g}s")


class _TimedRequests:
    """Stands in for the `requests` module inside a deep-translator backend module (see the module doc)."""

    local = threading.local()

    def __getattr__(self, name):
        return getattr(requests, name)

    def get(self, url, **kwargs):
        return self._send(requests.get, url, kwargs)

    def post(self, url, **kwargs):
        return self._send(requests.post, url, kwargs)

    def _send(self, method, url, kwargs):
        kwargs.setdefault("timeout", getattr(self.local, "timeout", None))
        response = method(url, **kwargs)
        self.local.status = response.status_code
        return response


_TIMED = _TimedRequests()


def _install_timeouts(translator_class: type) -> None:
    module = sys.modules[translator_class.__module__]
    if module.requests is not _TIMED:
        if module.requests is not requests:
            raise RuntimeError(f"{module.__name__} no longer calls requests directly: update _TimedRequests")
        module.requests = _TIMED


class Client:
    """Translates English text to Simplified Chinese through one backend; safe to share between threads."""

    def __init__(self, backend: str = "google", endpoint: str | None = None, timeout: float = 30.0,
                 rate: float = 10.0, retry: Retry = Retry(), breaker: CircuitBreaker | None = None,
                 stop: threading.Event | None = None):
        self.backend = BACKENDS[backend]
        _install_timeouts(self.backend.translator)
        self.endpoint, self.timeout, self.retry = endpoint, timeout, retry
        self.limiter = RateLimiter(rate)
        self.breaker = breaker or CircuitBreaker()
        self.stop = stop or threading.Event()
        self._local = threading.local()
        self._lock = threading.Lock()
        self.requests = 0
        self.failures: Counter[str] = Counter()
        self.unpacked = 0  # answers to packed texts whose lines did not match, asked again text by text

    @property
    def failed_attempts(self) -> int:
        with self._lock:
            return sum(self.failures.values())

    def translate_many(self, texts: list[str]) -> list[str]:
        """Translations of texts (no newline in any), in as few requests as the backend's chunk limit allows."""
        results = []
        for group in pack(texts, self.backend.max_chunk):
            lines = self.translate("\n".join(group)).split("\n")
            if len(group) == 1:  # a newline inside one text's answer must not add a line to the story
                lines = ["".join(lines)]
            elif len(lines) != len(group) or not all(line.strip() for line in lines):
                with self._lock:
                    self.unpacked += 1
                lines = ["".join(self.translate(text).split("\n")) for text in group]
            results += [line.strip() for line in lines]
        return results

    def translate(self, text: str) -> str:
        """The translation of `text` (stripped). TransientError when every attempt failed; Refused, Stopped."""
        for attempt in range(self.retry.attempts):
            if self.stop.is_set():
                raise Stopped
            self.breaker.wait(self.stop)
            self.limiter.wait(self.stop)
            try:
                result = self._attempt(text)
            except TransientError as e:
                reason = str(e)
            else:
                self.breaker.success()
                return result
            with self._lock:
                self.failures[reason] += 1
            self.breaker.failure(reason)
            if attempt + 1 < self.retry.attempts and self.stop.wait(self.retry.delay(attempt)):
                raise Stopped
        raise TransientError(f"{self.retry.attempts} attempts failed, the last with: {reason}")

    def _attempt(self, text: str) -> str:
        translator = self._translator()
        with self._lock:
            self.requests += 1
        _TIMED.local.timeout, _TIMED.local.status = self.timeout, None
        try:
            result = translator.translate(text)
        except requests.Timeout:
            raise TransientError("timeout") from None
        except TooManyRequests:
            raise TransientError("HTTP 429") from None
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
                requests.exceptions.InvalidURL) as e:
            raise Refused(f"bad URL {translator._base_url!r} ({type(e).__name__})") from None
        except requests.ConnectionError:
            raise TransientError("connection failed") from None
        except Exception as e:  # a non-2xx status, or a body deep-translator's parser chokes on
            status = _TIMED.local.status
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                raise Refused(f"{translator._base_url} answered HTTP {status}") from None
            raise TransientError(f"HTTP {status}" if status and status >= 300 else
                                 f"bad response ({type(e).__name__})") from None
        finally:
            _TIMED.local.timeout = None
        if result is None or not result.strip():
            raise TransientError("no translation (None or empty)")
        if result.strip() == text.strip():
            raise TransientError("English returned unchanged")
        return result.strip()

    def _translator(self):
        translator = getattr(self._local, "translator", None)
        if translator is None:
            translator = self.backend.translator(source=self.backend.source, target=self.backend.target)
            if self.endpoint:
                translator._base_url = self.endpoint
            self._local.translator = translator
        return translator
