"""A small Hugging Face hub on 127.0.0.1, for the real huggingface_hub client to talk to.

Not a mock: a real HTTP server speaking the parts of the hub protocol that
huggingface_hub 2.4 uses (read from its source: hf_api.model_info / list_repo_tree,
file_download.get_hf_file_metadata, utils._http.hf_raise_for_status):

  GET  /api/models/{repo}[/revision/{rev}]        JSON with sha, siblings, gated
  GET  /api/models/{repo}/tree/{rev}?recursive=1  entries: type, oid, size, path, lfs{oid,size,pointerSize}
  HEAD/GET /{repo}/resolve/{rev}/{path}           X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size;
                                                  LFS files answer 302 to http://localhost:PORT/lfs/{sha256}
                                                  (another host name: the CDN path, no auth forwarded)
  HEAD/GET /lfs/{sha256}                          bytes, honouring Range: bytes=N-
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) as the hub's do.

Fault injection for tests: throttle (bytes/s), drop the connection after N bytes,
serve corrupt bytes once, ignore Range. Counts the body bytes sent per file.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_MIN = 10_000


def git_oid(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool
    sha256: str = ""
    oid: str = ""  # git object id of what git stores: the pointer for LFS files

    def __post_init__(self) -> None:  # hashed once: hashing per request would dominate timings
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.oid = git_oid(self.pointer if self.lfs else self.data)

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()


@dataclass
class Repo:
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, Blob] = {}  # sha256 -> blob, for /lfs/
        self.sent: dict[str, int] = defaultdict(int)  # path in repo -> body bytes sent
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.throttle: float | None = None  # bytes per second for file bodies
        self.drops: dict[str, list[int]] = {}  # path -> drop the connection after N body bytes (one-shot each)
        self.corrupt_once: set[str] = set()  # paths served with one flipped byte, once
        self.ignore_range = False
        self.bodies_in_flight = 0  # file bodies being sent right now, and the most at once
        self.max_bodies_in_flight = 0
        self._flight_lock = threading.Lock()
        self.approved_tokens: set[str] = set()
        self._server: ThreadingHTTPServer | None = None

    # ---- data
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, revision: str = "main", gated: bool = False) -> str:
        repo = self.repos.setdefault(repo_id, Repo())
        repo.gated = repo.gated or gated
        blobs = {p: Blob(d, lfs=p.endswith(".safetensors") or len(d) >= LFS_MIN) for p, d in files.items()}
        sha = hashlib.sha1(repr(sorted((p, b.oid) for p, b in blobs.items())).encode() + repo_id.encode()).hexdigest()
        repo.commits[sha] = blobs
        repo.refs[revision] = sha
        for b in blobs.values():
            if b.lfs:
                self.blobs[b.sha256] = b
        return sha

    # ---- server
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_LFS = re.compile(r"^/lfs/([0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # ---- helpers
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str = "") -> None:
        body = json.dumps({"error": message or code}).encode()
        self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message or code,
                                  "Content-Type": "application/json"})

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _rev(self, repo: Repo, rev: str) -> str | None:
        rev = unquote(rev)
        if rev in repo.commits:
            return rev
        if rev in repo.refs:
            return repo.refs[rev]
        self._error(404, "RevisionNotFound", "Invalid rev id")
        return None

    def _token_ok(self, repo: Repo) -> bool:
        if not repo.gated:
            return True
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token in self.hub.approved_tokens:
            return True
        # The hub answers 401 without a token and 403 with one that was not granted access.
        self._error(403 if token else 401, "GatedRepo", "Access to model is restricted")
        return False

    # ---- routes
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        self.hub.requests.append((self.command, path, self.headers.get("Range")))
        try:
            if url.path == "/_stats":  # for benchmarks running the hub in another process
                return self._send(200, json.dumps(dict(self.hub.sent)).encode())
            if url.path == "/_throttle":
                value = parse_qs(url.query).get("bps", ["0"])[0]
                self.hub.throttle = float(value) or None
                return self._send(200, b"ok")
            if m := _TREE.match(url.path):
                return self._tree(unquote(m[1]), m[2], unquote(m[3] or ""))
            if m := _API.match(url.path):
                return self._info(unquote(m[1]), m[2] or "main")
            if m := _RESOLVE.match(url.path):
                return self._resolve(unquote(m[1]), m[2], unquote(m[3]))
            if m := _LFS.match(url.path):
                blob = self.hub.blobs.get(m[1])
                if blob is None:
                    return self._error(404, "EntryNotFound")
                return self._body(blob.data, key=m[1])
            self._error(404, "EntryNotFound", "no such route")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._rev(repo, rev)
        if sha is None:
            return
        siblings = [{"rfilename": p} for p in sorted(repo.commits[sha])]
        body = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                "gated": "manual" if repo.gated else False, "siblings": siblings, "tags": []}
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _tree(self, repo_id: str, rev: str, sub: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._rev(repo, rev)
        if sha is None:
            return
        recursive = parse_qs(urlparse(self.path).query).get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, dirs = [], set()
        for p, b in sorted(repo.commits[sha].items()):
            if sub and not p.startswith(sub.rstrip("/") + "/"):
                continue
            rel = p[len(sub.rstrip("/")) + 1:] if sub else p
            if "/" in rel:
                d = (sub.rstrip("/") + "/" if sub else "") + rel.split("/")[0]
                if d not in dirs:
                    dirs.add(d)
                    entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": d})
                if not recursive:
                    continue
            e = {"type": "file", "oid": b.oid, "size": len(b.pointer) if b.lfs else len(b.data), "path": p}
            if b.lfs:
                e["lfs"] = {"oid": b.sha256, "size": len(b.data), "pointerSize": len(b.pointer)}
            entries.append(e)
        self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id)
        if repo is None or not self._token_ok(repo):
            return
        sha = self._rev(repo, rev)
        if sha is None:
            return
        blob = repo.commits[sha].get(path)
        if blob is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.oid}"'}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": len(blob.data),
                            "Location": f"http://localhost:{self.hub.port}/lfs/{blob.sha256}"})
            return self._send(302, b"", headers)
        self._body(blob.data, key=path, extra=headers)

    def _body(self, data: bytes, key: str, extra: dict | None = None) -> None:
        hub = self.hub
        blob = hub.blobs.get(key)
        path = next((p for r in hub.repos.values() for c in r.commits.values() for p, b in c.items()
                     if b is blob), key) if blob is not None else key
        start = 0
        rng = self.headers.get("Range")
        status = 200
        headers = dict(extra or {})
        headers["Accept-Ranges"] = "bytes"
        if rng and not hub.ignore_range:
            m = re.match(r"bytes=(\d+)-(\d*)$", rng)
            if not m or int(m[1]) >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            start = int(m[1])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = memoryview(data)[start:]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if path in hub.corrupt_once:
            hub.corrupt_once.discard(path)
            bad = bytearray(body)
            bad[len(bad) // 2] ^= 0xFF
            body = memoryview(bytes(bad))
        drop_at = None
        if hub.drops.get(path):
            drop_at = hub.drops[path].pop(0)
        sent, step, t0 = 0, 256 << 10, time.monotonic()
        with hub._flight_lock:
            hub.bodies_in_flight += 1
            hub.max_bodies_in_flight = max(hub.max_bodies_in_flight, hub.bodies_in_flight)
        try:
            while sent < len(body):
                n = min(step, len(body) - sent)
                if drop_at is not None and start + sent + n >= drop_at:
                    n = max(0, drop_at - start - sent)
                    self.wfile.write(body[sent:sent + n])
                    hub.sent[path] += n
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # mid-body drop: the client sees a short read
                    self.close_connection = True
                    return
                self.wfile.write(body[sent:sent + n])
                sent += n
                hub.sent[path] += n
                if hub.throttle and sent < len(body):  # no sleep after the last byte: the body is done
                    ahead = sent / hub.throttle - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        finally:
            with hub._flight_lock:
                hub.bodies_in_flight -= 1


def serve_main() -> None:
    """`python -m tests.fakehub MiB`: serve one repo of random bytes in its own process (benchmarks)."""
    import os
    import sys

    size = int(sys.argv[1]) << 20
    out = sys.argv[2]
    data = os.urandom(size)
    with open(out, "wb") as f:
        f.write(data)
    hub = FakeHub()
    hub.add_repo("bench/model", {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}" * 20000,
                                 "model.safetensors": data})
    hub.start()
    print(hub.endpoint, flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        hub.stop()


if __name__ == "__main__":
    serve_main()
