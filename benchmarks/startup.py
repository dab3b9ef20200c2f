"""Cold start-up of `dsr1 --help` and `dsr1 doctor`, as a ratio to `python -c pass`.

Run: python benchmarks/startup.py [--runs 7]
Each command runs in a fresh interpreter; the median wall time of N runs is
reported with its ratio to the bare interpreter. Target: doctor under 0.5 s here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def wall(argv: list[str], runs: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    py = sys.executable
    base = wall([py, "-c", "pass"], args.runs)
    rows = [("python -c pass", base)]
    for label, argv in [("dsr1 --help", ["--help"]), ("dsr1 doctor", ["doctor"]), ("dsr1 doctor --json", ["doctor", "--json"])]:
        rows.append((label, wall([py, "-m", "dsr1", *argv], args.runs)))
    print(f"{'command':<22}{'median s':>10}{'x python':>10}")
    for label, t in rows:
        print(f"{label:<22}{t:>10.3f}{t / base:>10.1f}")
    doctor = rows[2][1]
    print(f"doctor under 0.5 s: {'yes' if doctor < 0.5 else 'NO'} ({doctor:.3f} s)")


if __name__ == "__main__":
    main()
