"""Start-up and shutdown: resolve the model, choose dtype/memory, run uvicorn, drain on signals.

`plan` loads the model and decides every setting (printed by the command before
serving); `run` serves until SIGTERM/SIGINT, then stops accepting, lets running
requests finish for `grace` seconds, cancels the rest and returns (exit 0).
"""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dsr1 import catalog, settings
from dsr1.errors import ConfigError, HardwareError, NotFoundError, UsageError

log = logging.getLogger("dsr1.serve")

MIN_CONTEXT = 256


@dataclass
class ServeOptions:
    model: str
    profile: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_concurrent: int | None = None
    max_queue: int | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    device_map: str | None = None
    max_memory: str | None = None
    offload_dir: Path | None = None
    stream_interval: int = 1
    prefill_chunk: int = 256
    threads: int | None = None
    served_name: str | None = None
    reasoning_field: str = "both"
    reasoning_parser: str = "auto"
    system_prompt: str = "auto"
    audit_log: Path | None = None
    audit_content: bool = False
    grace: float = 30.0
    max_body_bytes: int = 4 * 1024 * 1024
    engine: str = "auto"  # the deployment plan's engine request (dsr1.plan); embedded runs here
    fast_path: bool = True  # the lean Llama/Qwen2 forward (dsr1.serve.fastpath) when the model takes it
    compile: str | None = None  # auto, on, off (None: DSR1_COMPILE, else auto): torch.compile of the decode step
    prefix_cache_mb: int | None = None  # None: a quarter of the slot cache; 0: off
    speculative: str = "off"  # off, ngram or draft
    num_speculative_tokens: int = 4
    draft_model: str | None = None  # --speculative draft: a directory or stored name, same tokenizer
    engine_python: str | None = None
    guard: Path | None = None  # --guard POLICY.toml (dsr1.guard)
    guard_plugin: str | None = None  # --guard-plugin module:function
    audit_max_mb: float = 0  # rotate the audit log past this size
    audit_backups: int = 5
    lora: list[tuple[str, str]] = field(default_factory=list)  # (served name, adapter directory or stored name)
    node_metrics_port: int = 8101  # multi-node: each node's agent (dsr1.monitoring.nodeagent); 0: off
    quantize: str = "none"  # int8 or nf4: bitsandbytes while loading (`--precision int8|nf4` on a local model)


@dataclass
class Plan:
    """Everything chosen at start-up, printed before serving."""

    model_dir: str
    served_name: str
    profile: str
    dtype: str
    dtype_reason: str
    device: str
    max_concurrent: int
    max_queue: int
    max_model_len: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    memory_budget_bytes: int
    prefill_chunk: int
    system_prompt: str
    reasoning_parser: str  # "deepseek_r1" or "none", as run
    reasoning_why: str
    load_seconds: float
    forward: str = "transformers"  # compiled, fast or transformers
    forward_reason: str = ""
    compile_seconds: float = 0.0
    prefix_cache_bytes: int = 0
    speculative: str = "off"
    warnings: list[str] = field(default_factory=list)
    # what differs from the deployment plan because it could only be measured here (dtype timed at
    # start, a context the RAM left after loading does not hold): {field: value}; empty when none
    measured: dict[str, Any] = field(default_factory=dict)


def resolve_model_dir(name_or_path: str, profile: str | None = None) -> Path:
    """MODEL as a directory or a stored name (dsr1.store); a catalog name that is
    not stored yet is pulled first, with the precision the profile picks."""
    from dsr1 import store

    stored = store.find(str(name_or_path))
    if stored is not None and stored.is_gguf and not stored.embedded_ready:
        from dsr1.download import Reporter
        from dsr1.gguf_store import embedded_copy

        class _Say(Reporter):
            def stage(self, text: str) -> None:
                print(f"dsr1 serve: {text}", file=sys.stderr, flush=True)

        return embedded_copy(stored.name, _Say())
    try:
        return store.resolve_model_dir(name_or_path)
    except NotFoundError:
        spec = catalog.find(str(name_or_path))
        if spec is None or Path(str(name_or_path)).expanduser().exists():
            raise
    for m in store.list_models():  # pulled earlier under a quantized name (e.g. NAME-nf4)
        if m.name in (spec.name, f"{spec.name}-int8", f"{spec.name}-nf4"):
            return store.resolve_model_dir(m.name)
    from dsr1.download import Reporter
    from dsr1.pull import pull

    class _Stages(Reporter):
        def stage(self, text: str) -> None:
            print(f"dsr1 serve: {text}", file=sys.stderr, flush=True)

    print(f"dsr1 serve: {spec.name} is not in the store; pulling {spec.repo} first", file=sys.stderr, flush=True)
    result = pull(spec.name, profile=profile, reporter=_Stages())
    return Path(result.model_dir)


