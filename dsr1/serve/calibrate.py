"""Which dtype decodes faster on this CPU, measured rather than assumed.

Whether bf16 or fp32 wins a decode step depends on the CPU: fp32 won at batch 1 on one AVX512
CPU this project ran on, bf16 won at batch 1 and 16 on an AMD EPYC with AVX512-BF16 (issue 10).
A decode step is dominated by the model's matrix-vector products, so this times exactly those,
with the fast path's own matmul: the model's projection shapes (hidden x 2*intermediate, the
fused gate|up; intermediate x hidden, down), streamed from memory as a step streams them, at the
batch sizes that matter, in each dtype, on the threads serve will use. It
takes about a second, and the result is kept in DSR1_HOME/cache/dtype-calibration.json under
the CPU, torch version, thread count and shapes, so it is measured once per machine.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from dsr1.fsutil import atomic_write_bytes

CANDIDATES = ("bf16", "fp32")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time_matmuls(dtype_name: str, hidden: int, inter: int, batch: int, reps: int) -> float:
    import torch

    from dsr1.serve.fastpath import linear  # the matmul the fast path runs, timed as it runs

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    g = torch.Generator().manual_seed(0)
    # A decode step streams every layer's weights from memory once; one small layer timed over
    # and over would sit in cache and favour fp32. Enough copies to fill 256 MB,
    # past most of a server CPU's L3 (this Xeon reports 480 MB shared).
    size = 3 * hidden * inter * torch.empty(0, dtype=dt).element_size()
    copies = max(1, min(64, -(-(256 << 20) // size)))
    layers = [(torch.randn(2 * inter, hidden, generator=g).to(dt), torch.randn(hidden, inter, generator=g).to(dt))
              for _ in range(copies)]
    x = torch.randn(batch, hidden, generator=g).to(dt)

    def step():
        for w_up, w_down in layers:
            linear(linear(x, w_up)[:, :inter], w_down)

    with torch.inference_mode():
        step()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            best = min(best, (time.perf_counter() - t0) / copies)
    return best


def measure(hidden: int, inter: int, batches: tuple[int, ...], cache_dir: Path | None = None) -> dict:
    """{"bf16": {batch: seconds}, "fp32": {...}, "cached": bool} for one MLP's matmuls per decode step."""
    import torch

    key = f"{_cpu_name()}|torch {torch.__version__}|threads {torch.get_num_threads()}|{hidden}x{inter}"
    path = (cache_dir / "dtype-calibration.json") if cache_dir else None
    saved = read_saved(path)
    entry = saved.get(key, {})
    missing = [b for b in batches if str(b) not in entry.get("fp32", {})]
    if missing:
        # scale the work down for big layers: a few reps are plenty to rank two dtypes
        reps = 5 if hidden * inter < 2**26 else 2
        for name in CANDIDATES:
            timings = entry.setdefault(name, {})
            for b in missing:
                timings[str(b)] = _time_matmuls(name, hidden, inter, b, reps)
        saved[key] = entry
        write_saved(path, saved)  # a read-only home only costs a second at the next start
    return {**{n: {int(b): t for b, t in entry[n].items()} for n in CANDIDATES}, "cached": not missing}


def read_saved(path: Path | None) -> dict:
    """A calibration file's measurements by key ({} when absent or unreadable: measured again)."""
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_saved(path: Path | None, saved: dict) -> None:
    """Keep measurements for the next start (atomically); a home that cannot be written only means
    measuring again next time."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(saved, indent=1) + "\n").encode())
    except OSError:
        pass


def choose(model_dir: Path, batch: int, cache_dir: Path | None) -> tuple[str, str]:
    """(dtype, reason) for a CPU serving up to `batch` requests at once."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = int(cfg.get("hidden_size") or 0)
    inter = int(cfg.get("intermediate_size") or 0)
    if not hidden or not inter:
        return "bf16", "no hidden/intermediate size in config.json to measure with"
    batches = (1,) if batch <= 1 else (1, batch)
    t = measure(hidden, inter, batches, cache_dir)
    at = batch if batch > 1 else 1
    return pick(t["bf16"][at], t["fp32"][at], at, "cached measurement" if t["cached"] else "measured now")


def pick(bf: float, fp: float, batch: int, how: str) -> tuple[str, str]:
    """(dtype, why) from the two timings (seconds per step) at `batch`."""
    choice = "bf16" if bf <= fp else "fp32"
    faster = max(bf, fp) / min(bf, fp)
    return choice, (f"{how} on this CPU: {choice} {faster:.2f}x faster than "
                    f"{'fp32' if choice == 'bf16' else 'bf16'} for this model's matmuls at batch {batch}")


def cache_dir_for(home: Path) -> Path:
    return Path(os.environ.get("DSR1_CALIBRATION_DIR") or home / "cache")
