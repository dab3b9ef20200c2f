"""The compiled decode step, compiled ahead of time (AOTInductor) and kept on disk, so that a
restart of the same model on the same machine loads it in about a second instead of compiling again.

Why not torch.compile's own caches: the step is compiled with freezing (weights become constants,
packed once for inductor's GEMM kernels), and with freezing both of its caches step aside. Measured
with torch 2.13 on the demo model: AOTAutograd's cache bypasses the graph ("Cannot cache a graph with
freezing enabled") and the FX-graph cache bypasses it too ("mkldnn tensors unpickleable": the frozen
graph holds oneDNN-packed weights), so every start traced, lowered and compiled again (95-280 s on two
cores) even with TORCHINDUCTOR_CACHE_DIR kept. An AOTInductor package is the compiled step as a shared
library with its packed weights inside: export once, compile once, `aoti_load_package` afterwards.

One package serves every batch and context: the batch rows, the context span and the KV cache's slots
and columns are all dynamic dimensions, so `--max-concurrent` and `--max-model-len` can change without
a recompile (one dynamic graph measured as fast at one row as a graph made for one row: 8.7 vs 9.6-11.1
ms per step on the demo model, 2-core AMD EPYC). The package is keyed by what is frozen or compiled
into it: the weights (a fingerprint of every tensor, below), the model's shapes, the dtype, the CPU,
torch's version and this code; anything else changing makes a new package, never a wrong one.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import inspect
import json
import os
import logging
import platform
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

from dsr1.download import free_bytes

log = logging.getLogger(__name__)

KEEP = 3  # packages kept per DSR1_HOME: each holds a packed copy of a model's weights
MADV_PAGEOUT = 21  # <linux/mman.h>


def supported(device: torch.device) -> bool:
    """CPU only: on a GPU the step is compiled just in time, as before (an AOT package there has not been
    run on a GPU by this project yet)."""
    return device.type == "cpu"


def _cpu() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                name += "|" + line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return name + "|" + torch.backends.cpu.get_cpu_capability()


def _fingerprint(t: torch.Tensor) -> bytes:
    """Shape, dtype and a strided sample of the values (about 4,096 per tensor): a different checkpoint,
    a merged adapter or a fine-tune changes them; hashing every byte would cost seconds per GB at start."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step].float().contiguous().cpu().numpy().tobytes()
    return f"{tuple(t.shape)}{t.dtype}".encode() + hashlib.sha256(sample).digest()


def package_key(step: torch.nn.Module, options: dict) -> str:
    """What the package depends on, hashed: weights, shapes, dtype, CPU, torch, compile options, code."""
    h = hashlib.sha256()
    for name, p in step.named_parameters():
        if name in ("cos", "sin"):  # inputs of the package (_Bounded), not frozen into it
            continue
        h.update(name.encode())
        h.update(_fingerprint(p))
    ff = step._ff[0]
    shapes = {k: getattr(ff, k) for k in ("heads", "kv_heads", "head_dim", "group", "q_size", "kv_size", "inter",
                                          "eps", "scale") if hasattr(ff, k)}
    meta = {"shapes": shapes, "torch": torch.__version__, "cpu": _cpu(), "options": options,
            # the forward's module (dsr1.serve.fastpath, found from the step: no import cycle) and this one
            "code": hashlib.sha256((inspect.getsource(inspect.getmodule(type(ff)))
                                    + inspect.getsource(inspect.getmodule(package_key))).encode()).hexdigest()}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _export(step: torch.nn.Module, cache):
    """The step as an ExportedProgram with every batch/context/cache/table dimension dynamic."""
    from torch.export import Dim

    dev = cache.k[0].device
    n = min(2, cache.slots)
    ids = torch.zeros(n, 1, dtype=torch.long, device=dev)
    pos = torch.zeros(n, 1, dtype=torch.long, device=dev)
    cols = torch.arange(2, device=dev)
    rows, span = Dim("rows", min=1, max=1 << 16), Dim("span", min=2, max=1 << 22)
    slots, columns = Dim("slots", min=1, max=1 << 16), Dim("columns", min=3, max=(1 << 22) + 1)
    kv = [{0: slots, 2: columns} for _ in cache.k]
    table = {0: Dim("positions", min=2, max=1 << 22)}
    shapes = ({0: rows}, {0: rows}, {0: span}, kv, [dict(d) for d in kv], table, dict(table))
    ff = step._ff[0]
    with torch.no_grad():
        return torch.export.export(_Bounded(step), (ids, pos, cols, cache.k, cache.v, ff.cos.clone(), ff.sin.clone()),
                                   dynamic_shapes=shapes, strict=False)


