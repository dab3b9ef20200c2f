"""Start a child process that a test stops with Ctrl-C (SIGINT).

A job that a non-interactive shell starts in the background (`cmd &`, as a CI runner may start
.ci/run) has SIGINT and SIGQUIT set to "ignore", and every process below it inherits that. Python
started that way installs no KeyboardInterrupt handler, so a SIGINT a test sends does nothing and
the test waits out its timeout: the five Ctrl-C tests failed in CI that way and passed when run from
a terminal. The child gets SIGINT's default back before it execs, as a terminal's foreground job has;
what dsr1 itself does with an inherited "ignore" (it keeps it, as any Unix program should) is not
what these tests are about.
"""

from __future__ import annotations

import signal
import subprocess
import time

import psutil


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen(args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen whose child takes SIGINT as a foreground terminal job does."""
    return subprocess.Popen(args, preexec_fn=_sigint_default, **kwargs)


def wait_for_child(proc: subprocess.Popen, word: str, deadline: float) -> bool:
    """Wait until a process below `proc` has `word` in its command line (True), or `proc` ends or
    time.monotonic() passes `deadline` (False)."""
    while time.monotonic() < deadline and proc.poll() is None:
        for kid in psutil.Process(proc.pid).children(recursive=True):
            try:
                if word in " ".join(kid.cmdline()):
                    return True
            except psutil.Error:  # it ended between the listing and the look
                continue
        time.sleep(0.1)
    return False
