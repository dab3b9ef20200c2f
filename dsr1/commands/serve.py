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

    if reasoning_field not in ("reasoning_content", "reasoning", "both"):
        raise UsageError(f"--reasoning-field {reasoning_field!r}", hint="use reasoning_content, reasoning or both")
    if system_prompt not in ("auto", "keep", "merge", "drop"):
        raise UsageError(f"--system-prompt {system_prompt!r}", hint="use auto, keep, merge or drop")
    if audit_content and not audit_log:
        raise UsageError("--audit-content needs --audit-log", hint="add --audit-log PATH")
    from dsr1 import launch
    from dsr1 import lora as _lora
    from dsr1.serve import requestlog

    requestlog.configure(log_format, content=log_content)
    out = requestlog.output(json, quiet)
    # every serve setting by name, as given or defaulted: one set for the plan and the server
    values = {k: v for k, v in locals().items() if k in SETTINGS}
    values["lora"] = _lora.parse_specs(lora or [])
    values["api_key"] = _api_key(api_key, api_key_file)
    # typed on this command line (an environment default such as DSR1_ENGINE_PYTHON asks nothing of it)
    given = {n for n in SETTINGS if (src := ctx.get_parameter_source(n)) is not None and src.name == "COMMANDLINE"}
    opts, overrides, note = launch.settings(model, profile, values, given=given, use_tuned=use_tuned)
    launch.check_guards(overrides.engine, opts)
    if note:
        out.info(note)
    from dsr1 import plan as planner

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
    launch.run(deployment, opts, overrides, out, json=json, expect_model=expect_model)


# The serve settings among serve()'s parameters (the rest choose what the command does with them).
SETTINGS = ("host", "port", "max_concurrent", "max_queue", "max_model_len", "dtype", "device_map", "max_memory",
            "offload_dir", "stream_interval", "prefill_chunk", "threads", "max_batched_tokens", "served_model_name",
            "reasoning_parser", "reasoning_field", "system_prompt", "audit_log", "audit_content", "audit_max_mb",
            "audit_backups", "guard", "guard_plugin", "grace", "fast_path", "compile", "prefix_cache_mb",
            "speculative", "draft_model", "num_speculative_tokens", "engine", "engine_python", "precision",
            "memory_utilization", "tensor_parallel", "pipeline_parallel", "data_parallel", "engine_port", "nodes",
            "node_rank", "node_metrics_port", "head", "expect_model")


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
    if p.engine == "embedded":
        c.print(f"[bold]embedded[/]   dtype {p.dtype} ({p.dtype_reason}); forward "
                f"{'compiled' if p.compile else 'fast' if p.fast_path_reason is None else 'transformers'} "
                f"({p.compile_reason}); prefix cache {p.prefix_cache_bytes / 2**20:.0f} MiB; queue {p.max_queue}")
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
