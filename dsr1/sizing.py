"""The plan's sizing: precision, parallel sizes, context, KV budget and concurrency.

Numbers come from dsr1.fit (weights, overheads, KV bytes per token; formulas and their
measured accuracy in docs/performance.md). What each engine adds:

- vLLM fails at start when `--max-model-len` tokens do not fit its KV cache
  (vllm #12865), and its default is the model's full 128K/160K context: the plan
  always passes a context that fits, with the numbers.
- With pipeline parallel each stage holds only its layers' KV; with tensor parallel
  the MLA latent of R1 is replicated on every rank, GQA heads are split.
- SGLang's data-parallel attention keeps one copy of each sequence's KV (not one per
  TP rank), so its capacity in sequences grows with the DP attention size.
"""

from __future__ import annotations

import math
from dataclasses import replace

from dsr1 import catalog, checkpoints, fit
from dsr1.catalog import ModelSpec
from dsr1.errors import HardwareError, UsageError

GiB = 1024**3
R1_GGUF_CONTEXT = 8192  # the published R1 GGUF runs use 8K or less (dsr1/data/gguf_quants.toml)
PULL_QUANT = {"int4": "nf4", "nf4": "nf4", "int8": "int8"}  # plan precision -> `dsr1 pull --quant` (bitsandbytes)
WEIGHT_ONLY = ("int8", "int4")  # precisions the embedded engine's fast path packs itself on a CPU
KV_MARGIN = 0.95  # engines measure activations themselves at start; keep 5% of the KV estimate spare
# Throughput deployments of R1 on SGLang use data-parallel attention (docs/basic_usage/deepseek_v3.md:
# "not recommended for low-latency, small-batch use cases").
DP_ATTENTION_MIN_SEQS = 64
VLLM_CPU_RUNTIME = 2 * GiB  # vLLM's CPU server process (torch, vllm, its front end) beyond fit's embedded runtime
MIN_CONTEXT = 4096
MAX_ADVISED_NODES = 8


def candidates(spec: catalog.ModelSpec, target: fit.Target) -> list[str]:
    """Precisions to try, best quality first, that this target's engines can run."""
    if target.kind == "cpu":
        return ["bf16" if target.supports_bf16 else "fp32", "int8", "nf4"]
    out = []
    if spec.native_dtype == "fp8":
        out += ["fp8"] if target.supports_fp8 else []
    out += ["bf16" if target.supports_bf16 else "fp16"]
    if spec.native_dtype != "fp8" and target.supports_fp8 and target.engine != "embedded":
        out += ["fp8"]  # online FP8 (vLLM/SGLang --quantization fp8); bitsandbytes has no FP8
    # The embedded engine quantizes with bitsandbytes; vLLM/SGLang load AWQ int4 checkpoints.
    out += ["int8", "nf4"] if target.engine == "embedded" else ["int4"]
    return out


def choose_precision(spec: catalog.ModelSpec, target: fit.Target, want: int, *, tp: int | None = None) -> fit.Fit:
    """The best precision that fits with `want` tokens of context, else the best that fits at all,
    else the last tried (with its reason)."""
    best: fit.Fit | None = None
    last: fit.Fit | None = None
    for precision in candidates(spec, target):
        f = fit.estimate(spec, precision, target, tp=tp)
        if f.fits and best is None:
            best = f
        if f.fits and f.max_context >= want:
            return f
        last = f
    assert last is not None
    return best or last


def _tp_options(spec: catalog.ModelSpec, gpus: int) -> list[int]:
    """Tensor-parallel sizes vLLM/SGLang accept here: powers of two up to the GPU count that
    divide the attention heads."""
    out, tp = [], 1
    while tp <= gpus:
        if spec.heads % tp == 0 and gpus % tp == 0:
            out.append(tp)
        tp *= 2
    return out or [1]



def _round_ctx(tokens: int) -> int:
    return tokens // 256 * 256 if tokens >= 1024 else tokens // 16 * 16


