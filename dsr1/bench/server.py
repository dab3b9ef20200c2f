"""Waiting for a server the benchmark did not start itself (a port, a /health probe).

`dsr1 bench MODEL` starts `dsr1 serve` through dsr1.serve.child, which reads the
server's own ready line instead.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from dsr1.errors import ServerError
from dsr1.serve.child import log_tail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float) -> None:
    """Until `url`/health answers 200; ServerError if `proc` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"the server exited with code {proc.returncode} before it was ready:\n"
                              f"{log_tail(log) if log else ''}",
                              hint=f"run the same command by hand to see why; full log: {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise ServerError(f"the server did not answer {url}/health within {timeout:g}s",
                      hint=f"allow it more time, or check the log: {log}")
