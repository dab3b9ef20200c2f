"""Whether compiling the decode step pays on this CPU, measured: how `--compile auto` decides.

Why a measurement and not the CPU's flags: the compiled step (inductor, frozen weights, its own GEMM
micro-kernels) measured 1.6x faster than eager on a Xeon with AMX, 3.2x faster at one row on a 2-core
AMD EPYC without AMX for the demo model (Python overhead dominates a 135M step) and 1.4x for the
1.5B shape, where the GEMMs do (issue 14/14). Whether it wins depends on the CPU, the model's shapes
and the torch build, so it is timed here, on the model being served: its first decoder layer plus
the final norm and LM head, compiled just in time exactly as the whole step is (fastpath.FrozenStep,
COMPILE_OPTIONS), against the same layer eager with oneDNN-packed weights (what serve runs when not
compiling), at one row, where compiling matters most. Compiling the probe takes ~15-60 s on two cores;
the result is kept in DSR1_HOME/cache/compile-calibration.json under the CPU, torch version, thread
count and the model's shapes, so it is measured once per machine and model shape. Past one row the
compiled and eager steps are timed again per batch size once the whole step is built
(FastForward.measure_rows).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

FILE = "compile-calibration.json"
GAIN = 1.1  # compiled must be this much faster at one row: it costs minutes at the first start and RAM


def _key(ff) -> str:
    from dsr1.serve.aotstep import cpu_identity

    shapes = [getattr(ff, k, None) for k in ("heads", "kv_heads", "head_dim", "q_size", "kv_size", "inter")]
    head = ff.head.shape if hasattr(ff.head, "shape") else None
    return (f"{cpu_identity()}|torch {torch.__version__}|threads {torch.get_num_threads()}|{ff.embed.dtype}|"
            f"{shapes}|head {tuple(head) if head else None}")


class _Packed:
    """What `_step` reads for the eager probe: layer 0 and the head packed for oneDNN, as serve packs them."""

    def __init__(self, ff):
        from dsr1.serve.wquant import PACKED, quantize

        ln1, wqkv, bqkv, wo, bo, ln2, wgu, wd = ff.layers[0]
        self.layers = [(ln1, quantize(wqkv, PACKED), bqkv, quantize(wo, PACKED), bo, ln2, quantize(wgu, PACKED),
                        quantize(wd, PACKED))]
        self.embed, self.norm_w, self.cos, self.sin = ff.embed, ff.norm_w, ff.cos, ff.sin
        self.head = quantize(ff.head, PACKED)


@torch.inference_mode()
def _measure(ff) -> dict[str, float]:
    import torch._inductor.config as inductor_config

    from dsr1.serve.fastpath import COMPILE_OPTIONS, FrozenStep, fastest
    from dsr1.serve.wquant import can_pack

    probe = FrozenStep(ff)
    probe._n = 1  # layer 0 only (the parameters of the others are registered, unused: no copies)
    k = torch.zeros(1, ff.kv_heads, 65, ff.head_dim, dtype=ff.embed.dtype, device=ff.device)
    v = torch.zeros_like(k)
    ids = torch.zeros(1, 1, dtype=torch.long, device=ff.device)
    pos = torch.full((1, 1), 63, dtype=torch.long, device=ff.device)
    cols = torch.arange(64, device=ff.device)
    compiled = torch.compile(probe)

    def run_compiled():
        with inductor_config.patch(COMPILE_OPTIONS):
            return compiled(ids, pos, cols, [k], [v])

    t0 = time.perf_counter()
    run_compiled()
    compile_seconds = time.perf_counter() - t0
    # fp32, or no oneDNN: eager runs the plain weights, the probe's own
    src = _Packed(ff) if ff.embed.dtype == torch.bfloat16 and can_pack() else probe
    eager = fastest(lambda: ff._step(ids, pos, cols, [k], [v], src=src), 5)
    return {"compiled": fastest(run_compiled, 5), "eager": eager, "compile_seconds": compile_seconds}


def measure(ff, cache_dir: Path | None) -> dict:
    """{"compiled": s, "eager": s, "compile_seconds": s, "cached": bool}: one layer + head at one row."""
    from dsr1.serve.calibrate import read_saved, write_saved

    key = _key(ff)
    path = cache_dir / FILE if cache_dir else None
    saved = read_saved(path)
    if key in saved:
        return {**saved[key], "cached": True}
    entry = _measure(ff)
    torch._dynamo.reset()  # the probe's graph is not kept: the whole step is compiled (or not) next
    write_saved(path, {**saved, key: entry})  # a read-only home measures again at the next start
    return {**entry, "cached": False}


def choose(ff, cache_dir: Path | None) -> tuple[bool, str]:
    """(compile or not, why) for `--compile auto` on a CPU, from the probe's timings."""
    t = measure(ff, cache_dir)
    gain = t["eager"] / t["compiled"]
    how = "cached measurement" if t["cached"] else "measured now"
    verdict = "on" if gain >= GAIN else "off"
    return gain >= GAIN, (f"auto: {verdict} ({how} on this CPU: one compiled layer + head {gain:.2f}x the eager "
                          f"one's speed at one row; on from {GAIN}x)")