def deployment_for(opts: ServeOptions):
    """The deployment plan (dsr1.plan) for the embedded engine when the caller has none: the one
    place the profile is chosen, shared with pull and doctor."""
    from dsr1 import plan as planner

    return planner.make_plan(opts.model, opts.profile, planner.Overrides(
        engine="embedded", max_concurrent=opts.max_concurrent, max_model_len=opts.max_model_len,
        served_name=opts.served_name, host=opts.host, port=opts.port, device_map=opts.device_map,
        lora=tuple(opts.lora), max_queue=opts.max_queue, prefix_cache_mb=opts.prefix_cache_mb,
        fast_path=opts.fast_path, reasoning_parser=opts.reasoning_parser, dtype=opts.dtype, compile=opts.compile,
        threads=opts.threads))


def choose_dtype(requested: str, *, cuda: bool, bf16_cpu: bool, batch: int,
                 measure: Callable[[], tuple[str, str]] | None = None) -> tuple[str, str]:
    """Default dtype by hardware and load. On a CPU with bf16 units the two candidates are timed on
    this machine (`measure`: dsr1.serve.calibrate.choose, cached per machine), because which one
    wins depends on the CPU and the batch (docs/performance.md)."""
    if requested != "auto":
        return requested, "flag"
    if cuda:
        import torch

        return ("bf16", "GPU supports bf16") if torch.cuda.is_bf16_supported() else ("fp16", "GPU lacks bf16")
    if not bf16_cpu:
        return "fp32", "CPU without bf16 units"
    if measure is not None:
        return measure()
    return ("bf16", "CPU has bf16 units; batching") if batch > 1 else ("fp32", "CPU, one request at a time")


