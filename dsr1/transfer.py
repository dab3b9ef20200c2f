"""Moving the bytes of one file: a resumable HTTP body stream into a hashed partial file.

Split from dsr1.download, which decides what to fetch and where it goes; this module only
streams `url` from byte N to the end into a partial file, hashing as it goes.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import queue
import threading
from pathlib import Path
from urllib.parse import urlparse

from dsr1.errors import AuthError, DiskSpaceError, Dsr1Error, IntegrityError, NetworkError, NotFoundError
from dsr1.fsutil import HASH_BLOCK

READ_CHUNK = 2 << 20  # bytes per read; a kill -9 loses at most (1 + Sink.QUEUE_DEPTH) of these
MAX_STALLS = 5  # consecutive attempts without a single new byte before giving up


WRITEBACK_EVERY = 16 << 20  # start the disk write of each 16 MiB as soon as it is written


@functools.cache
def _sync_file_range():
    """Linux's sync_file_range(2), or None where it is missing (then close()'s fsync does it all)."""
    import ctypes  # here, not at import: `dsr1 --help` imports this module

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the range's dirty pages, do not wait


class Progress:
    """What the sink reports to (dsr1.download.Reporter satisfies it)."""

    def advance(self, n: int) -> None: ...


_TRUNCATE = object()


class Sink:
    """The partial file being appended to, hashed as it grows.

    The caller's thread reads the socket and hashes; a background thread writes the file
    (hashlib and file writes release the GIL, so the two overlap). The queue is short
    (QUEUE_DEPTH chunks), which bounds what a kill -9 can lose to a few MiB. `pos` counts
    bytes handed over."""

    QUEUE_DEPTH = 3

    def __init__(self, path: Path, want_sha256: bool, reporter: Progress):
        self.path = path
        self.fh = open(path, "ab")
        self.pos = self.fh.tell()
        self.reporter = reporter
        self.hasher = hashlib.sha256() if want_sha256 else None
        if self.hasher is not None and self.pos:
            with open(path, "rb") as src:  # re-hash the kept prefix: reading is far cheaper than fetching
                while chunk := src.read(HASH_BLOCK):
                    self.hasher.update(chunk)
        self._q: queue.Queue = queue.Queue(maxsize=self.QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="dsr1-sink", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        # Write-behind: the file must be fsync'd before it is renamed into place (a crash must not
        # leave a complete-looking file with holes). Left to the end, that fsync writes the whole
        # file after the last byte arrives; starting each 16 MiB's writeback as it is written lets
        # the disk work while the network does, so the final fsync has only the tail to wait for.
        start_writeback = _sync_file_range()
        fd = self.fh.fileno()
        flushed = written = self.pos
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None:
                continue
            try:
                if item is _TRUNCATE:
                    self.fh.flush()
                    os.ftruncate(self.fh.fileno(), 0)
                    flushed = written = 0
                else:
                    self.fh.write(item)
                    written += len(item)
                    if start_writeback is not None and written - flushed >= WRITEBACK_EVERY:
                        self.fh.flush()
                        start_writeback(fd, flushed, written - flushed, _SYNC_FILE_RANGE_WRITE)
                        flushed = written
            except BaseException as exc:  # re-raised in the caller's thread by _check
                self._error = exc

    def _check(self) -> None:
        exc = self._error
        if exc is None:
            return
        # Raw OSErrors become Dsr1Errors, so stream() never mistakes them for a dropped connection
        # (DiskSpaceError is an OSError too: close() hands it back here as it is).
        if isinstance(exc, OSError) and not isinstance(exc, Dsr1Error):
            kept = self.path.stat().st_size if self.path.exists() else 0
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskSpaceError(
                    f"disk full while writing {self.path} ({kept / 1e9:.2f} GB of it kept)",
                    hint="free some space and run the same command again: it continues where it stopped") from None
            raise Dsr1Error(f"cannot write {self.path}: {exc.strerror or exc} ({kept / 1e9:.2f} GB of it kept)",
                            hint="check that the disk is writable and healthy, then run the same command again: "
                                 "it continues where it stopped") from None
        raise exc

    def write(self, data: bytes) -> None:
        self._check()
        if self.hasher is not None:
            self.hasher.update(data)  # here, in parallel with the writer thread's write()
        self._q.put(data)
        self.pos += len(data)
        self.reporter.advance(len(data))

    def reset(self) -> None:
        """The server ignored our Range header and is sending the whole file."""
        self._q.put(_TRUNCATE)
        if self.hasher is not None:
            self.hasher = hashlib.sha256()
        self.reporter.advance(-self.pos)
        self.pos = 0

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        try:
            self._check()
            self.fh.flush()
            os.fsync(self.fh.fileno())
        except OSError as exc:
            self._error = exc
            self._check()
        finally:
            self.fh.close()


def auth_headers(url: str, endpoint: str, token: str | None) -> dict:
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers(token=token or False)
    headers["Accept-Encoding"] = "identity"  # byte ranges must address the stored bytes
    # Like the hub client: the token never leaves the hub's origin (CDN URLs are pre-signed).
    if urlparse(url)[:2] != urlparse(endpoint)[:2] or urlparse(url).port != urlparse(endpoint).port:
        headers.pop("authorization", None)
        headers.pop("Authorization", None)
    return headers


@functools.lru_cache(maxsize=1)
def _opener():
    """urllib opener for file bodies: environment proxies as usual, certifi's CA bundle like
    httpx, and redirects that drop the token when they leave the origin (as the hub client does)."""
    import ssl
    import urllib.request

    try:
        import certifi

        ctx = ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        ctx = ssl.create_default_context()

    class _Redirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is not None and urlparse(newurl).netloc != urlparse(req.full_url).netloc:
                new.remove_header("Authorization")
            return new

    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _Redirect())


class Cancelled(Exception):
    """Another download of the same pull failed or was interrupted."""


def stream(url: str, headers: dict, sink: Sink, size: int, timeout: float,
           cancel: threading.Event | None = None) -> None:
    """GET url into sink from sink.pos to size, resuming with Range after dropped connections.

    Metadata goes through huggingface_hub's httpx client; the file body is read with the
    standard library's `readinto` into a ring of reused 2 MiB buffers: on this machine httpx's
    64 KiB reads through h11 ran at under half of curl's speed, `readinto` at curl's
    (benchmarks/pull_download.py)."""
    import http.client
    import urllib.error
    import urllib.request

    opener = _opener()
    # A ring of buffers, one more than the sink's queue can hold plus the one it is writing:
    # a buffer is reused only after the writer thread has finished with it, so no copies.
    ring = [memoryview(bytearray(READ_CHUNK)) for _ in range(Sink.QUEUE_DEPTH + 2)]
    turn = 0
    stalls = 0
    cancel = cancel or threading.Event()  # never set: waiting on it is a plain sleep
    while sink.pos < size:
        start = sink.pos
        h = dict(headers)
        if start:
            h["Range"] = f"bytes={start}-"
        last: BaseException | None = None
        try:
            with opener.open(urllib.request.Request(url, headers=h), timeout=timeout) as r:
                if start and r.status == 200:
                    sink.reset()  # the server ignored Range and sends the whole file
                if r.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
                    raise NetworkError(f"{url} answered with Content-Encoding {r.headers['Content-Encoding']}",
                                       hint="a proxy is re-encoding downloads; bypass it or use another --endpoint")
                while True:
                    view = ring[turn % len(ring)]
                    if cancel.is_set():
                        raise Cancelled(url)
                    n = r.readinto(view)
                    if not n:
                        break
                    if sink.pos + n > size:
                        raise IntegrityError(f"{url} sent more than the {size} bytes the hub listed",
                                             hint="run the same command again; if it repeats, try another --endpoint")
                    sink.write(view[:n])
                    turn += 1
        except (Dsr1Error, Cancelled):  # writer failures arrive as Dsr1Error (Sink._check): not a dropped connection
            raise
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise AuthError(f"{url} refused the download (HTTP {exc.code})",
                                hint="set HF_TOKEN to a token with access to this repo") from None
            if exc.code == 404:
                raise NotFoundError(f"{url} is gone (HTTP 404)", hint="run the same command again") from None
            if exc.code == 416:  # our partial is longer than the file: start over
                sink.reset()
            last = exc
        except (http.client.HTTPException, urllib.error.URLError, OSError) as exc:
            last = exc  # dropped connection, reset, timeout: resume below with Range
        if sink.pos < size:
            stalls = 0 if sink.pos > start else stalls + 1
            if stalls >= MAX_STALLS:
                raise NetworkError(f"download of {url} stalled at byte {sink.pos} of {size} ({last})",
                                   hint="run the same command again to continue; to use a mirror pass --endpoint URL")
            if cancel.wait(min(0.2 * 2 ** stalls, 5.0)):
                raise Cancelled(url)
