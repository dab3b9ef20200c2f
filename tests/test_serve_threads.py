"""Every torch call of the embedded engine runs on its one engine thread (dsr1.serve.server.plan).

A thread that calls into torch gets an OpenMP team of its own; once the process has more OpenMP
threads than cores, libgomp stops spinning between parallel regions and a decode step (hundreds of
short regions) waits on a wake-up at each one: measured 3.5x slower per token on the demo model for
the whole life of a server whose dtype timing had run on its main thread. The observable fact checked
here is the team itself: a start that times the dtype leaves no more threads behind than one that
reads the timing back.
"""

from __future__ import annotations

import os
import sys
import pytest

from tests.serve_util import ServerProc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                                reason="counts threads in /proc; one core makes no OpenMP team to count")


def _threads(srv: ServerProc) -> int:
    return len(os.listdir(f"/proc/{srv.proc.pid}/task"))


def test_timing_the_dtype_at_start_leaves_no_second_openmp_team(demo_model_dir, tmp_path):
    args = [str(demo_model_dir), "--dtype", "auto", "--compile", "off", "--max-concurrent", "2"]
    counts = []
    for start in ("times the dtype", "reads the timing back"):
        srv = ServerProc(args, tmp_path)
        try:
            said = "".join(srv.lines)
            if start == "times the dtype" and "measured now on this CPU" not in said:
                pytest.skip("no dtype timing on this CPU (no bf16 units): nothing runs before the model loads")
            assert ("measured now on this CPU" in said) == (start == "times the dtype"), said
            counts.append(_threads(srv))
        finally:
            assert srv.stop() == 0
    assert (tmp_path / "cache" / "dtype-calibration.json").is_file()
    assert counts[0] == counts[1], f"threads after each start (timing the dtype, then reading it back): {counts}"
