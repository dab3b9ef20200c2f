"""`dsr1 bench` stays light: its help and its core modules import no torch/transformers (STYLE.md point 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "accelerate", "bitsandbytes", "pynvml", "matplotlib")

PROBE = """
import json, sys
sys.argv = ["dsr1", "bench", "--help"]
from dsr1.cli import main
try:
    main()
except SystemExit:
    pass
import dsr1.commands.bench, dsr1.bench.sweep, dsr1.bench.client, dsr1.bench.load, dsr1.bench.metrics
import dsr1.bench.report, dsr1.bench.plots, dsr1.bench.workload, dsr1.bench.server, dsr1.bench.loopback
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
""" % (HEAVY,)


def test_bench_help_and_core_import_nothing_heavy():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "--concurrency" in out.stdout and "compare" in out.stdout
    assert json.loads(lines[-1]) == []
