"""A local stand-in for the Hugging Face hub: the endpoints its clients (huggingface_hub's downloads
and HfFileSystem, datasets streaming hf:// files) call, found by running them against it.

Serves files from a dict at /{repo}/resolve/{rev}/{file} (models) and
/datasets/{repo}/resolve/{rev}/{file}, with the headers the client reads (X-Repo-Commit, an
LFS sha256 as X-Linked-Etag, sizes) and Range requests (open or closed), so interrupted downloads
resume and files stream in pieces. The API, for /api/models/... and /api/datasets/...:
  {repo} and {repo}/revision/{rev}   the commit and file list (siblings, with sizes)
  {repo}/tree/{rev}[/{folder}]       a folder's files and folders (?recursive=true: all below it)
  {repo}/paths-info/{rev} (POST)     the entries of the paths named in the form's `paths`
Every revision is the one commit, COMMIT. `cut_after` makes the first GET of a file stop after
that many bytes, as a dropped connection; a file in `unreadable` is listed but its reads answer
404 (a file gone, or a mirror that lost it), which stops a client mid-dataset; a read of a file
in `held` waits until `release` is set (a client is caught mid-dataset, to be interrupted).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandin:
    def __init__(self, files: dict[str, bytes], cut_after: int | None = None, unreadable: set[str] = frozenset(),
                 held: set[str] = frozenset()):
        self.files = files  # "datasets/owner/name/file" or "owner/name/file" -> content
        self.cut_after = cut_after
        self.unreadable = set(unreadable)  # keys of files, as in files
        self.held = set(held)
        self.release = threading.Event()
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
        return key, None if key in self.hub.unreadable else self.hub.files.get(key)

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

    def _api(self, body: bytes = b"") -> bool:
        """Answers the API paths of the docstring; False for any other path."""
        url = urlsplit(self.path)
        match = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?",
                             unquote(url.path))
        if not match:
            return False
        kind, repo, what, _, folder = match.groups()
        prefix = f"{'datasets/' if kind == 'datasets' else ''}{repo}/"
        files = {key[len(prefix):]: content for key, content in self.hub.files.items() if key.startswith(prefix)}
        if not files:
            self.send_error(404)
            return True
        if what in (None, "revision"):
            answer = {"id": repo, "sha": COMMIT, "siblings": [
                {"rfilename": name, "size": len(content), "blobId": hashlib.sha1(content).hexdigest(),
                 "lfs": {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}}
                for name, content in files.items()]}
        elif what == "tree":
            recursive = parse_qs(url.query).get("recursive") == ["true"]
            answer = [entry for entry in _entries(files) if _below(entry["path"], folder or "", recursive)]
        else:
            wanted = set(parse_qs(body.decode()).get("paths", []))
            answer = [entry for entry in _entries(files) if entry["path"] in wanted]
        self._json(answer)
        return True

    def _json(self, answer) -> None:
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.hub.requests.append(("POST", self.path, None))
        if not self._api(body):
            self.send_error(404)

    def do_GET(self):
        range_header = self.headers.get("Range")
        self.hub.requests.append(("GET", self.path, range_header))
        if self._api():
            return
        key, content = self._lookup()
        if key in self.hub.held:
            self.hub.release.wait()
        if content is None:
            self.send_error(404)
            return
        first, last = re.match(r"bytes=(\d+)-(\d*)", range_header).groups() if range_header else ("0", "")
        start, stop = int(first), min(int(last) + 1 if last else len(content), len(content))
        body = content[start:stop]
        if range_header:
            content_range = f"bytes {start}-{stop - 1}/{len(content)}"
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


def _entries(files: dict[str, bytes]) -> list[dict]:
    """The tree entries of a repo's files: each file (size, git oid, LFS sha256) and each folder."""
    folders = sorted({name.rsplit("/", i)[0] for name in files for i in range(1, name.count("/") + 1)})
    return ([{"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest()}
             for folder in folders]
            + [{"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest(),
                "lfs": {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}}
               for name, content in sorted(files.items())])


def _below(path: str, folder: str, recursive: bool) -> bool:
    """Whether a tree listing of folder ("" for the root) shows path."""
    rest = path[len(folder) + 1:] if folder else path
    return (not folder or path.startswith(folder + "/")) and bool(rest) and (recursive or "/" not in rest)
