"""What the embedded engine will run with, decided by the plan before anything is loaded (no torch).

dsr1.plan calls these for the embedded engine so that `dsr1 serve --dry-run` prints what serve then
does: the compute dtype, whether the decode step is compiled, the fast path, the prefix cache. The
server (dsr1.serve.server) takes the plan's decisions; what only a loaded model or a timing can
tell (a dtype measured at start because no measurement was cached, the KV cache the RAM left after
loading really holds) it records on the plan as measured.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ARCHS = ("llama", "qwen2")  # what the lean forward (dsr1.serve.fastpath) implements
MEASURE = "measure"  # the dtype is timed at start (no cached measurement on this CPU yet)
# --compile auto on a CPU: decided at start by timing four compiled layers and the head against eager
# (dsr1.serve.compileprobe); the plan, made before anything is loaded, says so and leaves it off
COMPILE_AT_START = "auto: timed at start on this CPU (four compiled layers and the head against eager)"


def fast_path_reason(config: dict, *, enabled: bool = True, quantized: bool = False,
                     devices: int = 1) -> str | None:
    """Why a model with this config.json cannot take the fast path, or None when it can."""
    if not enabled:
        return "turned off (--no-fast-path)"
    cfg = config.get("text_config") or config
    if cfg.get("model_type") not in ARCHS:
        return f"architecture {cfg.get('model_type')!r} (the fast path covers {', '.join(ARCHS)})"
    if devices != 1:
        return "weights spread over several devices or offloaded (device_map)"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"activation {cfg.get('hidden_act')!r}"
    if cfg.get("use_sliding_window"):
        return "sliding-window attention"
    if cfg.get("mlp_bias"):
        return "biased MLP projections"
    if quantized:
        return "bitsandbytes-quantized weights"
    return None


def _torch_threads(threads: int | None) -> int:
    import psutil

    return threads or int(os.environ.get("OMP_NUM_THREADS") or psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def cached_dtype(config: dict, batch: int, cache_dir: Path) -> tuple[str, str] | None:
    """The dtype a cached calibration (dsr1.serve.calibrate, same key) picked on this CPU, or None."""
    from importlib.metadata import PackageNotFoundError, version

    from dsr1.serve import calibrate

    hidden, inter = int(config.get("hidden_size") or 0), int(config.get("intermediate_size") or 0)
    try:
        torch_version = version("torch")
        saved = json.loads((cache_dir / "dtype-calibration.json").read_text())
    except (PackageNotFoundError, OSError, ValueError):
        return None
    key = f"{calibrate._cpu_name()}|torch {torch_version}|threads {_torch_threads(None)}|{hidden}x{inter}"
    entry = saved.get(key)
    at = batch if batch > 1 else 1
    try:
        bf, fp = float(entry["bf16"][str(at)]), float(entry["fp32"][str(at)])
    except (TypeError, KeyError, ValueError):
        return None
    return calibrate.pick(bf, fp, at, "cached measurement")


def dtype(requested: str, *, device: str, gpu_bf16: bool, cpu_bf16: bool, config: dict | None, batch: int,
          cache_dir: Path) -> tuple[str, str]:
    """(dtype, why): the flag; on a GPU bf16 where it has it; fp32 on a CPU without bf16 units; on a CPU
    with them, the cached timing of this model's matmuls, else MEASURE (timed at start, then cached)."""
    if requested != "auto":
        return requested, f"--dtype {requested}"
    if device == "cuda":
        return ("bf16", "GPU supports bf16") if gpu_bf16 else ("fp16", "GPU lacks bf16")
    if not cpu_bf16:
        return "fp32", "CPU without bf16 units"
    if not config or not config.get("hidden_size") or not config.get("intermediate_size"):
        return "bf16", "CPU has bf16 units (no hidden/intermediate size in config.json to time)"
    cached = cached_dtype(config, batch, cache_dir)
    if cached is not None:
        return cached
    return MEASURE, "bf16 or fp32, timed on this CPU at start (the result is cached for the next plan)"


def compile_choice(requested: str | None, *, fast_reason: str | None, device: str, dtype: str,
                   weights_bytes: int, spare_bytes: int,
                   weights: str | None = None) -> tuple[bool, str]:
    """Whether the embedded engine compiles its decode step, and why (measured: docs/performance.md)."""
    from dsr1 import settings
    from dsr1.errors import ConfigError, UsageError

    requested = settings.resolve("compile", flag=requested, default="auto", kind=str).value
    if requested not in ("auto", "on", "off"):
        raise UsageError(f"--compile {requested!r}", hint="use auto, on or off")
    if fast_reason is not None:
        if requested == "on":
            raise ConfigError(f"--compile on needs the embedded engine's fast path: {fast_reason}",
                              hint="drop --compile")
        return False, f"transformers forward: {fast_reason}"
    if weights and weights != "int4":
        # int8 runs fbgemm's dynamic int8 linear, an opaque packed object the compiled step cannot hold (and
        # faster than bf16 eager at every batch size measured: dsr1.serve.wquant); int4's weights are plain
        # tensors that inductor's int4 GEMM template takes (2.6x eager at 16 rows, 11x at 256: wquant.Frozen)
        if requested == "on":
            raise ConfigError(f"--compile on does not take weight-only {weights} weights",
                              hint="drop --compile, or use --precision bf16 or int4")
        return False, f"not compiled: the {weights} weights run fbgemm's kernels eager"
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if requested == "on" and device != "cuda" and not compiler:
        raise ConfigError("--compile on needs a C++ compiler for torch.compile on CPU",
                          hint="install g++ (apt-get install g++) or drop --compile")
    if requested != "auto":
        return requested == "on", f"compile {requested}"
    if weights == "int4" and device != "cuda":
        from dsr1.serve import int4vnni

        if int4vnni.suits():
            # Without AMX, int4 runs dsr1's int4 x int8 kernel eager, which no compiled step can hold. On a
            # 2-core AMD EPYC its eager step at one row (46-49 ms, 1.5B shape) matched the compiled int4 step
            # of 2026-12-05 (47 ms) and its GEMMs are 2.2-3.8x PyTorch's int4 kernels from 4 rows on, which is
            # what a compiled step would run (docs/performance.md, issue 14/14): nothing to time at start.
            return False, ("auto: off (int4 runs dsr1's int4 x int8 VNNI kernel eager on this CPU without AMX: "
                           "2-4x PyTorch's int4 kernels per GEMM from 4 rows; --compile on compiles PyTorch's instead)")
    if device == "cuda":
        return False, "auto: off (compiled decode not yet measured on a GPU; --compile on to try it)"
    # The compiled step measured 1.6x faster on a Xeon with AMX (bf16), 1.4-3.2x at one row on an AMD
    # EPYC without AMX and slower there at 16 rows (issue 14/14): the CPU, the model's shapes and the
    # batch decide, so auto times it at start (dsr1.serve.compileprobe, cached per CPU and model shape)
    # and, once the step is built, per batch size (FastForward.measure_rows).
    if dtype in ("bf16", "fp32"):
        if not compiler:
            return False, "auto: off (no C++ compiler for torch.compile; install g++ for a faster decode)"
        # freezing keeps a packed copy of every weight beside the model's own: auto needs room for it
        if spare_bytes < 2.2 * weights_bytes + 2 * 2**30:
            return False, (f"auto: off (compiling keeps a second, packed copy of the weights: "
                           f"{weights_bytes / 2**30:.1f} GiB more than the {spare_bytes / 2**30:.1f} GiB free allows)")
        return False, COMPILE_AT_START
    return False, f"auto: off ({dtype} is not timed compiled; --compile on to try it)"
