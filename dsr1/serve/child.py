"""Run `dsr1 serve` as a child process for as long as a block needs it.

`dsr1 chat MODEL`, `dsr1 bench MODEL` and the benchmarks start the real server this way,
exactly as a user would. The child picks its own port (`--port 0`: no race for a port
chosen in advance) and announces itself with the line `dsr1 serve: ready on URL`. Its
output goes to a log file, never to a pipe: nobody reads a pipe after start-up, and a
full pipe would block the server on its next log line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dsr1.errors import ServerError
from dsr1.serve.requestlog import READY  # the line `dsr1 serve` announces itself with

_REPO = str(Path(__file__).resolve().parent.parent.parent)


def log_tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _wait_ready(proc: subprocess.Popen, log: Path, offset: int, timeout: float) -> str:
    """The URL from the ready line the child appends to `log` after byte `offset`."""
    deadline = time.monotonic() + timeout
    while True:
        with open(log, "rb") as f:
            f.seek(offset)
            for line in f.read().decode(errors="replace").splitlines():
                if line.startswith("{") and '"event": "ready"' in line:  # dsr1 serve --log-format json
                    import json

                    return json.loads(line)["url"]
                if line.startswith(READY):
                    return line[len(READY):].strip()
        if proc.poll() is not None:
            raise ServerError(f"dsr1 serve exited with code {proc.returncode} before it was ready:\n{log_tail(log)}",
                              hint=f"run the same `dsr1 serve` by hand to see why; full log: {log}")
        if time.monotonic() > deadline:
            raise ServerError(f"dsr1 serve was not ready within {timeout:g}s:\n{log_tail(log)}",
                              hint=f"allow it more time, or check the log: {log}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM (the server drains running requests), then SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextmanager
def running(model: str, *, log: Path, extra_args: list[str] | None = None, timeout: float = 600.0,
            api_key: str | None = None) -> Iterator[str]:
    """Run `dsr1 serve MODEL --port 0 [extra_args]` until the block ends; yield its base URL.

    The child requires `api_key` (None: no key), not whatever DSR1_API_KEY this process's
    environment holds, so the caller's client and the server agree on the key."""
    env = {**os.environ, "PYTHONPATH": _REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("DSR1_API_KEY", None)
    if api_key:
        env["DSR1_API_KEY"] = api_key  # the environment, not argv: argv is visible to every user in ps
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0  # the log is appended to: skip earlier runs' lines
    cmd = [sys.executable, "-m", "dsr1", "serve", model, "--port", "0", *(extra_args or [])]
    with open(log, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        yield _wait_ready(proc, log, offset, timeout)
    finally:
        stop(proc)
