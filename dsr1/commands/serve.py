"""`dsr1 serve`: an OpenAI-compatible R1 server; the deployment plan (dsr1.plan) picks the engine.

The embedded engine runs in this process (dsr1.serve.server); vLLM, SGLang and llama.cpp
run as a supervised child behind dsr1's own front (dsr1.serve.external)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from dsr1.commands.options import JsonOpt, ProfileOpt, QuietOpt


def _api_key(flag: Optional[str], key_file: Optional[Path]) -> Optional[str]:
    from dsr1 import settings
    from dsr1.errors import UsageError

    if flag and key_file:
        raise UsageError("--api-key and --api-key-file both given", hint="use one of them")
    if key_file:
        try:
            key = key_file.expanduser().read_text().strip()
        except OSError as e:
            raise UsageError(f"cannot read --api-key-file {key_file}: {e.strerror}", hint="check the path") from None
        if not key:
            raise UsageError(f"--api-key-file {key_file} is empty", hint="write the key into the file")
        return key
    return settings.api_key(flag)


def serve(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model directory, stored model name, or catalog name."),
    profile: Optional[str] = ProfileOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but loopback needs --api-key."),
    port: int = typer.Option(8000, "--port", help="Port (0 picks a free one; the URL is printed)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Bearer key clients must send (or DSR1_API_KEY)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Read the API key from this file."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", "--max-num-seqs", help="Requests decoded together (profile default; --max-num-seqs as vLLM names it)."),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help="Requests waiting for a slot before 429 (default 4x max-concurrent)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Context per request, prompt + output (profile/model default, capped by memory)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bf16, fp16 or fp32 (auto: by hardware and batch)."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="auto, cpu or cuda (default: auto with a GPU, else cpu)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Per-device weight limits, e.g. 0=20GiB,cpu=60GiB."),
    offload_dir: Optional[Path] = typer.Option(None, "--offload-dir", help="Folder for weights offloaded to disk."),
    stream_interval: int = typer.Option(1, "--stream-interval", help="Tokens per streamed chunk."),
    prefill_chunk: int = typer.Option(256, "--prefill-chunk", help="Prompt tokens processed between decode steps (bounds stalls)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads: torch's (embedded), llama-server's -t (default: torch's choice; one per physical core for llama-server)."),
    max_batched_tokens: Optional[int] = typer.Option(None, "--max-batched-tokens", "--max-num-batched-tokens", help="Tokens one engine step may take: vLLM --max-num-batched-tokens, SGLang --chunked-prefill-size, llama-server -b (default: the engine's). The embedded engine's is --prefill-chunk."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Name clients pass as `model`."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", help="NAME=ADAPTER (a peft LoRA directory or a stored adapter), repeatable: served as model NAME beside the base model, in the same batches (docs/lora.md)."),
    reasoning_parser: str = typer.Option("auto", "--reasoning-parser", help="deepseek_r1 (text before </think> is reasoning), none (no split); auto: deepseek_r1 if the tokenizer has </think>."),
    reasoning_field: str = typer.Option("both", "--reasoning-field", help="reasoning_content (DeepSeek), reasoning (vLLM 0.11+) or both."),
    system_prompt: str = typer.Option("auto", "--system-prompt", help="keep, merge (into the first user turn, DeepSeek's R1 advice), drop; auto: merge for R1."),
    audit_log: Optional[Path] = typer.Option(None, "--audit-log", help="Append a JSONL line per request (no keys, no text)."),
    audit_content: bool = typer.Option(False, "--audit-content", help="Also record prompts and outputs in --audit-log."),
    audit_max_mb: float = typer.Option(0, "--audit-max-mb", help="Rotate --audit-log when it passes this size (MiB; 0: never; logrotate also works, the file is reopened per line)."),
    audit_backups: int = typer.Option(5, "--audit-backups", help="Rotated audit logs kept (audit.jsonl.1 ... .N)."),
    guard: Optional[Path] = typer.Option(None, "--guard", help="Input/output policy (TOML): blocked patterns and topics, prompt size, PII block/mask/log; docs/guards.md."),
    guard_plugin: Optional[str] = typer.Option(None, "--guard-plugin", help="module:function classifier run on inputs (and non-streamed outputs) off the event loop, with the policy's timeout and fail mode."),
    log_format: str = typer.Option("human", "--log-format", help="Server log on stderr: human, or json (one object per line: request id, status, tokens, timings; for log shippers)."),
    log_content: bool = typer.Option(False, "--log-content", help="Also put prompts and outputs in the request log (off: never logged)."),
    grace: float = typer.Option(30.0, "--grace", help="Seconds running requests get to finish after SIGTERM/SIGINT."),
    fast_path: bool = typer.Option(True, "--fast-path/--no-fast-path", help="Embedded engine: the lean Llama/Qwen2 forward (fused projections, no per-module overhead) when the model takes it."),
    compile: Optional[str] = typer.Option(None, "--compile", help="Embedded engine: torch.compile the whole decode step with frozen, packed weights (auto, on, off, or DSR1_COMPILE; auto: on for bf16 on a CPU with AMX, where it measured ~1.6x faster per step, off elsewhere). Compiling takes ~1.5-2 min at start-up on 2 cores and keeps a packed copy of the weights."),
    prefix_cache_mb: Optional[int] = typer.Option(None, "--prefix-cache-mb", help="Embedded engine: memory for reusing the KV of shared prompt beginnings (0: off; default a quarter of the KV cache)."),
    speculative: str = typer.Option("off", "--speculative", help="Embedded engine: off, ngram (prompt-lookup drafts) or draft (a smaller model's drafts, --draft-model); greedy requests only, output unchanged."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="With --speculative draft: a smaller model of the same tokenizer (directory or stored name)."),
    num_speculative_tokens: int = typer.Option(4, "--num-speculative-tokens", help="Draft tokens checked per step with --speculative."),
    engine: str = typer.Option("auto", "--engine", help="auto, embedded, vllm, sglang or llamacpp (auto: see docs/engines.md)."),
    engine_python: Optional[str] = typer.Option(None, "--engine-python", envvar="DSR1_ENGINE_PYTHON", help="Python of an environment with vLLM or SGLang, used as is (or DSR1_ENGINE_PYTHON)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Weights precision (bf16, fp8, int8, nf4, int4, ...; default: the best that fits)."),
    memory_utilization: Optional[float] = typer.Option(None, "--memory-utilization", "--gpu-memory-utilization", help="Share of each GPU (or of RAM) the engine may use (profile default; --gpu-memory-utilization as vLLM names it)."),
    tensor_parallel: Optional[int] = typer.Option(None, "--tensor-parallel", "--tensor-parallel-size", help="Tensor-parallel size (default: the smallest that fits)."),
    pipeline_parallel: Optional[int] = typer.Option(None, "--pipeline-parallel", "--pipeline-parallel-size", help="Pipeline-parallel size (default 1; nodes with vLLM)."),
    data_parallel: Optional[int] = typer.Option(None, "--data-parallel", "--data-parallel-size", help="Data-parallel replicas (default: GPUs left over)."),
    engine_port: int = typer.Option(0, "--engine-port", help="Private port of an external engine on 127.0.0.1 (0 picks a free one)."),
    nodes: int = typer.Option(1, "--nodes", help="Nodes the deployment spans (vLLM or SGLang)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This node's rank, 0 being the head."),
    node_metrics_port: int = typer.Option(8101, "--node-metrics-port", help="Multi-node: port of each node's metrics agent (GPUs, latency toward the head) on the NCCL interface; 0: off."),
    head: Optional[str] = typer.Option(None, "--head", help="HOST:PORT of node 0's rendezvous, reachable from every node."),
    expect_model: Optional[str] = typer.Option(None, "--expect-model", help="Multi-node: refuse to start unless this node's copy of MODEL has this fingerprint (the plan's model_fingerprint; --emit writes it)."),
    check_only: bool = typer.Option(False, "--check-only", help="Run this node's pre-launch checks (ports, --head, model fingerprint) and exit."),
    use_tuned: bool = typer.Option(True, "--tuned/--no-tuned", help="Apply the tuned profile `dsr1 bench tune` wrote for this model on this hardware (DSR1_HOME/profiles/tuned-*.toml) to every option not given here."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (with --json as JSON) and run nothing."),
    emit: Optional[Path] = typer.Option(None, "--emit", help="Write one launch script per node into this folder; run nothing."),
    json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Serve MODEL over HTTP with the OpenAI API (chat, completions, models, health, metrics). R1 reasoning comes back in `reasoning_content`. Stops cleanly on SIGTERM/Ctrl-C. The engine and its settings come from one plan (`--dry-run` prints it): docs/serve.md, docs/engines.md."""
    from dsr1.errors import UsageError
    from dsr1.serve import server

    if reasoning_field not in ("reasoning_content", "reasoning", "both"):
        raise UsageError(f"--reasoning-field {reasoning_field!r}", hint="use reasoning_content, reasoning or both")
    if system_prompt not in ("auto", "keep", "merge", "drop"):
        raise UsageError(f"--system-prompt {system_prompt!r}", hint="use auto, keep, merge or drop")
    if audit_content and not audit_log:
        raise UsageError("--audit-content needs --audit-log", hint="add --audit-log PATH")
    from dsr1 import lora as _lora
    from dsr1.serve import requestlog

    requestlog.configure(log_format, content=log_content)
    lora_specs = _lora.parse_specs(lora or [])
    out = requestlog.output(json, quiet)
    if (guard or guard_plugin) and engine not in ("auto", "embedded"):
        _guards_need_embedded(engine)
    tuned_profile = None
    if use_tuned:
        from dsr1 import tuned

        tuned_profile = tuned.find(model)
    if tuned_profile is not None:
        # Flags given on the command line win; the tuned profile replaces only defaults.
        given = {n for n in tuned_profile.settings if (src := ctx.get_parameter_source(n)) is not None
                 and src.name != "DEFAULT"}
        applied = {k: v for k, v in tuned_profile.settings.items() if k not in given}
        engine = applied.get("engine", engine)
        max_concurrent = applied.get("max_concurrent", max_concurrent)
        prefill_chunk = applied.get("prefill_chunk", prefill_chunk)
        stream_interval = applied.get("stream_interval", stream_interval)
        dtype = applied.get("dtype", dtype)
        speculative = applied.get("speculative", speculative)
        num_speculative_tokens = applied.get("num_speculative_tokens", num_speculative_tokens)
        compile = applied.get("compile", compile)
        threads = applied.get("threads", threads)
        max_batched_tokens = applied.get("max_batched_tokens", max_batched_tokens)
        memory_utilization = applied.get("memory_utilization", memory_utilization)
        precision = applied.get("precision", precision)
        out.info(f"tuned profile {tuned_profile.path}: " + " ".join(
            f"{k}={v}" for k, v in applied.items()) + (f" (measured {tuned_profile.goodput:.2f} req/s under "
            f"{tuned_profile.slo}, {tuned_profile.default_goodput:.2f} with defaults)" if tuned_profile.goodput else "")
            + ("; " + ", ".join(f"--{k.replace('_', '-')} given here" for k in sorted(given)) if given else "")
            + "; --no-tuned ignores it")
    opts = server.ServeOptions(
        model=model, profile=profile, host=host, port=port, api_key=_api_key(api_key, api_key_file),
        max_concurrent=max_concurrent, max_queue=max_queue, max_model_len=max_model_len, dtype=dtype,
        device_map=device_map, max_memory=max_memory, offload_dir=offload_dir, stream_interval=stream_interval,
        prefill_chunk=prefill_chunk, threads=threads, served_name=served_model_name, reasoning_parser=reasoning_parser,
        reasoning_field=reasoning_field, system_prompt=system_prompt, audit_log=audit_log, audit_content=audit_content,
        grace=grace, engine=engine, engine_python=engine_python, fast_path=fast_path, compile=compile,
        prefix_cache_mb=prefix_cache_mb, speculative=speculative, num_speculative_tokens=num_speculative_tokens,
        draft_model=draft_model, node_metrics_port=node_metrics_port, lora=lora_specs, guard=guard,
        guard_plugin=guard_plugin, audit_max_mb=audit_max_mb, audit_backups=audit_backups)
    from dsr1 import plan as planner

    overrides = planner.Overrides(
        engine=engine, engine_python=engine_python, precision=precision, tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel, data_parallel=data_parallel, max_model_len=max_model_len,
        max_concurrent=max_concurrent, memory_utilization=memory_utilization, served_name=served_model_name,
        max_batched_tokens=max_batched_tokens, threads=threads, host=host, port=port, engine_port=engine_port,
        nodes=nodes, node_rank=node_rank, head=head,
        device_map=device_map, expect_model=expect_model, lora=tuple(lora_specs), reasoning_parser=reasoning_parser,
        dtype=dtype, compile=compile)
    deployment = planner.make_plan(model, profile, overrides)
    if dry_run or emit:
        if emit:
            from dsr1.emit import write_scripts

            for path in write_scripts(deployment, emit):
                out.info(f"wrote {path}")
        if dry_run or json:
            out.result(deployment, lambda c: render_plan(c, deployment))
        return
    if check_only:
        from dsr1 import preflight

        done = preflight.run(deployment, api_host=host, expect_model=expect_model, progress=out.info)
        out.result({"node_rank": node_rank, "checked": done}, lambda c: [c.print(f"ok: {x}") for x in done])
        return
    for w in deployment.warnings:
        out.warn(w)
    if deployment.engine != "embedded":
        if guard or guard_plugin:
            _guards_need_embedded(deployment.engine)
        if deployment.needs_pull:
            deployment = _pull_then_plan(model, profile, overrides, out, deployment)
        from dsr1.serve.external import serve_external

        serve_external(deployment, opts, out, expect_model=expect_model)
        return
    _serve_embedded(opts, deployment, out, precision=precision, json=json)
    out.info("dsr1 serve: stopped")


