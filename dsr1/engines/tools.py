"""Running an install's tools: output to install.log and the progress reporter, stopping them
as a whole, one install per engine at a time, free disk. Used by dsr1.engines.install."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

from dsr1.engines import envs
from dsr1.errors import DiskSpaceError, Dsr1Error, NetworkError, NotFoundError
from dsr1.fsutil import free_bytes

# --- progress ------------------------------------------------------------------------

class Reporter:
    """Progress callbacks; the CLI renders them, library callers may ignore them."""

    def stage(self, index: int, total: int, text: str) -> None: ...
    def line(self, text: str) -> None: ...  # the running tool's latest output line
    def progress(self, done: int, total: int) -> None: ...  # a build's [done/total] steps
    def note(self, text: str) -> None: ...


# --- running tools --------------------------------------------------------------------

_NINJA = re.compile(r"^\[(\d+)/(\d+)\]")


class Log:
    """install.log: every tool's output, appended; the last lines kept for error messages."""

    def __init__(self, path: Path):
        self.path = path
        self.tail: list[str] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", buffering=1)

    def write(self, text: str) -> None:
        self.f.write(text if text.endswith("\n") else text + "\n")
        self.tail = (self.tail + [text.rstrip("\n")])[-40:]

    def close(self) -> None:
        self.f.close()


def run(argv: Sequence[str], log: Log, reporter: Reporter, *, cwd: Path | None = None,
         fail: Callable[[int, list[str]], Dsr1Error]) -> None:
    log.write(f"$ {' '.join(map(str, argv))}")
    try:
        # Its own process group, so that stopping it reaches what it started (cmake -> ninja ->
        # compilers; pip's build backends) even when only dsr1 got the signal (kill PID, SIGTERM).
        proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True,
                                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"})
    except OSError as e:
        raise NotFoundError(f"cannot run {argv[0]}: {e.strerror}", hint="install it and run the command again") from None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            text = line.strip()
            if m := _NINJA.match(text):
                reporter.progress(int(m.group(1)), int(m.group(2)))
            if text:
                reporter.line(text)
        rc = proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM: stop the whole group; what it finished is kept
        stop_group(proc)
        raise
    if rc != 0:
        raise fail(rc, log.tail)


def stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def term_as_interrupt() -> Iterator[None]:
    """SIGTERM stops an install as Ctrl-C does (KeyboardInterrupt: tools stopped, the log says how
    far it got, exit 130) instead of killing dsr1 and leaving its build running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def pip_error(what: str, log: Path) -> Callable[[int, list[str]], Dsr1Error]:
    def make(rc: int, tail: list[str]) -> Dsr1Error:
        text = "\n".join(tail)
        last = next((t for t in reversed(tail) if t.strip().startswith("ERROR")), tail[-1] if tail else "")
        again = "run the same command again: it continues"
        if "No space left on device" in text:
            return DiskSpaceError(f"{what}: the disk filled up", hint=f"free space or set DSR1_HOME to a larger disk; {again}")
        if re.search(r"No matching distribution|Could not find a version that satisfies", text):
            return NotFoundError(f"{what}: {last.strip()}",
                                 hint=f"check the package exists for Python {sys.version_info.major}."
                                      f"{sys.version_info.minor} on this platform (pip index versions NAME), "
                                      f"or set PIP_INDEX_URL to a mirror that has it")
        if re.search(r"NewConnectionError|Connection (reset|refused|aborted)|Read timed out|"
                     r"Temporary failure in name resolution|ProxyError|SSLError", text):
            return NetworkError(f"{what}: the package index could not be reached ({last.strip()})",
                                hint=f"check the network or PIP_INDEX_URL; {again}")
        return Dsr1Error(f"{what} failed (exit {rc}): {last.strip()}", hint=f"the full output is in {log}; {again}")
    return make


def build_error(what: str, log: Path, fix: str = "run the same command again to continue the build"
                ) -> Callable[[int, list[str]], Dsr1Error]:
    """A failed build or check: the first line that says error (a compiler's, a Traceback's last)."""
    def make(rc: int, tail: list[str]) -> Dsr1Error:
        if any("No space left on device" in t for t in tail):
            return DiskSpaceError(f"{what}: the disk filled up", hint="free space or set DSR1_HOME to a larger disk")
        first = next((t for t in tail if re.search(r"\berror\b", t, re.I)), tail[-1] if tail else "")
        return Dsr1Error(f"{what} failed (exit {rc}): {first.strip()}", hint=f"the full output is in {log}; {fix}")
    return make


# --- locking, disk ---------------------------------------------------------------------

class InstallLock:
    """One install per engine at a time. The lock file sits beside the engine dir, not in it,
    so that --force may remove the dir while holding it."""

    def __init__(self, name: str):
        self.path = envs.engines_root() / f".{name}.lock"

    def __enter__(self) -> "InstallLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            name = self.path.name[1:-5]
            raise Dsr1Error(f"another `dsr1 engine install {name}` is running (pid {holder})",
                            hint=f"wait for it to finish, or stop it (kill {holder}) and run this again: "
                                 "it continues where that one stopped") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing releases the flock; the file stays (removing it would race)


def check_disk(path: Path, need: int) -> None:
    free = free_bytes(path)
    if free < need:
        raise DiskSpaceError(f"{free / 1e9:.1f} GB free at {path}, the install needs about {need / 1e9:.0f} GB",
                             hint="free space, or set DSR1_HOME to a directory on a larger disk")


def dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime
