"""Whether compiling the decode step pays on this CPU, measured: how `--compile auto` decides.

Why a measurement and not the CPU's flags: the compiled step (inductor, frozen weights, its own GEMM
micro-kernels) measured 1.6x faster than eager on a Xeon with AMX, 3.2x faster at one row on a 2-core
AMD EPYC without AMX for the demo model (Python overhead dominates a 135M step) and 1.4x for the
1.5B shape, where the GEMMs do (issue 14/14). Whether it wins depends on the CPU, the model's shapes
and the torch build, so it is timed here, on the model being served: its first decoder layers plus
the final norm and LM head, compiled just in time exactly as the whole step is (fastpath.FrozenStep,
fastpath.compile_options), against the same layers eager with oneDNN-packed weights (what serve runs when not
compiling), at one row, where compiling matters most. Four layers, not one: the LM head weighs as
much as four to five of the 1.5B's layers, and one layer's ~110 MB stays partly in a server CPU's
last-level cache between timed runs, which the whole step's 3.5 GB never does (measured on a Xeon with
AMX: one layer + head said 1.01x, the whole step measured 1.21x faster compiled). The head alone is
timed too, both ways, and the whole step estimated as head + layers x the probe's mean layer.
Compiling the probe takes ~30-90 s on two cores;
the result is kept in DSR1_HOME/cache/compile-calibration.json under the CPU, torch version, thread
count and the model's shapes, so it is measured once per machine and model shape. Past one row the
compiled and eager steps are timed again per batch size once the whole step is built
(FastForward.measure_rows).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

FILE = "compile-calibration.json"
GAIN = 1.1  # compiled must be this much faster at one row: it costs minutes at the first start and RAM


def _key(ff) -> str:
    from dsr1.serve import kernel_edits
    from dsr1.serve.aotstep import cpu_identity
    from dsr1.serve.fastpath import compile_options

    shapes = [getattr(ff, k, None) for k in ("heads", "kv_heads", "head_dim", "q_size", "kv_size", "inter")]
    head = ff.head.shape if hasattr(ff.head, "shape") else None
    # the GEMM kernels the step may compile to: a measurement with other choices says nothing of these
    gemm = compile_options(ff.embed.dtype, ff.device)["max_autotune_gemm_backends"]
    if ff.quant == "int4":  # and the kernel edits dsr1 compiles int4 steps with
        gemm += " " + hashlib.sha256(kernel_edits.TEXT.encode()).hexdigest()[:12]
    return (f"{cpu_identity()}|torch {torch.__version__}|threads {torch.get_num_threads()}|{ff.embed.dtype}|"
            f"{ff.quant or 'plain'}|"
            f"{shapes}|head {tuple(head) if head else None}|layers {len(ff.layers)}|probe {PROBE_LAYERS}|gemm {gemm}|"
            f"batch {BATCH}")


PROBE_LAYERS = 4
# Timed too when one row does not gain: a batch this large. Weight-only int4's compiled step (inductor's
# int4 template) ties with eager at one row and is 2.6x faster per GEMM at sixteen (dsr1.serve.wquant.Frozen).
BATCH = 16


class _Packed:
    """What `_step` reads for the eager probe: the first n layers and the head packed for oneDNN, as
    serve packs them."""

    def __init__(self, ff, n: int):
        from dsr1.serve.wquant import PACKED, quantize

        self.layers = [(ln1, quantize(wqkv, PACKED), bqkv, quantize(wo, PACKED), bo, ln2, quantize(wgu, PACKED),
                        quantize(wd, PACKED)) for ln1, wqkv, bqkv, wo, bo, ln2, wgu, wd in ff.layers[:n]]
        self.embed, self.norm_w, self.cos, self.sin = ff.embed, ff.norm_w, ff.cos, ff.sin
        self.head = quantize(ff.head, PACKED)


@torch.inference_mode()
def _measure(ff, rows: int = 1) -> dict[str, float]:
    from dsr1.serve.fastpath import FrozenStep, compile_options, compiling, fastest
    from dsr1.serve.wquant import can_pack

    layers = len(ff.layers)
    probed = min(PROBE_LAYERS, layers)
    ks = [torch.zeros(rows, ff.kv_heads, 65, ff.head_dim, dtype=ff.embed.dtype, device=ff.device)
          for _ in range(probed)]
    vs = [torch.zeros_like(k) for k in ks]
    ids = torch.zeros(rows, 1, dtype=torch.long, device=ff.device)
    pos = torch.full((rows, 1), 63, dtype=torch.long, device=ff.device)
    cols = torch.arange(64, device=ff.device)
    # int4: eager runs the weight-only kernels it serves with (ff's own weights)
    packed = ff.embed.dtype == torch.bfloat16 and can_pack() and not ff.quant
    options = compile_options(ff.embed.dtype, ff.device)  # the options the step itself is compiled with
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    for n in (probed, 0):  # the first layers + head, then the head alone (the others: registered, unused)
        probe = FrozenStep(ff)
        probe._n = n
        compiled = torch.compile(probe)

        def run_compiled():
            with compiling(options, ff.device):
                return compiled(ids, pos, cols, ks[:n], vs[:n])

        run_compiled()
        # fp32, or no oneDNN: eager runs the plain weights, the probe's own
        src = _Packed(ff, n) if packed else probe
        way = "probed" if n else "head"
        t[f"eager_{way}"] = fastest(lambda: ff._step(ids, pos, cols, ks[:n], vs[:n], src=src), 10)
        t[f"compiled_{way}"] = fastest(run_compiled, 10)

    def whole(way: str) -> float:  # the head + every layer, each as long as the probed ones' mean
        return t[f"{way}_head"] + layers * max(t[f"{way}_probed"] - t[f"{way}_head"], 0.0) / probed

    return {"compiled": whole("compiled"), "eager": whole("eager"), "layers": layers, "probed_layers": probed, **t,
            "compile_seconds": time.perf_counter() - t0}


def measure(ff, cache_dir: Path | None) -> dict:
    """{"compiled": s, "eager": s, ...}: the whole step at one row, estimated from the first layers and
    the head (also kept: {eager,compiled}_probed, those layers + head; {eager,compiled}_head, the head
    alone), "cached": bool; where one row does not gain GAIN, "batch": the same at BATCH rows."""
    from dsr1.serve.calibrate import read_saved, write_saved

    key = _key(ff)
    path = cache_dir / FILE if cache_dir else None
    saved = read_saved(path)
    if key in saved:
        return {**saved[key], "cached": True}
    entry = _measure(ff)
    if entry["eager"] / entry["compiled"] < GAIN:
        torch._dynamo.reset()
        entry["batch"] = _measure(ff, BATCH)
    torch._dynamo.reset()  # the probe's graph is not kept: the whole step is compiled (or not) next
    write_saved(path, {**saved, key: entry})  # a read-only home measures again at the next start
    return {**entry, "cached": False}


def choose(ff, cache_dir: Path | None) -> tuple[bool, str]:
    """(compile or not, why) for `--compile auto` on a CPU, from the probe's timings."""
    t = measure(ff, cache_dir)
    gain = one = t["eager"] / t["compiled"]
    how = "cached measurement" if t["cached"] else "measured now"
    at = "at one row"
    if one < GAIN and "batch" in t:  # one row did not gain: a batch may (measure_rows then picks per size)
        batch = t["batch"]["eager"] / t["batch"]["compiled"]
        at += f", {batch:.2f}x at {BATCH} rows"
        gain = max(one, batch)
    verdict = "on" if gain >= GAIN else "off"
    return gain >= GAIN, (f"auto: {verdict} ({how} on this CPU: compiled step {one:.2f}x the eager one's "
                          f"speed {at}, from {t['probed_layers']} layers and the head timed both ways; "
                          f"on from {GAIN}x)")
