"""A process the kernel refuses AMX to (a seccomp filter answering arch_prctl ARCH_REQ_XCOMP_PERM with
EPERM: benchmarks/_noamx.py's `deny_amx`) is treated as a CPU without AMX: the compiled step's GEMM
backends are left as they are off AMX, and its packages are keyed apart from ones built with AMX kernels
(which would die of SIGILL there). Real processes, real filter; only meaningful where the CPU has AMX."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(),
                                reason="the CPU has no AMX: nothing to refuse")

PROBE = """
import json, torch
from dsr1.serve.aotstep import amx_usable, cpu_identity
from dsr1.serve.fastpath import compile_options
print(json.dumps({"usable": amx_usable(), "identity": cpu_identity(),
                  "backends": compile_options(torch.bfloat16, torch.device("cpu")).get("max_autotune_gemm_backends")}))
"""


def _probe(refused: bool) -> dict:
    deny = f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import _noamx; _noamx.deny_amx()\n"
    cmd = [sys.executable, "-c", (deny if refused else "") + PROBE]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_process_refused_amx_takes_the_paths_of_a_cpu_without_it():
    granted, refused = _probe(False), _probe(True)
    assert granted["usable"] is True and granted["backends"] == "CPP"
    assert refused["usable"] is False and refused["backends"] != "CPP"
    assert refused["identity"] == granted["identity"] + "|AMX refused"
