"""What the benchmark scripts share: where the repository is and where the demo model is cached.

Importing this module also puts the repository on sys.path, so a script run as
`python benchmarks/X.py` from anywhere imports this checkout's dsr1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: the test suite's model cache (tests/conftest.py builds it); DSR1_TEST_CACHE moves it
CACHE = Path(os.environ.get("DSR1_TEST_CACHE", REPO / ".cache" / "test-models"))


def pythonpath(code: Path) -> str:
    """PYTHONPATH for a server running the dsr1 at `code`: it first, then the caller's (benchmarks/_noamx.py
    puts its folder there for every Python process below it)."""
    return os.pathsep.join(filter(None, (str(code), os.environ.get("PYTHONPATH"))))


def demo_model() -> str:
    """The demo model (SmolLM2-135M-Instruct as bf16 safetensors), as the tests cache it."""
    return str(CACHE / "smollm2-135m-bf16")


def cpu_line() -> str:
    """The CPU a figure was measured on, with what decides the fast path's kernels (AVX-512 BF16,
    AMX): every table names it."""
    from dsr1.probe.host import cpu_info

    model, flags = cpu_info()
    bf16 = ", AVX-512 BF16" if "avx512_bf16" in flags else ""
    amx = "AMX" if "amx_tile" in flags else "no AMX"
    if amx == "AMX" and os.environ.get("DSR1_BENCH_AMX_DENIED"):  # benchmarks/_noamx.py
        amx = "AMX denied to the process: benchmarks/_noamx.py"
    return f"{model} ({os.cpu_count()} threads{bf16}, {amx})"


def tokens_per_second(one, items) -> float:
    """Run `one(item)` for every item at once (a thread each); the tokens they return per second
    of the wave's wall time."""
    import concurrent.futures as cf
    import time

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(items)) as pool:
        total = sum(pool.map(one, items))
    return total / (time.perf_counter() - t0)