def _inductor_cache() -> None:
    """Keep torch.compile's artifacts under DSR1_HOME, so a restart reuses them (seconds, not minutes)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.home() / "cache" / "inductor"))


def _prefix_cache_factory(model, planned: int, memory_budget: int, measured: dict):
    """(slot cache) -> PrefixCache of the plan's size, or None when off; smaller (and recorded as
    measured) when the memory left after the slot cache does not hold it."""
    if planned <= 0:
        return None
    from dsr1.serve.prefixcache import PrefixCache

    def make(cache):
        budget = planned
        if budget > memory_budget - cache.total_bytes:
            budget = max(0, memory_budget - cache.total_bytes)
            measured["prefix_cache_bytes"] = budget
        return PrefixCache(model.layers, model.kv_heads, model.head_dim, model.dtype, model._layer_devices(),
                           budget_bytes=budget)

    return make


def choose_reasoning_parser(requested: str, *, has_think: bool) -> tuple[str, str]:
    """The parser that runs ("deepseek_r1" or "none") and why. `requested` is one of dsr1.plan.REASONING_PARSERS."""
    if requested == "auto":
        if has_think:
            return "deepseek_r1", "auto: the tokenizer has </think>"
        return "none", "auto: no </think> token"
    if requested == "deepseek_r1" and not has_think:
        raise UsageError("--reasoning-parser deepseek_r1: this model's tokenizer has no </think> token, so there "
                         "is no reasoning to split", hint="use --reasoning-parser auto or none")
    return requested, f"--reasoning-parser {requested}"


def _parse_max_memory(spec: str | None) -> dict[Any, str] | None:
    if not spec:
        return None
    out: dict[Any, str] = {}
    for part in spec.split(","):
        dev, sep, amount = part.partition("=")
        if not sep or not amount.strip():
            raise UsageError(f"--max-memory {spec!r}: expected DEVICE=SIZE[,DEVICE=SIZE]",
                             hint="e.g. --max-memory 0=20GiB,cpu=60GiB")
        dev = dev.strip()
        out[int(dev) if dev.isdigit() else dev] = amount.strip()
    return out


def size_context(*, slots: int, per_token: int, wanted: int | None, model_max: int, default: int,
                 budget: int) -> int:
    """Largest context (<= wanted/default and the model's limit) whose KV cache for all slots fits the budget."""
    ctx = min(wanted or default, model_max)
    fits = budget // max(1, slots * per_token)
    if wanted and fits < wanted:
        raise HardwareError(f"--max-model-len {wanted} x --max-concurrent {slots} needs "
                            f"{slots * wanted * per_token / 2**30:.1f} GiB of KV cache; "
                            f"{budget / 2**30:.1f} GiB is available",
                            hint="lower --max-model-len or --max-concurrent")
    ctx = min(ctx, fits // 16 * 16)
    if ctx < MIN_CONTEXT:
        raise HardwareError(f"only {fits} tokens of KV cache per request fit in {budget / 2**30:.1f} GiB",
                            hint="lower --max-concurrent or free memory")
    return ctx


def plan(opts: ServeOptions, progress: Callable[[str], None] = lambda m: None, deployment=None):
    """Load the model and choose every setting. Returns (Plan, embedded backend, front config, metrics).

    `deployment` is the dsr1.plan.Plan `dsr1 serve` made (profile, concurrency, memory share);
    without it one is made here. What only a loaded model tells (dtype, KV bytes, context) is
    decided below."""
    import torch

    from dsr1.probe.host import available_ram, probe_host
    from dsr1.serve.embedded import EmbeddedBackend, EmbeddedConfig
    from dsr1.serve.engine import EmbeddedModel, parse_dtype
    from dsr1.serve.front import FrontConfig
    from dsr1.serve.metrics import Metrics
    from dsr1.serve.scheduler import Scheduler

    _check_speculative(opts)
    policy, plugin = load_guards(opts)  # a bad policy fails before minutes of loading
    model_dir = resolve_model_dir(opts.model, opts.profile)
    host = probe_host(settings.home())
    dep = deployment or deployment_for(opts)
    # the deployment plan decided these (dsr1.plan, dsr1.serve.decide): they run as planned, and what
    # only loading or timing can tell is recorded in `measured`, never decided a second time
    measured: dict[str, Any] = {}
    max_concurrent, max_queue = dep.max_num_seqs, dep.max_queue
    cuda = torch.cuda.is_available() and opts.device_map != "cpu"
    from dsr1.serve import calibrate, decide

    # Every torch call runs on one dedicated thread, model loading, the dtype timing and compiling
    # included. With OpenMP each thread that calls into torch gets its own team of worker threads, and
    # once a process has more of them than cores, libgomp stops spinning between parallel regions
    # (GOMP_SPINCOUNT's throttled count): a decode step is hundreds of short regions, so every one then
    # waits on a futex wake-up. Measured on the demo model (2-core Xeon): 53 ms per token for the whole
    # life of a server whose dtype timing had run on the main thread, 15 ms without.
    worker = ThreadPoolExecutor(1, thread_name_prefix="dsr1-engine")
    dtype, why = dep.dtype, dep.dtype_reason
    if dtype == decide.MEASURE:
        dtype, why = choose_dtype("auto", cuda=cuda, bf16_cpu=host.bf16_fast, batch=max_concurrent,
                                  measure=lambda: worker.submit(calibrate.choose, model_dir, max_concurrent,
                                                                calibrate.cache_dir_for(settings.home())).result())
        measured["dtype"] = dtype
    device_map = opts.device_map or ("auto" if cuda else "cpu")
    progress(f"loading {model_dir} ({dtype}, device_map={device_map})")
    max_mem = _parse_max_memory(opts.max_memory)
    model = worker.submit(EmbeddedModel, model_dir, dtype=parse_dtype(dtype), device_map=device_map,
                          max_memory=max_mem, offload_dir=opts.offload_dir, threads=opts.threads,
                          fast_path=opts.fast_path, quantize=opts.quantize, weights=dep.weights).result()
    if dep.weights and not cuda:  # int8/int4 kept between starts (dsr1.serve.wstore): a restart maps them
        model.weights_store = settings.home() / "cache" / "quantized"
    parser, parser_why = choose_reasoning_parser(dep.reasoning_parser, has_think=model.has_think)
    if model.fast_reason != dep.fast_path_reason:
        measured["fast_path_reason"] = model.fast_reason
    adapters = _load_adapters(dep.lora, model, model_dir, worker, progress)
    if opts.speculative != "off" and model.fast_reason is not None:
        raise ConfigError(f"--speculative {opts.speculative} needs the embedded engine's fast path, which this "
                          f"model cannot take: {model.fast_reason}", hint="drop --speculative")
    draft = None
    if opts.speculative == "draft":
        draft_dir = resolve_model_dir(opts.draft_model, opts.profile)
        progress(f"loading the draft model {draft_dir} ({dtype})")
        draft = worker.submit(EmbeddedModel, draft_dir, dtype=parse_dtype(dtype), device_map=device_map,
                              threads=opts.threads, fast_path=True).result()
    # the draft keeps its own cache, row for row: the context is sized for both
    per_token = model.kv_bytes_per_token() + (draft.kv_bytes_per_token() if draft else 0)
    if cuda:
        free, _ = torch.cuda.mem_get_info()
        budget = int(free * dep.memory_utilization)
    else:
        budget = int(available_ram() * dep.memory_utilization)  # after loading; within a container's limit
    max_len = size_context(slots=max_concurrent, per_token=per_token, wanted=opts.max_model_len,
                           model_max=model.max_position, default=dep.max_model_len, budget=budget)
    if max_len != dep.max_model_len:
        measured["max_model_len"] = max_len
    if per_token != dep.kv_bytes_per_token:
        measured["kv_bytes_per_token"] = per_token
    system = opts.system_prompt
    if system == "auto":
        # DeepSeek: "avoid adding a system prompt" for R1; put instructions in the user turn.
        system = "merge" if model.is_r1 else "keep"
    warnings = []
    if opts.host not in ("127.0.0.1", "localhost", "::1") and not opts.api_key:
        warnings.append(f"binding {opts.host} without an API key: anyone who can reach this port can use the "
                        f"model (set --api-key-file or DSR1_API_KEY)")
    if device_map == "cpu" and (opts.max_memory or opts.offload_dir):
        warnings.append("--max-memory/--offload-dir only apply with --device-map auto or cuda; ignored on cpu")
    if not model.tokenizer.chat_template:
        warnings.append("the model has no chat template: /v1/chat/completions answers 400; use /v1/completions")
    name = opts.served_name or (opts.model if not Path(opts.model).expanduser().is_dir() else model_dir.name)
    if name in adapters:
        raise UsageError(f"--lora {name}=...: the base model is served as {name!r} already",
                         hint="give the adapter another name")
    metrics = Metrics(name)
    prefix_factory = _prefix_cache_factory(model, dep.prefix_cache_bytes, budget, measured)
    proposer = None
    if opts.speculative == "ngram":
        from dsr1.serve.speculative import NgramProposer

        proposer = NgramProposer(k=opts.num_speculative_tokens)
    elif draft is not None:
        from dsr1.serve.speculative import DraftProposer

        proposer = worker.submit(DraftProposer, draft, model, max_concurrent, max_len,
                                 k=opts.num_speculative_tokens).result()
    if proposer:
        metrics.bind_speculative()
    # the front admits max_concurrent at a time (dsr1.serve.front.Admission); the scheduler's own queue
    # only has to hold a request admitted while an aborted one has not yet left its row
    sched = worker.submit(Scheduler, model, max_concurrent=max_concurrent, max_queue=max_queue + max_concurrent,
                          max_model_len=max_len, prefill_chunk=opts.prefill_chunk,
                          stream_interval=opts.stream_interval, metrics=metrics, worker=worker,
                          prefix_cache=prefix_factory, proposer=proposer).result()
    metrics.bind(sched.counts, sched.kv_usage, sched.cache.total_bytes)
    if sched.prefix is not None:
        metrics.bind_prefix_cache(sched.prefix)
    compile_on, compile_why = dep.compile, dep.compile_reason
    if "dtype" in measured or model.fast_reason != dep.fast_path_reason:  # the plan's inputs were measured
        size = sum(p.numel() * p.element_size() for p in model.model.parameters())
        compile_on, compile_why = decide.compile_choice(
            opts.compile, fast_reason=model.fast_reason, device="cuda" if cuda else "cpu", dtype=dtype,
            weights_bytes=size, spare_bytes=available_ram() + size, weights=dep.weights)
        if compile_on != dep.compile:
            measured["compile"] = compile_on
    elif compile_on and model.fast is None and model.fast_reason is not None:
        raise ConfigError(f"the plan compiles the decode step, but this model cannot take the fast path: "
                          f"{model.fast_reason}", hint="use --compile off")
    if compile_why == decide.COMPILE_AT_START and model.fast is not None:
        compile_on, compile_why = _compile_at_start(model, worker, progress)
        measured["compile"] = compile_on
    compile_seconds = 0.0
    if compile_on:
        _inductor_cache()
        worker.submit(model.fast.enable_compile, store=settings.home() / "cache" / "compiled").result()  # int4: torch ops
        batches = (2, 1) if max_concurrent > 1 else (1,)
        compile_seconds = worker.submit(model.fast.warm_up, sched.cache, batches=batches, progress=progress).result()
        if model.fast.not_kept:
            compile_why += f"; not kept for the next start: {model.fast.not_kept}"
            warnings.append(f"the compiled decode step is not kept for the next start: {model.fast.not_kept}")
        elif model.fast.ahead_of_time:
            compile_why += ("; the compiled step of an earlier start" if model.fast.compile_how == "loaded"
                            else "; compiled ahead of time, kept for the next start")
            # beside the package the eager forward (prompts; the batch sizes it wins) runs on packed
            # weights, and which of the two runs a batch is measured here once per package; a restart
            # whose saved timings leave no batch size to the eager step leaves them unpacked (prompts
            # only: packing would gain little there and cost seconds of the start)
            saved = model.fast.package.with_suffix(".rows.json")
            if model.fast.decodes_eager(sched.cache, saved) and worker.submit(model.pack_weights).result():
                compile_why += "; eager weights packed for oneDNN"
            from dsr1.serve import fastpath

            rows = worker.submit(model.fast.measure_rows, sched.cache, saved=saved).result()
            compiled, eager = fastpath.compiled_ranges(model.fast.row_timings, sched.cache.slots)
            compile_why += ("; eager at every batch size (the compiled step measured slower here)" if rows == 0 else
                            "; compiled at every batch size" if not eager else
                            f"; compiled at {', '.join(compiled)} rows, eager at {', '.join(eager)} "
                            "(measured faster there)")
            compile_why += ("; prompts through the compiled step" if model.fast.prompt_compiled else
                            "; prompts eager (measured faster than the compiled step here)")
            if model.fast.lora_compiled:
                compile_why += f"; LoRA adapters in the compiled step ({len(adapters)})"
            if not eager and model.fast.prompt_compiled and proposer is None and (not adapters
                                                                                 or model.fast.lora_compiled):
                # every batch and prompt takes the package, which holds its own weights: the eager copy goes
                freed = worker.submit(model.fast.release_eager, model.model).result()
                compile_why += f"; eager weights released ({freed / 1e9:.1f} GB)"
        if adapters and not model.fast.lora_compiled:  # compiled just in time (no disk for a package; a GPU)
            compile_why += "; rows with a LoRA adapter run the eager forward"
    elif worker.submit(model.pack_weights).result():  # False when there is nothing to pack
        # eager bf16 on a CPU: the weights reordered once for oneDNN (dsr1.serve.wquant, PACKED)
        compile_why += "; bf16 weights packed for oneDNN"
    if model.fast is not None and not model.fast.compiled:
        worker.submit(model.fast.pack_head).result()  # an int8 head: packed for fbgemm now, not at the first request
    forward_reason = model.fast_reason or compile_why
    if model.fast is not None and model.fast.weights_how:
        forward_reason += f"; {dep.weights} {model.fast.weights_how}"
    cfg = FrontConfig(model_name=name, max_model_len=max_len, max_concurrent=max_concurrent, max_queue=max_queue,
                      api_key=opts.api_key, max_body_bytes=opts.max_body_bytes, reasoning_field=opts.reasoning_field,
                      reasoning_on=parser == "deepseek_r1", adapters=tuple(adapters), guard=policy, guard_plugin=plugin,
                      audit_log=opts.audit_log, audit_content=opts.audit_content,
                      audit_max_bytes=int(opts.audit_max_mb * 2**20), audit_backups=opts.audit_backups)
    backend = EmbeddedBackend(sched, EmbeddedConfig(max_len, parser == "deepseek_r1", system, adapters))
    p = Plan(str(model_dir), name, dep.profile, dtype, why, str(model.input_device), max_concurrent, max_queue, max_len,
             sched.cache.total_bytes, per_token, budget, opts.prefill_chunk, system, parser, parser_why,
             round(model.load_seconds, 2), model.path, forward_reason, round(compile_seconds, 1),
             sched.prefix.total_bytes if sched.prefix else 0,
             f"draft ({opts.draft_model}, {opts.num_speculative_tokens} tokens)" if draft else
             f"ngram ({opts.num_speculative_tokens} tokens)" if proposer else "off", warnings, measured)
    for k, v in measured.items():
        if k not in ("dtype", "compile") or (k == "compile" and dep.compile_reason != decide.COMPILE_AT_START):
            # a dtype or a compile choice timed at start is the plan's own instruction, not a surprise
            warnings.append(f"measured at start: {k} {v} (the plan said {getattr(dep, k, None)})")
    return p, backend, cfg, metrics


def _compile_at_start(model, worker, progress) -> tuple[bool, str]:
    """--compile auto on a CPU: four compiled layers and the head timed against eager (dsr1.serve.compileprobe,
    cached per CPU and model shape); on only where compiling measured faster and the disk has room to
    keep the compiled step for later starts (without it every start would compile again, for minutes)."""
    from dsr1.serve import aotstep, calibrate, compileprobe

    progress("timing four compiled layers and the head against eager (once per CPU and model shape)")
    on, why = worker.submit(compileprobe.choose, model.fast, calibrate.cache_dir_for(settings.home())).result()
    no_room = aotstep.room_for(model.model, settings.home() / "cache" / "compiled") if on else None
    if no_room:
        return False, f"{why.replace('auto: on', 'auto: off', 1)}; but {no_room}"
    return on, why


def load_guards(opts: ServeOptions):
    """(policy, plugin) from --guard and --guard-plugin; (None, None) without them."""
    from dsr1 import guard

    policy = guard.load(opts.guard) if opts.guard else None
    plugin = guard.load_plugin(opts.guard_plugin) if opts.guard_plugin else None
    if opts.audit_max_mb < 0 or opts.audit_backups < 1:
        raise UsageError("--audit-max-mb must be 0 or more and --audit-backups at least 1")
    return policy, plugin


def _load_adapters(specs, model, model_dir: Path, worker, progress) -> dict[str, int]:
    """--lora NAME=DIR: each adapter checked against this base model, then loaded for per-row use."""
    from dsr1 import lora

    out: dict[str, int] = {}
    for name, where in specs:
        adapter = lora.read(lora.resolve(where))
        lora.check(adapter, model_dir)
        progress(f"loading LoRA adapter {name} ({adapter.path}, rank {adapter.r}, {', '.join(adapter.targets)})")
        out[name] = worker.submit(model.load_adapter, adapter).result()
    return out


def _check_speculative(opts: ServeOptions) -> None:
    """The speculative flags among themselves, before anything is loaded."""
    if opts.speculative not in ("off", "ngram", "draft"):
        raise UsageError(f"--speculative {opts.speculative!r}", hint="use off, ngram or draft (with --draft-model)")
    if opts.speculative == "draft" and not opts.draft_model:
        raise UsageError("--speculative draft needs --draft-model",
                         hint="pass a smaller model of the same tokenizer, e.g. --draft-model r1-distill-qwen-1.5b")
    if opts.draft_model and opts.speculative != "draft":
        raise UsageError("--draft-model is only used with --speculative draft", hint="add --speculative draft")
    if not 1 <= opts.num_speculative_tokens <= 16:
        raise UsageError("--num-speculative-tokens must be 1-16")


def run(opts: ServeOptions, p: Plan, backend, cfg, metrics, on_ready: Callable[[str], None]) -> None:
    """Serve until a signal; drain for opts.grace seconds; return normally (exit 0)."""
    from dsr1.serve import listen
    from dsr1.serve.front import create_front

    app, front = create_front(backend, cfg, metrics)
    sched = backend.sched

    def ready(url: str) -> None:
        front.ready = True
        on_ready(url)

    def draining() -> None:
        front.draining = True
        sched.stop_accepting()

    server = listen.make_server(app, host=opts.host, port=opts.port, grace=opts.grace, on_ready=ready,
                                on_signal=draining)
    sched.start()
    try:
        listen.run(server, host=opts.host, port=opts.port)
    finally:  # after uvicorn's graceful drain (or a failed start): stop what is left, end the engine loop
        sched.cancel_all()
        sched.shutdown()


__all__ = ["ServeOptions", "Plan", "plan", "run", "resolve_model_dir", "choose_dtype", "choose_reasoning_parser",
           "size_context", "deployment_for"]