def _target(engine: str, device: str, gpus, host, util: float, count: int) -> fit.Target:
    if device == "cuda":
        devs = gpus.gpus
        return fit.Target(kind="cuda", count=count, memory_bytes=min(g.memory_total for g in devs),
                          utilization=util, engine=engine, supports_fp8=all(g.supports_fp8 for g in devs),
                          supports_bf16=all(g.supports_bf16 for g in devs))
    return fit.Target(kind="cpu", count=1, memory_bytes=host.usable_ram, utilization=util, engine="embedded",
                      supports_bf16=host.bf16_fast)


def size(ref, engine, device, gpus, host, prof, o, util, want_seqs, ctx_flag, ctx_default, d) -> dict:
    spec = ref.spec
    if spec is None:
        return _unknown(ref, engine, device, gpus, prof, o, want_seqs, ctx_flag, ctx_default, d)
    if engine == "embedded":
        return _embedded(spec, ref, device, gpus, host, prof, o, util, want_seqs, ctx_flag, ctx_default, d)
    if engine == "llamacpp":
        return _llamacpp(spec, ref, device, gpus, host, o, util, want_seqs, ctx_flag, ctx_default, d)
    if device == "cpu":
        if engine != "vllm":
            raise UsageError(f"--engine {engine} needs GPUs here; on a CPU machine use --engine vllm (its CPU build) "
                             "or embedded", hint="pick --engine auto")
        return _vllm_cpu(spec, host, o, util, want_seqs, ctx_flag, ctx_default, d)
    return _gpu_engine(spec, ref, engine, gpus, o, util, want_seqs, ctx_flag, ctx_default, d)


def _fields(**kw) -> dict:
    base = dict(precision="bf16", quant="none", quantization=None, dtype="bf16", tensor_parallel=1, pipeline_parallel=1,
                data_parallel=1, dp_attention=1, expert_parallel=False, max_model_len=0, max_num_seqs=1,
                kv_bytes_per_token=0.0, kv_budget_bytes=0, kv_capacity_tokens=0, sequences_at_full_context=0,
                weights_bytes_per_device=0, mem_fraction_static=None, threads=None, checkpoint=None,
                checkpoint_format=None, checkpoint_gb=0.0, dtype_reason="", compile=False, compile_reason="",
                fast_path_reason=None, prefix_cache_bytes=0, max_queue=0, gguf_quant=None, placement=None,
                expected_tok_s=None, expected_source=None, weights=None)
    base.update(kw)
    return base


def _unknown(ref, engine, device, gpus, prof, o, want_seqs, ctx_flag, ctx_default, d) -> dict:
    d.warnings.append(f"{ref.name}'s size is unknown until it is pulled: the context ({ctx_flag or ctx_default}) is "
                      "not checked against memory")
    tp = o.tensor_parallel or (len(gpus.gpus) if device == "cuda" and engine in ("vllm", "sglang") else 1)
    return _fields(precision=o.precision or prof.settings.precision, tensor_parallel=tp,
                   pipeline_parallel=o.pipeline_parallel or 1, max_model_len=ctx_flag or ctx_default,
                   max_num_seqs=want_seqs)


