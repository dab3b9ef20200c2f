"""The compiled decode step, compiled ahead of time (AOTInductor) and kept on disk, so that a
restart of the same model on the same machine loads it in about a second instead of compiling again.

Why not torch.compile's own caches: the step is compiled with freezing (weights become constants,
packed once for inductor's GEMM kernels), and with freezing both of its caches step aside. Measured
with torch 2.13 on the demo model: AOTAutograd's cache bypasses the graph ("Cannot cache a graph with
freezing enabled") and the FX-graph cache bypasses it too ("mkldnn tensors unpickleable": the frozen
graph holds oneDNN-packed weights), so every start traced, lowered and compiled again (95-280 s on two
cores) even with TORCHINDUCTOR_CACHE_DIR kept. AOTInductor compiles the step into a shared library: export
once, compile once, load the library afterwards (kept as the library itself, `step-<key>.so`, not zipped
into a .pt2 package, and its packed weights beside it in `step-<key>.consts`, used in place: see _compile).

One library serves every batch and context: the batch rows, the tokens per row, the context span and
the KV cache's slots and columns are all dynamic dimensions, so `--max-concurrent` and `--max-model-len`
can change without a recompile, and a prompt (or several, padded to one length) is one call of the same
library: on a 2-core Xeon with AMX it prefilled 8 x 256 tokens of the demo model in 388 ms against the
eager forward's 901 (its elementwise ops fused, its GEMMs on the packed weights), without a second copy
of the weights. Only the chosen tokens' logits come out (`pick`). One dynamic graph measured as fast at
one row as a graph made for one row (8.7 vs 9.6-11.1 ms per step on the demo model, 2-core AMD EPYC). The library is keyed by what is frozen or compiled
into it: the weights (a fingerprint of every tensor, below), the model's shapes, the dtype, the CPU,
torch's version and this code; anything else changing makes a new library, never a wrong one.
"""

from __future__ import annotations

import contextlib
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

from dsr1.fsutil import free_bytes
from dsr1.serve import kernel_edits, pages
from dsr1.serve.wquant import Frozen, frozen_mm

log = logging.getLogger(__name__)

KEEP = 3  # packages kept per DSR1_HOME: each holds a packed copy of a model's weights
CONSTANTS = ".consts"  # beside each library: the constants it reads (_save_constants)


def supported(device: torch.device) -> bool:
    """CPU only: on a GPU the step is compiled just in time, as before (an AOT package there has not been
    run on a GPU by this project yet)."""
    return device.type == "cpu"


def amx_usable() -> bool:
    """Whether this process may run AMX tile instructions: the CPU has them and Linux granted the tile
    state (arch_prctl ARCH_REQ_XCOMP_PERM, which this asks for, as inductor does before picking its AMX
    kernels). CPUID alone is not enough: a kernel or a seccomp policy can refuse the state, and then
    inductor, oneDNN and llama.cpp all take their AVX-512 paths (benchmarks/_noamx.py makes that so)."""
    return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx())


