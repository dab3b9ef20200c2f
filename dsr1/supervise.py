"""Run an engine (vLLM, SGLang, llama-server) as a supervised child process.

The child's output is streamed to our stderr line by line with a prefix (`[vllm] ...`)
and kept in a ring of its last lines, so that when it dies we can say why. Start-up
waits for the engine's health endpoint with a progress line and a deadline; a child
that exits first is reported with its last lines and, where the engine module
recognises them, a diagnosis and a fix. Stopping sends SIGTERM to the child's whole
process group (vLLM and SGLang start worker processes of their own), waits, then
SIGKILL.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, TextIO

from dsr1.errors import ServerError


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if dsr1 dies (even by SIGKILL), so no engine is orphaned
    holding its port and memory (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Child:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None, *, prefix: str,
                 echo: TextIO | None = sys.stderr, keep: int = 200):
        self.argv, self.prefix, self.echo = argv, prefix, echo
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        try:
            self.proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True,  # its own group: stop reaches its workers
                                         preexec_fn=_die_with_parent)
        except OSError as e:
            raise ServerError(f"cannot start {argv[0]}: {e.strerror}",
                              hint="check the engine is installed: dsr1 engine list") from None
        self._reader = threading.Thread(target=self._pump, name=f"{prefix}-log", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            if self.echo is not None:
                try:
                    self.echo.write(f"[{self.prefix}] {line}\n")
                    self.echo.flush()
                except (OSError, ValueError):  # our stderr went away: keep draining the pipe regardless
                    pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def last_lines(self, n: int = 25) -> list[str]:
        self._reader.join(0.5) if not self.alive() else None
        return list(self.tail)[-n:]

    def wait_healthy(self, url: str, *, timeout: float, progress: Callable[[str], None] = lambda m: None,
                     diagnose: Callable[[list[str]], str | None] = lambda lines: None) -> float:
        """Poll `url` until it answers 200; seconds taken. Raises ServerError if the child dies or time runs out."""
        t0 = time.monotonic()
        next_note = t0 + 15
        while True:
            if not self.alive():
                raise self.failure(f"{self.prefix} exited with code {self.proc.returncode} during start-up", diagnose)
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            now = time.monotonic()
            if now - t0 > timeout:
                self.stop(5)
                raise self.failure(f"{self.prefix} was not healthy at {url} within {timeout:g}s", diagnose,
                                   default_hint="allow more time with --start-timeout, or read the log above")
            if now >= next_note:
                progress(f"waiting for {self.prefix} to start ({now - t0:.0f}s)")
                next_note = now + 15
            time.sleep(0.5)

    def failure(self, what: str, diagnose: Callable[[list[str]], str | None],
                default_hint: str = "read the engine's log lines above") -> ServerError:
        lines = self.last_lines()
        fix = diagnose(lines)
        shown = "\n".join(f"  {line}" for line in lines[-15:])
        return ServerError(f"{what}; its last lines:\n{shown}", hint=fix or default_hint)

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM the group (the engine drains), SIGKILL after `grace` seconds. Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        self._reader.join(2)
        return self.proc.returncode