def _embedded(spec, ref, device, gpus, host, prof, o, util, want_seqs, ctx_flag, ctx_default, d) -> dict:
    """The embedded engine's plan: precision, the compute dtype, the context the estimated KV cache
    holds, the prefix cache, the compiled step and the fast path, all decided here (dsr1.serve.decide);
    the server runs them, measures the KV cache the RAM really holds after loading and reports any
    difference as measured (dsr1.serve.server.plan)."""
    from dsr1 import settings
    from dsr1.serve import calibrate, decide

    target = _target("embedded", device, gpus, host, util, len(gpus.gpus) if device == "cuda" else 1)
    want = min(ctx_flag or ctx_default, spec.max_context)
    f = fit.estimate(spec, o.precision, target) if o.precision else choose(spec, target, want)
    config = _config(ref, spec)
    asked = o.dtype if o.dtype != "auto" else (o.precision if o.precision in ("bf16", "fp16", "fp32") else "auto")
    dtype, dtype_why = decide.dtype(asked, device=device, gpu_bf16=target.supports_bf16, cpu_bf16=host.bf16_fast,
                                    config=config, batch=want_seqs, cache_dir=calibrate.cache_dir_for(settings.home()))
    if not o.precision and dtype in ("bf16", "fp16", "fp32") and f.precision in ("bf16", "fp16", "fp32") \
            and dtype != f.precision:
        f = fit.estimate(spec, dtype, target)  # the weights are held in the dtype that runs
    quant = ref.quantized if ref.quantized in ("int8", "nf4", "nf4-dq") else PULL_QUANT.get(f.precision, "none")
    weights = None
    if device == "cpu" and f.precision in WEIGHT_ONLY and ref.quantized in (None, "none") and \
            decide.fast_path_reason(config, enabled=o.fast_path) is None:
        # on a CPU the fast path packs bf16 weights into int8/int4 at load (dsr1.serve.wquant): nothing
        # quantized to pull, and PyTorch's weight-only kernels instead of bitsandbytes' (slower than bf16 here)
        weights, quant = f.precision, "none"
    free = max(0.0, f.kv_free_per_device) * f.tp
    kv_tok = spec.kv_bytes_per_token(fit.DTYPE_BYTES.get(dtype if dtype != decide.MEASURE else "bf16", 2.0))
    capacity = int(free // kv_tok) if kv_tok else 0
    ctx = min(want, _round_ctx(capacity // max(1, want_seqs))) if capacity else want
    if not f.fits:
        d.warnings.append(f"{spec.name} does not fit here at {f.precision}: {f.reason}")
    elif ctx_flag and ctx < ctx_flag:
        d.warnings.append(f"--max-model-len {ctx_flag} x {want_seqs} sequences may not fit: about {capacity} tokens "
                          f"of KV cache are free")
    if dtype not in ("bf16", "fp16", "fp32", decide.MEASURE):
        dtype = "bf16" if target.supports_bf16 else "fp16"
    devices = 1 if device == "cpu" or f.weights_per_device * f.tp <= target.memory_bytes * util else f.tp
    fast_why = decide.fast_path_reason(config, enabled=o.fast_path, quantized=quant != "none", devices=devices)
    compile_on, compile_why = decide.compile_choice(
        o.compile, fast_reason=fast_why, device=device, dtype="bf16" if dtype == decide.MEASURE else dtype,
        weights_bytes=int(f.weights_per_device * f.tp), spare_bytes=host.ram_available,
        weights=weights)
    kv_total = int(kv_tok * want_seqs * max(ctx, 0))
    if o.prefix_cache_mb is not None and o.prefix_cache_mb < 0:
        raise UsageError("--prefix-cache-mb must be 0 or more")
    prefix = (o.prefix_cache_mb * 2**20 if o.prefix_cache_mb is not None
              else min(kv_total // 4, max(0, int(free) - kv_total)))
    queue = settings.resolve("max_queue", flag=o.max_queue, default=4 * want_seqs).value
    if queue < 0:
        raise UsageError("--max-queue must be 0 or more")
    return _fields(precision=f.precision, quant=quant, dtype=dtype, max_model_len=max(ctx, 0), max_num_seqs=want_seqs,
                   kv_bytes_per_token=kv_tok, kv_budget_bytes=int(free), kv_capacity_tokens=capacity,
                   sequences_at_full_context=capacity // ctx if ctx else 0,
                   weights_bytes_per_device=int(f.weights_per_device), dtype_reason=dtype_why, compile=compile_on,
                   compile_reason=compile_why, fast_path_reason=fast_why, prefix_cache_bytes=int(prefix), weights=weights,
                   max_queue=int(queue), checkpoint=ref.repo if ref.kind != "dir" else None)


def _config(ref, spec) -> dict:
    """config.json of a local model; for one not pulled yet, the fields the catalog holds."""
    import json
    from pathlib import Path

    if ref.path and (Path(ref.path) / "config.json").is_file():
        try:
            return json.loads((Path(ref.path) / "config.json").read_text())
        except (OSError, ValueError):
            pass
    return {"model_type": spec.architecture, "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
            "hidden_act": "silu"}


def choose(spec, target: fit.Target, want: int) -> fit.Fit:
    return choose_precision(spec, target, want)


def _fit_context(spec: "ModelSpec", free: float, kv_tok: float, ctx_flag, ctx_default, d, *, what: str,
                 fix: str) -> tuple[int, int]:
    """(max_model_len, capacity tokens): the flag's context if it fits (else an error with the
    numbers), else the profile's default lowered to what fits."""
    capacity = int(free * KV_MARGIN // kv_tok) if free > 0 else 0
    need = min(MIN_CONTEXT, spec.max_context)
    if ctx_flag:
        if ctx_flag > spec.max_context:
            raise UsageError(f"--max-model-len {ctx_flag} is beyond {spec.name}'s {spec.max_context} tokens",
                             hint=f"use --max-model-len {spec.max_context} or less")
        if ctx_flag > capacity:
            raise HardwareError(f"--max-model-len {ctx_flag} needs {ctx_flag * kv_tok / GiB:.1f} GiB of KV cache "
                                f"{what}; {free * KV_MARGIN / GiB:.1f} GiB is left after the weights",
                                hint=f"use --max-model-len {_round_ctx(capacity)} or less, or {fix}")
        return ctx_flag, capacity
    want = min(ctx_default, spec.max_context)
    if capacity < need:
        raise HardwareError(f"{spec.name}: room for {capacity} tokens of KV cache {what}, {need} needed",
                            hint=fix)
    ctx = min(want, _round_ctx(capacity))
    if ctx < want:
        d.notes.append(f"context lowered from {want} to {ctx} tokens: what fits the KV cache {what}")
    return ctx, capacity


def _gpu_engine(spec, ref, engine, gpus, o, util, want_seqs, ctx_flag, ctx_default, d) -> dict:
    per_node = len(gpus.gpus)
    nodes = o.nodes
    total = per_node * nodes
    mla_moe = spec.architecture == "deepseek_v3"
    if nodes > 1:
        # vLLM's docs: TP = GPUs per node, PP = nodes; SGLang's: TP across all GPUs (--tp 16 on 2x8).
        tp = o.tensor_parallel or (per_node if engine == "vllm" else total)
        pp = o.pipeline_parallel or (nodes if engine == "vllm" else 1)
    else:
        tp, pp = o.tensor_parallel, o.pipeline_parallel or 1
    target = _target(engine, "cuda", gpus, None, util, total)
    want = min(ctx_flag or ctx_default, spec.max_context)
    f, tp, src = _precision_and_tp(spec, ref, engine, target, want, tp, pp, o.precision, per_node)
    if tp * pp > total:
        raise UsageError(f"tensor parallel {tp} x pipeline parallel {pp} needs {tp * pp} GPUs; "
                         f"{nodes} node(s) x {per_node} have {total}", hint="lower --tensor-parallel/--pipeline-parallel or add --nodes")
    kv_tok = spec.kv_bytes_per_token(2.0, tp=tp) / pp  # bf16/fp16 KV cache
    free = f.kv_free_per_device
    if free <= 0:
        raise HardwareError(f"{spec.name} at {f.precision} ({src.checkpoint.repo}, {src.checkpoint.size_gb:g} GB) needs "
                            f"{f.weights_per_device / GiB:.1f} GiB of weights per GPU over {tp * pp} GPUs; "
                            f"{f.budget_per_device / GiB:.1f} GiB usable per {target.memory_bytes / GiB:.0f} GiB GPU "
                            f"at utilization {util:g}", hint=advice(spec, engine, target, per_node, nodes, want))
    what = f"per GPU at utilization {util:g}"
    fix = "raise --memory-utilization, add GPUs, or lower --max-concurrent"
    ctx, capacity = _fit_context(spec, free, kv_tok, ctx_flag, ctx_default, d, what=what, fix=fix)
    dp_attn = 1
    if engine == "sglang" and mla_moe and (want_seqs >= DP_ATTENTION_MIN_SEQS or nodes > 1):
        dp_attn = nodes if nodes > 1 else tp
        d.notes.append(f"SGLang data-parallel attention x{dp_attn}: one KV copy per sequence instead of one per TP rank "
                       f"(throughput setting for {want_seqs} concurrent sequences)")
    dp = o.data_parallel or (1 if mla_moe else max(1, total // (tp * pp)))
    if dp * tp * pp > total:
        raise UsageError(f"--data-parallel {dp} x tensor {tp} x pipeline {pp} needs {dp * tp * pp} GPUs; {total} here")
    if dp > 1:
        d.notes.append(f"{spec.name} fits {tp * pp} GPU(s): {dp} replicas (data parallel) use all {total}")
    if nodes > 1 and f.fits and _fits_one_node(spec, f.precision, target, per_node, want):
        d.warnings.append(f"{spec.name} fits on one node: independent replicas (one `dsr1 serve` per node behind a load "
                          "balancer) avoid cross-node traffic")
    seqs_full = capacity // ctx * dp_attn if ctx else 0
    if seqs_full < want_seqs:
        d.notes.append(f"at the full {ctx}-token context {seqs_full} sequence(s) fit at once; the engine queues the "
                       f"rest of --max-concurrent {want_seqs} (shorter requests share the cache)")
    _checkpoint_notes(spec, src, target.supports_fp8, d)
    ck = src.checkpoint
    dtype = ck.dtype if ck.precision not in ("bf16", "fp16") else ("bf16" if target.supports_bf16 else "fp16")
    frac = None
    if engine == "sglang":
        # --mem-fraction-static covers weights + KV only; CUDA graphs and activations live outside it.
        frac = round(max(0.5, util - f.overhead_per_device / target.memory_bytes), 2)
    return _fields(precision=f.precision, quant="none", quantization=src.quantization, checkpoint=ck.repo,
                   checkpoint_format=ck.format, checkpoint_gb=ck.size_gb if not src.on_load else 0.0,
                   dtype=dtype, tensor_parallel=tp, pipeline_parallel=pp,
                   data_parallel=dp, dp_attention=dp_attn, expert_parallel=mla_moe and engine == "vllm",
                   max_model_len=ctx, max_num_seqs=want_seqs, kv_bytes_per_token=kv_tok, kv_budget_bytes=int(free),
                   kv_capacity_tokens=capacity, sequences_at_full_context=seqs_full,
                   weights_bytes_per_device=int(f.weights_per_device), mem_fraction_static=frac)


def _fits_one_node(spec, precision, target, per_node, want) -> bool:
    one = fit.Target(kind="cuda", count=per_node, memory_bytes=target.memory_bytes, utilization=target.utilization,
                     engine=target.engine, supports_fp8=target.supports_fp8, supports_bf16=target.supports_bf16)
    f = fit.estimate(spec, precision, one)
    return f.fits and f.max_context >= want


def _precision_and_tp(spec, ref, engine: str, target: fit.Target, want: int, tp: int | None, pp: int,
                      precision: str | None, per_node: int) -> tuple[fit.Fit, int, checkpoints.Source]:
    """Best precision first, among those a real checkpoint or an on-load flag gives this engine; for
    it, the smallest tensor-parallel size that holds `want` tokens (the rest of the GPUs become
    data-parallel replicas). Falls back to what fits at all."""
    tps = [tp] if tp else _tp_options(spec, per_node)
    here = _local_checkpoint(spec, ref)
    if here is not None:  # a stored quantized checkpoint is what it is
        if precision and precision != here.precision:
            raise UsageError(f"{ref.name} is the {here.precision} checkpoint {here.repo}; --precision {precision} "
                             "needs another", hint=f"drop --precision, or serve {spec.name} (dsr1 picks the checkpoint)")
        sources = [(here.precision, checkpoints.Source(here, here.quantization(engine), False))]
    else:
        precs = [precision] if precision else candidates(spec, target)
        sources = [(p, src) for p in precs if (src := checkpoints.source(spec, p, engine, target)) is not None]
        if not sources:
            raise UsageError(f"no checkpoint gives {spec.name} {precision} on {engine} here, and no on-load flag "
                             "does", hint="drop --precision (dsr1 picks one that exists: `dsr1 models` lists them)")
    fallback = last = None
    for prec, src in sources:
        real = None if src.on_load else src.checkpoint.size_bytes
        for t in tps:
            f = fit.estimate(spec, prec, target, tp=t * pp, weights_total=real)
            kv_tok = spec.kv_bytes_per_token(2.0, tp=t) / pp
            cap = f.kv_free_per_device * KV_MARGIN / kv_tok if f.kv_free_per_device > 0 else 0
            last = (f, t, src)
            if f.kv_free_per_device > 0 and cap >= min(MIN_CONTEXT, spec.max_context) and fallback is None:
                fallback = (f, t, src)
            if f.kv_free_per_device > 0 and cap >= want:
                return f, t, src
    assert last is not None
    return fallback or last


def _local_checkpoint(spec, ref) -> "checkpoints.Checkpoint | None":
    """The listed quantized checkpoint `ref` is a local copy of, if it is one."""
    if not ref.local or not ref.repo:
        return None
    c = checkpoints.by_repo(ref.repo)
    return c if c is not None and c.model == spec.name else None


def _checkpoint_notes(spec, src: checkpoints.Source, fp8_units: bool, d) -> None:
    """Say which checkpoint runs, when it is not the model's own."""
    ck = src.checkpoint
    if src.on_load:
        d.notes.append(f"{spec.name} {ck.repo} quantized to FP8 while loading (--quantization {src.quantization})")
    elif ck.repo != spec.repo:
        why = "" if spec.native_dtype != "fp8" else (
            " (the FP8 weights do not fit these GPUs)" if fp8_units else " (these GPUs have no FP8 units)")
        d.notes.append(f"{spec.name} at {ck.precision}{why}: checkpoint {ck.repo} ({ck.format}, {ck.size_gb:g} GB on disk; "
                       f"size: {ck.size_source})")


def advice(spec, engine: str, target: fit.Target, per_node: int, nodes: int, want: int) -> str:
    """The smallest change that makes `spec` fit, computed: the fewest nodes of this kind (at the
    best precision a checkpoint gives at that count), else the largest catalog model that fits."""
    from dsr1 import catalog
    sources = [(p, s) for p in candidates(spec, target) if (s := checkpoints.source(spec, p, engine, target))]
    for n in range(nodes + 1, MAX_ADVISED_NODES + 1):
        gpus = per_node * n
        if engine == "sglang" and spec.heads % gpus:  # SGLang's TP spans every GPU of every node
            continue
        for prec, src in sources:
            f = fit.estimate(spec, prec, replace(target, count=gpus), tp=gpus,
                             weights_total=None if src.on_load else src.checkpoint.size_bytes)
            if f.fits:
                return (f"{n} such nodes hold it at {prec} ({src.checkpoint.repo}): --nodes {n} --head HOST:PORT "
                        "on each (docs/multi-node.md)")
    fits = [m for m in catalog.models() if m.params_b < spec.params_b and _fits_node(m, engine, target)]
    if fits:
        best = max(fits, key=lambda m: m.params_b)
        return (f"no checkpoint of {spec.name} fits {MAX_ADVISED_NODES} such nodes; the largest model that fits "
                f"here is {best.name} (`dsr1 serve {best.name}`)")
    return f"no catalog model fits these GPUs with {engine}"


def _fits_node(spec, engine: str, target: fit.Target) -> bool:
    for prec in candidates(spec, target):
        src = checkpoints.source(spec, prec, engine, target)
        if src is not None and fit.estimate(spec, prec, target, weights_total=None if src.on_load else
                                            src.checkpoint.size_bytes).fits:
            return True
    return False


def _vllm_cpu(spec, host, o, util, want_seqs, ctx_flag, ctx_default, d) -> dict:
    """vLLM's CPU build: weights in RAM, a KV cache of VLLM_CPU_KVCACHE_SPACE GiB."""
    precision = o.precision or ("bf16" if host.bf16_fast else "fp32")
    if precision not in ("bf16", "fp32"):
        raise UsageError(f"vLLM's CPU build runs bf16 or fp32, not {precision}", hint="drop --precision or use bf16")
    target = fit.Target(kind="cpu", count=1, memory_bytes=host.usable_ram, utilization=util, engine="vllm",
                        supports_bf16=host.bf16_fast)
    tp, pp = _cpu_parallel(spec, o)
    f = fit.estimate(spec, precision, target)
    free = f.kv_free_per_device - VLLM_CPU_RUNTIME
    kv_tok = spec.kv_bytes_per_token(fit.DTYPE_BYTES[precision])
    if free <= 0:
        raise HardwareError(f"{spec.name} at {precision} needs {f.weights_per_device / GiB:.1f} GiB of weights plus "
                            f"~{(f.overhead_per_device + VLLM_CPU_RUNTIME) / GiB:.1f} GiB for vLLM; "
                            f"{f.budget_per_device / GiB:.1f} GiB of RAM is usable", hint="use a smaller model or --engine embedded with --precision int8")
    ctx, capacity = _fit_context(spec, free, kv_tok, ctx_flag, ctx_default, d, what="in RAM",
                                 fix="lower --max-concurrent, or free RAM")
    space = min(free, kv_tok * ctx * want_seqs)
    gib = max(1, math.ceil(space / GiB))  # VLLM_CPU_KVCACHE_SPACE is whole GiB
    capacity = int(gib * GiB // kv_tok)
    return _fields(precision=precision, dtype=precision, max_model_len=ctx, max_num_seqs=want_seqs,
                   kv_bytes_per_token=kv_tok, kv_budget_bytes=gib * GiB, kv_capacity_tokens=capacity,
                   sequences_at_full_context=capacity // ctx if ctx else 0,
                   weights_bytes_per_device=int(f.weights_per_device), tensor_parallel=tp, pipeline_parallel=pp)


def _cpu_parallel(spec, o) -> tuple[int, int]:
    """vLLM's CPU build runs tensor and pipeline parallel over gloo, one worker per rank, each on its
    own cores (VLLM_CPU_OMP_THREADS_BIND). Across nodes every node needs a share of the ranks:
    pipeline stages by default (one exchange per stage, not per layer, over an ordinary network).
    Memory is sized for the whole model in this node's RAM, an upper bound."""
    tp = o.tensor_parallel or 1
    pp = o.pipeline_parallel or (o.nodes if o.nodes > 1 and tp % o.nodes else 1)
    if spec.heads % tp:
        raise UsageError(f"--tensor-parallel {tp} does not divide {spec.name}'s {spec.heads} attention heads",
                         hint="use a divisor of the head count, or pipeline parallel (--pipeline-parallel)")
    if (tp * pp) % o.nodes:
        raise UsageError(f"TP {tp} x PP {pp} = {tp * pp} ranks cannot be spread over {o.nodes} nodes",
                         hint=f"make --tensor-parallel x --pipeline-parallel a multiple of --nodes {o.nodes}")
    return tp, pp


def _llamacpp(spec, ref, device, gpus, host, o, util, want_seqs, ctx_flag, ctx_default, d) -> dict:
    """llama-server: `-c` is the KV size shared by the `-np` slots, so each slot gets c/np tokens.
    The GGUF is placed from its own tensor table (dsr1.gguf_place): layers per GPU, routed experts in
    RAM when they do not fit, the KV cache, the host RAM it all needs. A catalog model with published
    GGUFs (R1 671B) and no file here gets the largest of them that fits, placed from its recipe."""
    from dataclasses import asdict
    from pathlib import Path

    from dsr1 import gguf_files, gguf_place

    gpu_memory = [g.memory_total for g in gpus.gpus] if device == "cuda" else []
    virtual_ram = getattr(d, "profile_ram", None)
    host_ram = virtual_ram or host.usable_ram  # a virtual profile's machine, not this one
    picked = None
    if ref.path and Path(ref.path).is_file():
        gset = gguf_files.read_set(Path(ref.path))
        lay, quant = gguf_place.layout_of(gset), ref.gguf_quant or gset.quant
    elif spec is not None and gguf_place.quants(spec.name):
        ctx = ctx_flag or min(ctx_default, R1_GGUF_CONTEXT)
        seqs = want_seqs if o.max_concurrent is not None else 1
        picked, _p, more = gguf_place.choose(spec, gpu_memory, host_ram, ctx * seqs)
        lay, quant = gguf_place.layout_from_recipe(spec, picked), picked.quant
        d.notes.extend(more)
    else:
        raise UsageError(f"--engine llamacpp serves GGUF files; {ref.arg} is not one",
                         hint="pass a .gguf file as MODEL, or use --engine auto")
    big = picked is not None or lay.size > 100e9
    ctx = ctx_flag or (min(ctx_default, R1_GGUF_CONTEXT) if big else ctx_default)
    seqs = want_seqs if (o.max_concurrent is not None or not big) else 1
    if big and seqs != want_seqs:
        d.notes.append(f"one llama-server slot (-np 1): the published figures for {quant} are single-stream; "
                       "--max-concurrent N asks for more")
    p = gguf_place.place(lay, gpu_memory, host_ram, ctx * seqs)
    if not p.fits and not ctx_flag:  # the largest context that fits, down to 2,048 tokens per slot
        while not p.fits and ctx > 2048:
            ctx //= 2
            p = gguf_place.place(lay, gpu_memory, host_ram, ctx * seqs)
        if p.fits:
            d.notes.append(f"context lowered to {ctx:,} tokens per slot to fit")
    if not p.fits:
        where = f"{len(gpu_memory)} GPU(s) of {gpu_memory[0] / GiB:.0f} GiB" if gpu_memory else "no GPU"
        raise HardwareError(f"{ref.name} ({quant}, {lay.size / GiB:.1f} GiB) with a {ctx * seqs:,}-token KV cache needs "
                            f"{p.host_bytes / GiB:.0f} GiB of host RAM beside what {where} holds; "
                            f"{p.host_usable / GiB:.0f} GiB is usable here",
                            hint="lower --max-model-len, use a smaller GGUF quantization, or add RAM/GPUs")
    key = {"all_gpu": "all_gpu", "cpu_only": "cpu_only"}.get(p.where, "experts_in_ram")
    expected = gguf_place.speed(key) if big else (None, None)
    fields = dict(precision="gguf", quant="none", dtype="f16", max_model_len=ctx, max_num_seqs=seqs,
                  threads=None if virtual_ram else max(1, host.cores_physical), kv_bytes_per_token=p.kv_per_token, kv_budget_bytes=p.kv_bytes,
                  kv_capacity_tokens=p.context, sequences_at_full_context=p.context // ctx if ctx else 0,
                  weights_bytes_per_device=max(p.gpu_bytes or (lay.size,)), gguf_quant=quant,
                  placement={**asdict(p), "n_layer": lay.n_layer, "layout": lay.source, "gguf_bytes": lay.size},
                  expected_tok_s=expected[0], expected_source=expected[1])
    if picked is not None:
        fields.update(checkpoint=picked.checkpoint, checkpoint_format="gguf",
                      checkpoint_gb=round(picked.size_bytes / 1e9, 1))
    return _fields(**fields)