def cpu_identity() -> str:
    """The CPU as compiled code depends on it: model name, feature flags and the ISA torch dispatches to,
    and whether AMX was refused where the flags have it (a library built with AMX dies of SIGILL there)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                name += "|" + line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    refused = "|AMX refused" if torch.cpu._is_amx_tile_supported() and not amx_usable() else ""
    return name + "|" + torch.backends.cpu.get_cpu_capability() + refused


def weight_fingerprint(t: torch.Tensor) -> bytes:
    """Shape, dtype and a sample of the values: 16 runs of 256 consecutive values spread over the tensor
    (about 4,096 values); a different checkpoint, a merged adapter or a fine-tune changes them. Few runs,
    not 4,096 single values at a stride: each value read through a file mapping (the checkpoint's, the
    kept int4 set's) makes resident what the page cache holds around it, a page or a whole large folio
    (up to 2 MB): a strided sample read ~0.6 GB of the 1.5B shape's pages at every start for 8 KB of
    values, and 64 runs 74 MB of its kept int8 head, which nothing else reads (the compiled libraries read
    their blocked copy). Hashing every byte would cost seconds per GB at start."""
    flat = t.detach().reshape(-1)
    runs, run = 16, 256
    if flat.numel() <= runs * run:
        sample = flat
    else:
        starts = torch.linspace(0, flat.numel() - run, runs, dtype=torch.float64).long().tolist()
        sample = torch.cat([flat[i : i + run] for i in starts])
    data = sample.float().contiguous().cpu().numpy().tobytes()
    return f"{tuple(t.shape)}{t.dtype}".encode() + hashlib.sha256(data).digest()


def package_key(step: torch.nn.Module, options: dict) -> str:
    """What the package depends on, hashed: weights, shapes, dtype, CPU, torch, compile options, code."""
    h = hashlib.sha256()
    for name, p in step.named_parameters():
        if name in ("cos", "sin"):  # inputs of the package (_Bounded), not frozen into it
            continue
        h.update(name.encode())
        h.update(weight_fingerprint(p))
    ff = step._ff[0]
    shapes = {k: getattr(ff, k) for k in ("heads", "kv_heads", "head_dim", "group", "q_size", "kv_size", "inter",
                                          "eps", "scale") if hasattr(ff, k)}
    meta = {"shapes": shapes, "torch": torch.__version__, "cpu": cpu_identity(), "options": options,
            # the forward's module (dsr1.serve.fastpath, found from the step: no import cycle), this one and
            # dsr1's edits of inductor's kernels compiled into it
            "code": hashlib.sha256((inspect.getsource(inspect.getmodule(type(ff)))
                                    + inspect.getsource(inspect.getmodule(package_key))
                                    + kernel_edits.TEXT).encode()).hexdigest()}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _export(step: torch.nn.Module, cache, one_row: bool = False):
    """The step as an ExportedProgram with every batch/context/cache/table dimension dynamic; with
    `one_row`, one row of one token (a single stream's decode step), the rest dynamic."""
    from torch.export import Dim

    dev = cache.k[0].device
    n, t = (1, 1) if one_row else (min(2, cache.slots), 2)  # above one: export specialises a size-1 dimension
    ids = torch.zeros(n, t, dtype=torch.long, device=dev)
    pos = torch.arange(t, device=dev).repeat(n, 1) + (1 if one_row else 0)  # a position past column 0
    cols = torch.arange(2, device=dev)
    pick = torch.arange(n * t, device=dev)
    rows, span = Dim("rows", min=1, max=1 << 16), Dim("span", min=2, max=1 << 22)
    tokens = Dim("tokens", min=1, max=1 << 16)
    slots, columns = Dim("slots", min=1, max=1 << 16), Dim("columns", min=3, max=(1 << 22) + 1)
    kv = [{0: slots, 2: columns} for _ in cache.k]
    table = {0: Dim("positions", min=2, max=1 << 22)}
    shapes = ({0: rows, 1: tokens}, {0: rows, 1: tokens}, {0: span}, kv, [dict(d) for d in kv], table, dict(table),
              {0: Dim("picked", min=1, max=1 << 22)})
    if one_row:
        shapes = (None, None, *shapes[2:7], None)
    ff = step._ff[0]
    args = (ids, pos, cols, cache.k, cache.v, ff.cos.clone(), ff.sin.clone(), pick)
    if step.lora_sites:  # each row's LoRA adapter id (0: none), one per row of `tokens`
        args += (torch.arange(n, dtype=torch.long, device=dev),)
        shapes += (None if one_row else {0: rows},)
    with torch.no_grad():
        return torch.export.export(_Bounded(step), args, dynamic_shapes=shapes, strict=False)


class _Bounded(torch.nn.Module):
    """The step as it is exported: the RoPE tables are inputs, not frozen constants (their length is the
    cache's context, which may change between starts), plus the facts export needs to keep every size
    dynamic: rows fit the cache, and the span is shorter than the cache's columns (SlotCache keeps one
    spare column for this: with span == columns the KV slice would be the whole row, a layout export
    would otherwise special-case)."""

    def __init__(self, step: torch.nn.Module):
        super().__init__()
        self.step = step

    def forward(self, tokens, pos, cols, ks, vs, cos, sin, pick, adapters=None):
        torch._check(cols.shape[0] < ks[0].shape[2])
        torch._check(tokens.shape[0] <= ks[0].shape[0])
        # with LoRA adapters frozen in, every row takes the stacked matmuls, a base-model row (id 0) with
        # a mask of zeros: one graph for any mix of adapters, as in the eager forward (fastpath._stack)
        masks = None if adapters is None else self.step.lora_masks(adapters)
        return self.step._ff[0]._step(tokens, pos, cols, ks, vs, masks, src=_Weights(self.step, cos, sin), pick=pick)


class _Weights:
    """What `_step` reads: the frozen step's weights, the RoPE tables given."""

    def __init__(self, step, cos, sin):
        self.embed, self.norm_w, self.head, self.layers = step.embed, step.norm_w, step.head_weight, step.layers
        self.cos, self.sin = cos, sin
        self.lora_w = step.lora_w


def room_for(step: torch.nn.Module, root: Path) -> str | None:
    """Why a library cannot be built under `root` (not enough free disk), or None. A build writes the
    shared library (about the size of the weights) beside inductor's intermediate files and headers:
    three times the weights is asked for, as a margin."""
    need = 3 * sum(p.numel() * p.element_size() for p in step.parameters())
    free = free_bytes(root)
    if free < need:
        return f"{free / 1e9:.1f} GB free at {root}, keeping the compiled step needs about {need / 1e9:.1f} GB"
    return None


def load_or_build(step: torch.nn.Module, cache, root: Path, options: dict,
                  progress: Callable[[str], None] = lambda m: None, one_row: bool = False,
                  sibling: Callable | None = None) -> tuple[Callable, str, Path]:
    """The compiled step for `step` (a fastpath.FrozenStep): loaded from `root` when a library with its key
    is there, else exported, compiled and saved first. Returns (callable, "loaded" | "compiled", path).
    `one_row`: the step for one row of one token (`step-<key>.one.so`, beside the model's dynamic one);
    `sibling`: that dynamic one, loaded, whose stored constants this one reads where they are the same bytes
    (the int8 head, blocked alike for both: dsr1.serve.kernel_edits) instead of a copy of its own.
    Compiled in a build directory under `root` and renamed into place, its constants first, so a crash
    never leaves a library that looks whole; one that does not load (damaged or missing constants) is
    removed and built again."""
    key = package_key(step, options)
    path = root / f"step-{key}{'.one' if one_row else ''}.so"
    what = "one-row decode step" if one_row else "decode step"
    return _load_or_build(path, what, step, lambda: _export(step, cache, one_row), options, progress, sibling)


def load_or_build_head(head, package: Path, options: dict, sibling: Callable,
                       progress: Callable[[str], None] = lambda m: None) -> tuple[Callable, str, Path]:
    """The int4 model's int8 LM head alone (a wquant.Frozen), over any number of rows, as a library beside
    the model's dynamic step (`step-<key>.head.so`, that step's `package` path) for the eager forward's
    logits (the row counts it serves: fastpath.measure_rows). Inductor blocks the head for it as for the
    dynamic step, so it reads that step's copy (`sibling`) and stores none: the kept [N, K] head, which
    the eager kernel read, is then read by nothing and stays on disk (the 1.5B shape: 0.23 GB, the 7B
    0.55 GB less resident)."""
    from torch.export import Dim

    module = _Head(head)
    path = package.with_name(package.stem + ".head.so")

    def export():
        # four rows, as many as the dynamic step's example picks (_export): inductor ranks its kernels by
        # the example's row count, and the same kernel blocks the head the same way
        x = torch.zeros(4, head.q.shape[1], dtype=head.scales.dtype)
        with torch.no_grad():
            return torch.export.export(_Holder(module), (x,), dynamic_shapes=({0: Dim("rows", min=1, max=1 << 22)},),
                                       strict=False)

    run, how, path = _load_or_build(path, "LM head", module, export, options, progress, sibling)
    run.dtype = head.scales.dtype  # the rows' dtype it was exported for: callers cast to it
    return run, how, path


class _Head(torch.nn.Module):
    """x @ head.T for an int8 head (wquant.Frozen), as the eager forward computes it."""

    def __init__(self, head):
        super().__init__()
        self.q = torch.nn.Parameter(head.q, requires_grad=False)
        self.scales = torch.nn.Parameter(head.scales, requires_grad=False)

    def forward(self, x):
        return frozen_mm(Frozen("int8", self.q, self.scales, None), x)


class _Holder(torch.nn.Module):
    """A one-input module exported as `step` (the name _save_constants and _load find its weights by)."""

    def __init__(self, step: torch.nn.Module):
        super().__init__()
        self.step = step

    def forward(self, x):
        return self.step(x)


def _load_or_build(path: Path, what: str, step: torch.nn.Module, export: Callable, options: dict,
                   progress: Callable[[str], None], sibling: Callable | None) -> tuple[Callable, str, Path]:
    """load_or_build's work for the library at `path`: `step` the module whose parameters it may read in
    place, `export` its ExportedProgram."""
    root = path.parent
    if path.is_file():
        progress(f"loading the compiled {what}")
        try:
            runner = _load(path, step, sibling)
            os.utime(path)  # most recently used, for _prune
            return runner, "loaded", path
        except Exception as e:  # noqa: BLE001 - any failure to load means: build it again
            log.warning("compiled step %s did not load (%s); compiling it again", path, e)
            path.unlink(missing_ok=True)
            path.with_suffix(CONSTANTS).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    progress(f"compiling the {what} ahead of time (once per model and machine)")
    build = root / f".build-{path.name.removesuffix('.so').replace('.', '-')}-{os.getpid()}"
    try:
        # inductor's own cache dir for the build's intermediate files, under `root` so that the library
        # it writes there is renamed into place (same file system), not copied; the rest is removed
        with temporary_cache_dir(str(build)):
            program = export()
            library, constants = None, None
            if next(step.parameters()).dtype != torch.float32:  # fp32's are oneDNN's own (see _compile)
                try:
                    library, constants = _compile(program, options, apart=True)
                except Exception as e:  # noqa: BLE001 - inductor wraps the cause in its own error
                    if "OpaqueTensorImpl" not in str(e):
                        raise
                    log.info("the compiled step holds oneDNN-packed weights: they are kept inside the library")
            if library is None:
                library, _ = _compile(program, options, apart=False)
            _save_constants(step, constants, build / "constants", sibling)
            del constants  # inductor's packed copies: the next start's are read from the file
            os.replace(build / "constants", path.with_suffix(CONSTANTS))
            os.replace(library, path)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    _prune(root, keep=path)
    _release()
    return _load(path, step, sibling), "compiled", path


def _compile(program, options: dict, apart: bool) -> tuple[str, dict[str, torch.Tensor] | None]:
    """The exported step compiled into one shared library, and with `apart` the constants it reads kept
    out of it (name -> tensor: the frozen weights, inductor's packed copies of them). What
    `aoti_compile_and_package` does before zipping: the zip (.pt2) is left out because loading one
    extracts the library again at every start (measured on the 1.5B shape: 3.6 GB unzipped to a
    temporary directory, 5-27 s depending on the page cache). The constants are kept out of the library
    because AOTInductor's runner copies a library's own constants into memory it allocates, reading them
    through the library's mapping: on the 1.5B shape a restart held the checkpoint's weights, that
    3.7 GB copy and the pages it was read from at once (peak 2.9x the weights plus the KV cache).
    Handed to the runner as tensors it does not own (_load), they are used where they lie. That cannot
    hold oneDNN's opaque packed tensors (inductor packs fp32 weights for oneDNN's linear that way; torch
    2.13 fails to describe them): such a step keeps its constants inside the library, as before."""
    gm = program.module(check_guards=False)
    args, kwargs = program.example_inputs
    extra = ({"aot_inductor.package_constants_in_so": False,
              "aot_inductor.package_constants_on_disk_format": "pickle_weights"} if apart else {})
    with _unique_constant_names(), kernel_edits.patched():
        out = torch._inductor.aot_compile(gm, args, kwargs, options={**options, "aot_inductor.package": True, **extra})
    out = [out] if isinstance(out, str) else out
    libraries = [f for f in out if isinstance(f, str) and f.endswith(".so")]
    weights = [f for f in out if isinstance(f, dict)]  # torch.export's Weights: name -> (tensor, properties)
    if len(libraries) != 1 or len(weights) != int(apart):
        raise RuntimeError(f"AOTInductor wrote {len(libraries)} shared libraries and {len(weights)} weight "
                           f"sets, expected one library{' and its weights' if apart else ''}: {libraries}")
    return libraries[0], ({name: t for name, (t, _) in weights[0].items()} if apart else None)


@contextlib.contextmanager
def _unique_constant_names():
    """Inductor names a constant it makes (a GEMM template's packed weight) `constant<N>`, N the number of
    constants so far; the template then prunes the unpacked one, N falls, and a later packed weight gets a
    name taken already, made unique as `constant<N>_0` but recorded with the same original name. The
    weights handed out apart from the library (and the runner's name -> original-name map) are keyed by
    that original name, so three different matrices became one: with LoRA adapters in the step (three
    GEMMs per site) the bf16 library read the q/k/v weight where the adapters' were (torch 2.13). Names
    that were never given before are asked for instead, so every constant's original name is its own."""
    from torch._inductor.graph import GraphLowering

    allocate = GraphLowering.allocate_non_dup_const_name

    def unique(self, name, data):
        if name is None:
            used = set(self.constants) | set(self.allocated_constant_name.values())
            i = len(self.constants)
            while f"constant{i}" in used:
                i += 1
            name = f"constant{i}"
        return allocate(self, name, data)

    GraphLowering.allocate_non_dup_const_name = unique
    try:
        yield
    finally:
        GraphLowering.allocate_non_dup_const_name = allocate


def _save_constants(step: torch.nn.Module, constants: dict[str, torch.Tensor] | None, dest: Path,
                    sibling: Callable | None = None) -> None:
    """The library's constants to `dest`: those that are the step's own weights by name, shape and value
    (the exported module holds the step as `step`) are recorded by name only and handed over from the
    live model at load, not stored twice; so are those equal to one the `sibling` library stores (by its
    name there); the rest (inductor's packed layouts) are stored. torch.save's
    format, read back by torch.load with weights_only (no code runs) and mmap (no copy). None: the
    library holds its constants itself, which the file says (a library built without them must never
    run without them, so a start that finds no file builds again)."""
    if constants is None:
        torch.save({"inside": True}, dest)
        return
    params = dict(step.named_parameters())
    same = lambda a, b: (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()  # noqa: E731
                         and torch.equal(a, b))
    theirs = getattr(sibling, "stored", {})
    live, stored, shared = {}, {}, {}
    with torch.no_grad():
        for name, t in constants.items():
            own = name.removeprefix("step.") if name.startswith("step.") else None
            p = params.get(own)
            if p is not None and same(p, t):
                live[name] = own
            elif (other := next((n for n, o in theirs.items() if same(o, t)), None)) is not None:
                shared[name] = (other, list(t.shape), str(t.dtype))
            else:
                stored[name] = t
    torch.save({"live": live, "stored": stored, "sibling": shared}, dest)


def _load(path: Path, step: torch.nn.Module, sibling: Callable | None = None) -> Callable:
    """The library loaded by AOTInductor's runner, called as the exported step is, its constants handed to
    it as tensors it uses in place (user-managed): the step's own weights from the live model, the packed
    ones mapped from the constants file (read from the page cache as they are used, not copied) or, where
    the file says so, the `sibling` library's (_save_constants). The
    callable keeps every one of them alive (`shared`: the live ones; none where the library holds its
    constants itself) for as long as the runner is used."""
    from torch.utils import _pytree as pytree

    # Inductor's AMX kernels in the library need this process's permission for the AMX tile state
    # (Linux: arch_prctl ARCH_REQ_XCOMP_PERM), which inductor asks for while compiling and oneDNN at its
    # first AMX call. A restart that loaded the library and sent a prompt through it before any oneDNN
    # call died with SIGILL (2-core Xeon with AMX).
    amx_usable()
    saved = torch.load(path.with_suffix(CONSTANTS), mmap=True, weights_only=True)  # none: built again
    runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
    out_spec = pytree.treespec_loads(runner.get_call_spec()[1])

    def run(*args):
        flat = [x for x in pytree.tree_leaves((args, {})) if isinstance(x, torch.Tensor)]
        return pytree.tree_unflatten(runner.run(flat), out_spec)

    run.runner = runner  # benchmarks/package_constants.py hands it other copies of the constants
    if saved.get("inside"):  # constants inside the library (oneDNN's: _compile)
        _drop_mapped(path)
        return run
    params = dict(step.named_parameters())
    constants = {}
    fqns = runner.get_constant_names_to_original_fqns()
    if len(set(fqns.values())) != len(fqns):  # see _unique_constant_names: one file entry for several
        raise RuntimeError("the library's constants share original names")
    theirs = getattr(sibling, "stored", {})
    for name, fqn in fqns.items():
        live, other = saved["live"].get(fqn), saved.get("sibling", {}).get(fqn)
        if live is not None:
            t = params[live]
        elif other is not None:  # KeyError (no such sibling, or not this one): built again
            t = theirs[other[0]]
            if [list(t.shape), str(t.dtype)] != list(other[1:]):
                raise KeyError(f"the dynamic library's {other[0]} is not the constant this one was built with")
        else:
            t = saved["stored"][fqn]  # KeyError: built again
        constants[name] = t
    runner.update_constant_buffer(constants, False, True, True)  # all of them, used where they lie
    run.constants = constants  # the runner only points at them
    run.stored = saved["stored"]  # what a sibling may read (load_or_build)
    run.shared = [params[n] for n in saved["live"].values()]
    return run


def _drop_mapped(path: Path) -> None:
    """For a library with its constants inside: the file pages of its weights dropped from this process.
    The runner copies every weight out of the library's mapped data section into its own memory, and the
    touched pages of the mapping stayed resident beside that copy (the 1.5B shape: 3.55 GB on top of the
    3.70 GB copy). Dropped (dsr1.serve.pages), they stay in the page cache, so the next start reads the
    library from memory."""
    for lo, hi, name in pages.file_mappings():
        if name.endswith(path.name) and hi - lo >= 64 << 20:  # the weights' section, not the code
            pages.drop(lo, hi)


def _release() -> None:
    """Hand what compiling allocated back to the system: the traced graphs and inductor's copies of the
    weights are garbage by now, but glibc keeps freed heap pages mapped unless asked."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _prune(root: Path, keep: Path) -> None:
    """Keep the libraries of the KEEP most recently used models (each holds a model's packed weights; a
    model's one-row step, `.one.so`, goes with its dynamic one). Packages of the earlier zipped format
    (.pt2) go too: nothing loads them any more."""
    for old in root.glob("step-*.pt2"):
        old.unlink(missing_ok=True)
        old.with_suffix(".rows.json").unlink(missing_ok=True)
    model = lambda p: p.name.split(".")[0]  # noqa: E731 - step-<key>
    packages = sorted(root.glob("step-*.so"), key=lambda p: p.stat().st_mtime, reverse=True)
    recent = [m for m in dict.fromkeys(map(model, packages)) if m != model(keep)]  # newest first, each once
    kept = {model(keep), *recent[: KEEP - 1]}
    for old in [p for p in packages if model(p) not in kept]:
        old.unlink(missing_ok=True)
        old.with_suffix(".rows.json").unlink(missing_ok=True)  # its batch-size timings (fastpath.measure_rows)
        old.with_suffix(CONSTANTS).unlink(missing_ok=True)
    for orphan in root.glob(f"step-*{CONSTANTS}"):  # of a library that failed to load and was removed
        if not orphan.with_suffix(".so").is_file():
            orphan.unlink(missing_ok=True)
