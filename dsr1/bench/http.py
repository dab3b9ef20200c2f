"""A small HTTP/1.1 client on asyncio streams, written for measuring streamed responses.

Why not httpx or aiohttp: the client must not be the bottleneck (issue 5). A shared
session read buffer cut measured throughput ~10x in vLLM's client (vllm #39963), and
httpx's per-chunk overhead caps it well below 1000 streamed requests/s on a small
machine; `benchmarks/bench_client_ceiling.py` measures both side by side. Here every
request owns its connection while it runs (no head-of-line blocking), idle
keep-alive connections are reused, and each body chunk is timestamped the moment it
is read from the socket.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import urlsplit


class HTTPFailure(Exception):
    """Transport-level failure; `kind` is one of connect, timeout, read."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    _conn: "_Conn"
    _pool: "Pool"
    _done: bool = False

    async def chunks(self) -> AsyncIterator[tuple[float, bytes]]:
        """Yield (perf_counter at arrival, bytes) for each piece of the body."""
        r = self._conn.reader
        te = self.headers.get("transfer-encoding", "").lower()
        try:
            if "chunked" in te:
                # Parse every complete chunk frame in each socket read, so a burst of events costs
                # one await, not two per frame; all of them carry the time the read returned.
                buf = b""
                while True:
                    data = await r.read(1 << 16)
                    if not data:
                        raise asyncio.IncompleteReadError(buf, None)
                    t = time.perf_counter()
                    buf += data
                    out, pos, end = [], 0, False
                    while True:
                        i = buf.find(b"\r\n", pos)
                        if i < 0:
                            break
                        size = int(buf[pos:i].split(b";", 1)[0], 16)
                        if size == 0:
                            j = buf.find(b"\r\n\r\n", i)  # last chunk, optional trailers, blank line
                            end = j >= 0
                            break
                        if len(buf) < i + 4 + size:
                            break
                        out.append(buf[i + 2:i + 2 + size])
                        pos = i + 4 + size
                    buf = buf[pos:]
                    if out:
                        yield t, b"".join(out)
                    if end:
                        break
            elif "content-length" in self.headers:
                left = int(self.headers["content-length"])
                while left > 0:
                    data = await r.read(min(left, 1 << 16))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(data)
                    yield time.perf_counter(), data
            else:  # body ends when the server closes
                self._conn.reusable = False
                while data := await r.read(1 << 16):
                    yield time.perf_counter(), data
            self._done = True
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            self._conn.reusable = False
            raise HTTPFailure("read", f"stream broken: {exc!r}") from None

    async def read(self) -> bytes:
        return b"".join([c async for _, c in self.chunks()])

    def release(self) -> None:
        """Give the connection back to the pool if the body was read fully, else close it."""
        if self._done and self._conn.reusable and self.headers.get("connection", "").lower() != "close":
            self._pool._idle.append(self._conn)
        else:
            self._conn.close()


class _Conn:
    __slots__ = ("reader", "writer", "reusable")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.reusable = reader, writer, True

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass


class Pool:
    """Keep-alive connections to one origin; a connection serves one request at a time."""

    def __init__(self, base_url: str, *, connect_timeout: float = 10.0):
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        self.prefix = u.path.rstrip("/")
        self.host_header = u.netloc
        self.connect_timeout = connect_timeout
        self._idle: list[_Conn] = []

    async def _connect(self) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=1 << 20), self.connect_timeout)
        except asyncio.TimeoutError:
            raise HTTPFailure("connect", f"no answer from {self.host}:{self.port} in {self.connect_timeout:g}s") from None
        except OSError as exc:
            raise HTTPFailure("connect", f"{self.host}:{self.port}: {exc.strerror or exc}") from None
        return _Conn(reader, writer)

    def _take_idle(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.reader.at_eof() or conn.writer.is_closing():  # the server hung up while it sat idle
                conn.close()
                continue
            return conn
        return None

    async def request(self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None
                      ) -> Response:
        """Send a request; return once the status line and headers have arrived."""
        head = [f"{method} {self.prefix}{path} HTTP/1.1", f"host: {self.host_header}",
                f"content-length: {len(body)}", "accept: */*"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        # A pooled connection may have been closed by the server while idle (keep-alive timeouts: uvicorn
        # closes after 5 s): skip those already seen closed, and if the one taken fails before any
        # response byte, retry once on a new connection, never on another pooled one, which may be as
        # stale (after a pause between sweep points every idle connection is).
        for attempt in (0, 1):
            conn = self._take_idle() if attempt == 0 else None
            fresh = conn is None
            if conn is None:
                conn = await self._connect()
            try:
                conn.writer.write(data)
                status_line = await conn.reader.readuntil(b"\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                conn.close()
                if fresh:
                    raise HTTPFailure("read", f"connection closed before the response: {exc!r}") from None
        try:
            raw = await conn.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            conn.close()
            raise HTTPFailure("read", f"headers cut off: {exc!r}") from None
        hdrs: dict[str, str] = {}
        for line in raw.decode("latin-1").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        parts = status_line.split(b" ", 2)
        if parts[0].startswith(b"HTTP/1.0") and hdrs.get("connection", "").lower() != "keep-alive":
            conn.reusable = False
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            conn.close()
            raise HTTPFailure("read", f"not an HTTP response: {status_line[:80]!r}") from None
        return Response(status, hdrs, conn, self)

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
