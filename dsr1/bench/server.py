"""Start `dsr1 serve MODEL` for the length of a benchmark run, and stop it after.

The server runs as a subprocess (`python -m dsr1 serve`), exactly as a user would
start it, so the benchmark measures the real server and not an in-process shortcut.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dsr1.errors import ServerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_healthy(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"dsr1 serve exited with code {proc.returncode} before it was ready:\n"
                              f"{_tail(log) if log else ''}",
                              hint=f"run the same `dsr1 serve` by hand to see why; full log: {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise ServerError(f"dsr1 serve did not answer {url}/health within {timeout:g}s",
                      hint=f"raise --server-timeout, or check the log: {log}")


@contextmanager
def serve(model: str, *, log: Path, port: int | None = None, extra_args: list[str] | None = None,
          timeout: float = 600.0) -> Iterator[str]:
    """Run `dsr1 serve MODEL --port P` until the block ends; yield its base URL."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "dsr1", "serve", model, "--port", str(port), *(extra_args or [])]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