class _Bounded(torch.nn.Module):
    """The step as it is exported: the RoPE tables are inputs, not frozen constants (their length is the
    cache's context, which may change between starts), plus the facts export needs to keep every size
    dynamic: rows fit the cache, and the span is shorter than the cache's columns (SlotCache keeps one
    spare column for this: with span == columns the KV slice would be the whole row, a layout export
    would otherwise special-case)."""

    def __init__(self, step: torch.nn.Module):
        super().__init__()
        self.step = step

    def forward(self, tokens, pos, cols, ks, vs, cos, sin):
        torch._check(cols.shape[0] < ks[0].shape[2])
        torch._check(tokens.shape[0] <= ks[0].shape[0])
        return self.step._ff[0]._step(tokens, pos, cols, ks, vs, src=_Weights(self.step, cos, sin))


class _Weights:
    """What `_step` reads: the frozen step's weights, the RoPE tables given."""

    def __init__(self, step, cos, sin):
        self.embed, self.norm_w, self.head, self.layers = step.embed, step.norm_w, step.head, step.layers
        self.cos, self.sin = cos, sin


def room_for(step: torch.nn.Module, root: Path) -> str | None:
    """Why a package cannot be built under `root` (not enough free disk), or None. A build needs the
    package's shared library and the package itself, each about the size of the weights, plus
    inductor's headers: three times the weights is asked for."""
    need = 3 * sum(p.numel() * p.element_size() for p in step.parameters())
    free = free_bytes(root)
    if free < need:
        return f"{free / 1e9:.1f} GB free at {root}, keeping the compiled step needs about {need / 1e9:.1f} GB"
    return None


def load_or_build(step: torch.nn.Module, cache, root: Path, options: dict,
                  progress: Callable[[str], None] = lambda m: None) -> tuple[Callable, str, Path]:
    """The compiled step for `step` (a fastpath.FrozenStep): loaded from `root` when a package with its key
    is there, else exported, compiled and saved first. Returns (callable, "loaded" | "compiled", path).
    Written to a temporary name and renamed, so a crash never leaves a package that looks whole; a
    package that does not load (damaged on disk) is removed and built again."""
    key = package_key(step, options)
    path = root / f"step-{key}.pt2"
    if path.is_file():
        progress("loading the compiled decode step")
        try:
            runner = _load(path, key)
            os.utime(path)  # most recently used, for _prune
            return runner, "loaded", path
        except Exception as e:  # noqa: BLE001 - any failure to load means: build it again
            log.warning("compiled step %s did not load (%s); compiling it again", path, e)
            path.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    progress("compiling the decode step ahead of time (once per model and machine)")
    build = root / f".build-{key}-{os.getpid()}"
    tmp = root / f".step-{key}.{os.getpid()}.tmp.pt2"
    try:
        # inductor's own cache dir for the build's intermediate files (a shared library as large as the
        # package among them), removed afterwards: the package is self-contained
        with temporary_cache_dir(str(build)):
            torch._inductor.aoti_compile_and_package(_export(step, cache), package_path=str(tmp),
                                                     inductor_configs=dict(options))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(build, ignore_errors=True)
    _prune(root, keep=path)
    _release()
    return _load(path, key), "compiled", path


def _load(path: Path, key: str) -> Callable:
    """aoti_load_package, then the file pages of the library's weights handed back. The runtime copies
    every weight out of the library's mapped data section into its own memory, and the touched pages of
    the mapping stayed resident beside that copy: measured on the 1.5B shape, 3.55 GB of file pages on
    top of the 3.70 GB copy. MADV_PAGEOUT (Linux 5.4+) reclaims clean pages only, so nothing written is
    lost; a page read again comes back from the file."""
    runner = torch._inductor.aoti_load_package(str(path))
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as maps:
            for line in maps:
                if key in line:  # the package's library, extracted under a name with the key
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    if hi - lo >= 64 << 20:  # the weights' section, not the code
                        libc.madvise(lo, hi - lo, MADV_PAGEOUT)
    except OSError:  # not Linux/glibc: the pages stay, as without this
        pass
    return runner


def _release() -> None:
    """Hand what compiling allocated back to the system: the traced graphs and inductor's copies of the
    weights are garbage by now, but glibc keeps freed heap pages mapped unless asked."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _prune(root: Path, keep: Path) -> None:
    """Keep the KEEP most recently used packages (each holds a model's packed weights)."""
    packages = sorted(root.glob("step-*.pt2"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in packages if p != keep][KEEP - 1 :]:
        old.unlink(missing_ok=True)
        old.with_suffix(".rows.json").unlink(missing_ok=True)  # its batch-size timings (fastpath.measure_rows)