def _guards_need_embedded(engine: str) -> None:
    from dsr1.errors import UsageError

    raise UsageError(f"--guard and --guard-plugin run in the embedded engine's server; dsr1's front for {engine} "
                     f"does not apply them yet", hint="use --engine embedded, or drop them")


def _serve_embedded(opts, deployment, out, *, precision: Optional[str], json: bool) -> None:
    """The embedded engine, in this process: load, print every choice, serve until a signal."""
    import json as _json
    import sys

    from dsr1.serve import server

    if precision is not None:  # --precision picks the dtype, or what pull quantizes to
        if opts.dtype == "auto" and precision in ("bf16", "fp16", "fp32"):
            opts.dtype = precision
        if deployment.needs_pull and deployment.quant != "none":
            from dsr1.pull import pull

            pull(opts.model, profile=opts.profile, quant=deployment.quant)
        elif precision in ("int8", "nf4"):
            opts.quantize = precision  # a model already here: quantized while loading
    p, sched, cfg, metrics = server.plan(opts, progress=out.info, deployment=deployment)
    for w in p.warnings:
        out.warn(w)
    gib = 2**30
    quantized = f"; {opts.quantize} (bitsandbytes) while loading" if opts.quantize != "none" else ""
    out.info(f"model      {p.model_dir} as [cyan]{p.served_name}[/] ({p.dtype}: {p.dtype_reason}{quantized}; "
             f"loaded in {p.load_seconds}s)")
    out.info(f"profile    {p.profile}; device {p.device}")
    out.info(f"batching   {p.max_concurrent} running, {p.max_queue} queued, context {p.max_model_len} tokens, "
             f"prefill chunk {p.prefill_chunk}")
    out.info(f"kv cache   {p.kv_cache_bytes / gib:.2f} GiB ({p.kv_bytes_per_token} B/token) of a "
             f"{p.memory_budget_bytes / gib:.1f} GiB budget")
    fields = "reasoning_content and reasoning" if opts.reasoning_field == "both" else opts.reasoning_field
    split = f"{p.reasoning_parser}, into {fields}" if p.reasoning_parser != "none" else "off, everything in content"
    out.info(f"reasoning  {split} ({p.reasoning_why}); system prompt: {p.system_prompt}")
    compiled = f", compiled in {p.compile_seconds}s" if p.forward == "compiled" else ""
    extras = [f"prefix cache {p.prefix_cache_bytes / 2**20:.0f} MiB" if p.prefix_cache_bytes else "prefix cache off",
              f"speculative {p.speculative}"]
    out.info(f"forward    {p.forward} ({p.forward_reason}{compiled}); {'; '.join(extras)}")

    def ready(url: str) -> None:
        if json:
            event = {"event": "ready", "url": url, "plan": _plan_dict(p), "deployment": _plan_dict(deployment)}
            sys.stdout.write(_json.dumps(event) + "\n")
            sys.stdout.flush()
        # Always on stderr, unconditionally: scripts and tests wait for this line.
        from dsr1.serve import requestlog

        requestlog.ready(url)

    server.run(opts, p, sched, cfg, metrics, ready)


