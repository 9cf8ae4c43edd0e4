"""A local stand-in for Google Translate's /m page (and MyMemory's /get API), with injected faults.

deep-translator's real clients talk to it unchanged (only their base URL points here):
- GET /m?sl=en&tl=zh-CN&q=TEXT answers an HTML page whose <div class="result-container"> holds the
  translation, the shape deep-translator's GoogleTranslator parses;
- GET /get?q=TEXT&langpair=en-GB|zh-CN answers MyMemory's JSON.
"Translation" is deterministic (`chinese`): each English word becomes two fixed CJK characters,
spaces go, newlines stay (as Google keeps them), ASCII punctuation becomes full-width, so quality
checks pass and a test can compute the expected output. Words in `keep` stay English (to make
quality rejects); `newlines=False` loses the newlines (a service that merges lines).

Faults, decided by a hash of (seed, text, how many times this text was asked before), so a retry
of the same text is decided afresh and a run is reproducible whatever the thread timing:
  429, 500, 503    the HTTP status
  timeout          sleeps `hang` seconds (past the client's timeout), then answers
  empty            200 with an empty body
  garbage          200 with random bytes
  blank            the result holds nothing (deep-translator returns "")
  unchanged        the result is the English text (deep-translator returns it as the translation)
  none             MyMemory only: translatedText null (deep-translator returns None). Google's client
                   returns None only for an echoed text with no letter or digit, which llama2zh never sends.
`outage` makes the first N requests answer 503 (a service that is down, for the circuit breaker).
Every request is logged (time, path, text, what was served). `python -m tests.google_standin` serves
one from the command line (the benchmark runs it so, in its own process).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import random
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

GOOGLE_FAULTS = ("429", "500", "503", "timeout", "empty", "garbage", "blank", "unchanged")
MYMEMORY_FAULTS = (*GOOGLE_FAULTS, "none")
PUNCTUATION = {".": "。", ",": "，", "!": "！", "?": "？", ";": "；", ":": "：", "(": "（", ")": "）"}
TOKEN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*|\s+|.", re.S)


def chinese(text: str, keep=frozenset()) -> str:
    """The stand-in's translation of `text`."""
    out, quotes = [], 0
    for token in TOKEN.findall(text):
        if token[0].isalpha() and token.lower() not in keep:
            code = zlib.crc32(token.lower().encode())
            out.append(chr(0x4E00 + code % 20000) + chr(0x4E00 + (code >> 16) % 20000))
        elif token == '"':
            out.append("“”"[quotes % 2])
            quotes += 1
        elif not token.isspace() or "\n" in token:
            out.append("\n" * token.count("\n") or PUNCTUATION.get(token, token))
    return "".join(out)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen() backlog: many workers connect at once (the default, 5, drops SYNs)


@dataclass(frozen=True)
class Logged:
    time: float
    path: str
    text: str
    served: str  # "ok" or the fault


@dataclass
class Standin:
    latency: float = 0.0  # seconds before every answer
    fault_rate: float = 0.0
    faults: tuple[str, ...] = GOOGLE_FAULTS
    seed: int = 0
    hang: float = 1.5  # the "timeout" fault's sleep
    keep: frozenset = frozenset()
    newlines: bool = True
    outage: int = 0
    log: list[Logged] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._asked: dict[str, int] = {}
        self.active = 0  # requests being answered now
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                standin._answer(self)

            def log_message(self, *args):
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def settle(self, quiet: float = 0.3, limit: float = 10.0) -> None:
        """Waits until no request has been in progress for `quiet` seconds (a killed client's stragglers)."""
        deadline, calm_since = time.monotonic() + limit, time.monotonic()
        while time.monotonic() < deadline:
            if self.active:
                calm_since = time.monotonic()
            elif time.monotonic() - calm_since >= quiet:
                return
            time.sleep(0.02)

    def _choose(self, path: str, text: str) -> str:
        """What to serve, logged: a fault, or "ok"."""
        with self._lock:
            n = self._asked.get(text, 0)
            self._asked[text] = n + 1
            digest = hashlib.sha256(f"{self.seed}\0{n}\0{text}".encode()).digest()
            if len(self.log) < self.outage:
                served = "503"
            elif int.from_bytes(digest[:4], "big") / 2 ** 32 >= self.fault_rate:
                served = "ok"
            else:
                served = self.faults[int.from_bytes(digest[4:8], "big") % len(self.faults)]
            self.log.append(Logged(time.monotonic(), path, text, served))
            self.active += 1
        return served

    def _answer(self, request: BaseHTTPRequestHandler) -> None:
        url = urlsplit(request.path)
        text = parse_qs(url.query).get("q", [""])[0]
        served = self._choose(url.path, text)
        try:
            time.sleep(self.latency + (self.hang if served == "timeout" else 0))
            status, body, kind = self._response(url.path, text, served)
            request.send_response(status)
            request.send_header("Content-Type", kind)
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)
        except OSError:
            pass  # the client gave up (its timeout) or was killed
        finally:
            with self._lock:
                self.active -= 1

    def _response(self, path: str, text: str, served: str) -> tuple[int, bytes, str]:
        if path not in ("/m", "/get"):
            return 404, b"", "text/plain"
        if served in ("429", "500", "503"):
            return int(served), b"", "text/plain"
        if served == "empty":
            return 200, b"", "text/html; charset=UTF-8"
        if served == "garbage":
            return 200, random.Random(text).randbytes(300), "text/html; charset=UTF-8"
        result = {"blank": "", "unchanged": text, "none": None}.get(served, chinese(text, self.keep))
        if result and not self.newlines:
            result = result.replace("\n", "")
        if path == "/get":  # MyMemory
            matches = [{"translation": result, "quality": 70}]
            body = json.dumps({"responseData": {"translatedText": result}, "responseStatus": 200, "matches": matches})
            return 200, body.encode(), "application/json"
        page = ("<!DOCTYPE html><html><head><title>Google Translate</title></head><body><div class=\"frame\">"
                f"<div class=\"result-container\">{html.escape(result or '')}</div></div></body></html>")
        return 200, page.encode(), "text/html; charset=UTF-8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with Standin(latency=args.latency, fault_rate=args.fault_rate, seed=args.seed) as standin:
        print(standin.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
