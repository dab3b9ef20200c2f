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


def demo_model() -> str:
    """The demo model (SmolLM2-135M-Instruct as bf16 safetensors), as the tests cache it."""
    return str(CACHE / "smollm2-135m-bf16")


def tokens_per_second(one, items) -> float:
    """Run `one(item)` for every item at once (a thread each); the tokens they return per second
    of the wave's wall time."""
    import concurrent.futures as cf
    import time

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(items)) as pool:
        total = sum(pool.map(one, items))
    return total / (time.perf_counter() - t0)