def _pull_then_plan(model: str, profile, overrides, out, deployment):
    """An external engine loads what is in the store: pull the plan's checkpoint first (no
    bitsandbytes: vLLM/SGLang load it as published), then plan on the stored copy."""
    from dataclasses import replace

    from dsr1 import plan as planner
    from dsr1.pull import pull

    if deployment.checkpoint and deployment.model_path == deployment.checkpoint and deployment.catalog_name \
            and deployment.checkpoint != planner.catalog.get(deployment.catalog_name).repo:
        # a quantized checkpoint of a catalog model: stored under its own name, served under the model's
        name = f"{deployment.catalog_name}-{deployment.precision}-{deployment.checkpoint_format}"
        out.info(f"dsr1 serve: pulling {deployment.checkpoint} (the {deployment.precision} checkpoint) as {name}")
        pull(deployment.checkpoint, name=name, quant="none")
        return planner.make_plan(name, profile, replace(overrides, served_name=overrides.served_name or model))
    out.info(f"dsr1 serve: {model} is not in the store; pulling it first")
    pull(model, profile=profile, quant="none")
    return planner.make_plan(model, profile, overrides)


def render_plan(c, p) -> None:
    """The plan for people: what runs where, and why."""
    gib = 2**30
    c.rule(f"[bold]dsr1 serve plan: {p.model}")
    c.print(f"[bold]engine[/]     {p.engine}{' ' + p.engine_version if p.engine_version else ''} ({p.engine_reason}); "
            f"flags checked against: {p.checked_against or 'nothing installed'}")
    where = f"{p.gpus_per_node}x {p.gpu_name}" if p.device == "cuda" else "CPU"
    c.print(f"[bold]hardware[/]   {p.nodes_count} node(s) x {where}; profile {p.profile} ({p.profile_source})")
    c.print(f"[bold]model[/]      {p.model_path} as {p.served_name}; precision {p.precision}"
            f"{', --quantization ' + p.quantization if p.quantization else ''}; reasoning parser {p.reasoning_parser}")
    c.print(f"[bold]parallel[/]   TP {p.tensor_parallel} x PP {p.pipeline_parallel} x DP {p.data_parallel}"
            f"{f', DP attention {p.dp_attention}' if p.dp_attention > 1 else ''}")
    c.print(f"[bold]memory[/]     utilization {p.memory_utilization:g} ({p.memory_utilization_reason}); weights "
            f"{p.weights_bytes_per_device / gib:.1f} GiB per device; KV {p.kv_budget_bytes / gib:.1f} GiB = "
            f"{p.kv_capacity_tokens:,} tokens per device")
    c.print(f"[bold]context[/]    {p.max_model_len:,} tokens; {p.max_num_seqs} concurrent sequences "
            f"({p.sequences_at_full_context} at full context)")
    for n in p.nodes:
        c.print(f"[bold]node {n.rank}[/] ({n.role})")
        for k, v in sorted(n.env.items()):
            c.print(f"  {k}={v}", soft_wrap=True, markup=False)
        for cmd in n.setup:
            c.print("  " + shlex.join(cmd), soft_wrap=True, markup=False)
        c.print("  " + shlex.join(n.argv), soft_wrap=True, markup=False)
    for note in p.notes:
        c.print(f"[dim]note: {note}[/]")
    for w in p.warnings:
        c.print(f"[yellow]warning:[/] {w}")


def _plan_dict(p) -> dict:
    from dsr1.output import to_jsonable

    return to_jsonable(p)
