"""A local stand-in for the Hugging Face hub: the `resolve` endpoint the hub client downloads from.

Serves files from a dict at /{repo}/resolve/{rev}/{file} (models) and
/datasets/{repo}/resolve/{rev}/{file}, with the headers the client reads (X-Repo-Commit, an
LFS sha256 as X-Linked-Etag, sizes) and Range requests, so interrupted downloads resume.
The two API endpoints snapshot_download asks first are served too: /api/models/{repo}/revision/{rev}
(the commit and file list) and /api/models/{repo}/tree/{rev} (each file with its size and LFS sha256).
`cut_after` makes the first GET of a file stop after that many bytes, as a dropped connection.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandin:
    def __init__(self, files: dict[str, bytes], cut_after: int | None = None):
        self.files = files  # "datasets/owner/name/file" or "owner/name/file" -> content
        self.cut_after = cut_after
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandin

    def log_message(self, *args):  # keep test output quiet
        pass

    def _lookup(self):
        match = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/[^/]+/(.+)", self.path.split("?")[0])
        if not match:
            return None, None
        key = f"{match.group(1) or ''}{match.group(2)}/{match.group(3)}"
        return key, self.hub.files.get(key)

    def _headers(self, content: bytes, status: int, length: int, extra: dict | None = None):
        self.send_response(status)
        sha = hashlib.sha256(content).hexdigest()
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{sha}"')
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("X-Linked-Size", str(len(content)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def do_HEAD(self):
        self.hub.requests.append(("HEAD", self.path, None))
        key, content = self._lookup()
        if content is None:
            self.send_error(404)
            return
        self._headers(content, 200, len(content))

    def _api(self) -> bool:
        """Answers /api/{models,datasets}/{repo}/(revision|tree)/{rev}; False for any other path."""
        match = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/[^/]+", self.path.split("?")[0])
        if not match:
            return False
        prefix = f"{'datasets/' if match.group(1) == 'datasets' else ''}{match.group(2)}/"
        files = {key[len(prefix):]: content for key, content in self.hub.files.items() if key.startswith(prefix)}
        if not files:
            self.send_error(404)
            return True
        if match.group(3) == "revision":
            answer = {"id": match.group(2), "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
        else:
            answer = [{"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest(),
                       "lfs": {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}}
                      for name, content in files.items()]
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return True

    def do_GET(self):
        range_header = self.headers.get("Range")
        self.hub.requests.append(("GET", self.path, range_header))
        if self._api():
            return
        key, content = self._lookup()
        if content is None:
            self.send_error(404)
            return
        start = int(re.match(r"bytes=(\d+)-", range_header).group(1)) if range_header else 0
        body = content[start:]
        if start:
            content_range = f"bytes {start}-{len(content) - 1}/{len(content)}"
            self._headers(content, 206, len(body), {"Content-Range": content_range})
        else:
            self._headers(content, 200, len(body))
        if self.hub.cut_after is not None:
            cut, self.hub.cut_after = self.hub.cut_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)  # a dropped connection mid-file
            return
        self.wfile.write(body)
