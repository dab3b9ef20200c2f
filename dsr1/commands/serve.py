"""`dsr1 serve`: an OpenAI-compatible R1 server; the deployment plan (dsr1.plan) picks the engine.

The embedded engine runs in this process (dsr1.serve.server); vLLM, SGLang and llama.cpp
run as a supervised child behind dsr1's own front (dsr1.serve.external)."""

from __future__ import annotations

import inspect
import shlex
from pathlib import Path
from typing import Optional

import typer

from dsr1 import servesettings
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


def serve(ctx: typer.Context, **kw) -> None:
    """Serve MODEL over HTTP with the OpenAI API (chat, completions, models, health, metrics). R1 reasoning comes back in `reasoning_content`. Stops cleanly on SIGTERM/Ctrl-C. The engine and its settings come from one plan (`--dry-run` prints it): docs/serve.md, docs/engines.md."""
    from dsr1.errors import UsageError

    if kw["reasoning_field"] not in ("reasoning_content", "reasoning", "both"):
        raise UsageError(f"--reasoning-field {kw['reasoning_field']!r}", hint="use reasoning_content, reasoning or both")
    if kw["system_prompt"] not in ("auto", "keep", "merge", "drop"):
        raise UsageError(f"--system-prompt {kw['system_prompt']!r}", hint="use auto, keep, merge or drop")
    if kw["audit_content"] and not kw["audit_log"]:
        raise UsageError("--audit-content needs --audit-log", hint="add --audit-log PATH")
    from dsr1 import launch
    from dsr1 import lora as _lora
    from dsr1.serve import requestlog

    model, profile, json = kw["model"], kw["profile"], kw["json"]
    requestlog.configure(kw["log_format"], content=kw["log_content"])
    out = requestlog.output(json, kw["quiet"])
    # every serve setting by name (dsr1.servesettings), as given or defaulted: one set for plan and server
    values = {s.name: kw[s.name] for s in servesettings.SETTINGS}
    values["lora"] = _lora.parse_specs(kw["lora"] or [])
    values["api_key"] = _api_key(kw["api_key"], kw["api_key_file"])
    # typed on this command line (an environment default such as DSR1_ENGINE_PYTHON asks nothing of it)
    given = {s.name for s in servesettings.SETTINGS
             if (src := ctx.get_parameter_source(s.name)) is not None and src.name == "COMMANDLINE"}
    opts, overrides, note = launch.settings(model, profile, values, given=given, use_tuned=kw["use_tuned"])
    launch.check_start(opts)  # what a real start reads first (guard policy, plugin), --dry-run included
    if note:
        out.info(note)
    from dsr1 import plan as planner

    deployment = planner.make_plan(model, profile, overrides)
    if kw["dry_run"] or kw["emit"]:
        if kw["emit"]:
            from dsr1.emit import write_scripts

            for path in write_scripts(deployment, kw["emit"]):
                out.info(f"wrote {path}")
        if kw["dry_run"] or json:
            out.result(deployment, lambda c: render_plan(c, deployment))
        return
    if kw["check_only"]:
        from dsr1 import preflight

        done = preflight.run(deployment, api_host=kw["host"], expect_model=kw["expect_model"], progress=out.info)
        out.result({"node_rank": kw["node_rank"], "checked": done}, lambda c: [c.print(f"ok: {x}") for x in done])
        return
    launch.run(deployment, opts, overrides, out, json=json, expect_model=kw["expect_model"])


def _parameter(name: str, default, annotation) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


# serve's parameters: the model and profile, every setting of dsr1.servesettings (generated), then what
# chooses what the command does with them
serve.__signature__ = inspect.Signature([
    inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
    _parameter("model", typer.Argument(..., help="Model directory, stored model name, or catalog name."), str),
    _parameter("profile", ProfileOpt, Optional[str]),
    *servesettings.parameters(),
    _parameter("api_key", typer.Option(None, "--api-key", help="Bearer key clients must send (or DSR1_API_KEY)."),
               Optional[str]),
    _parameter("api_key_file", typer.Option(None, "--api-key-file", help="Read the API key from this file."),
               Optional[Path]),
    _parameter("log_format", typer.Option("human", "--log-format", help="Server log on stderr: human, or json (one object per line: request id, status, tokens, timings; for log shippers)."), str),
    _parameter("log_content", typer.Option(False, "--log-content", help="Also put prompts and outputs in the request log (off: never logged)."), bool),
    _parameter("check_only", typer.Option(False, "--check-only", help="Run this node's pre-launch checks (ports, --head, model fingerprint) and exit."), bool),
    _parameter("use_tuned", typer.Option(True, "--tuned/--no-tuned", help="Apply the tuned profile `dsr1 bench tune` wrote for this model on this hardware (DSR1_HOME/profiles/tuned-*.toml) to every option not given here."), bool),
    _parameter("dry_run", typer.Option(False, "--dry-run", help="Print the plan (with --json as JSON) and run nothing."), bool),
    _parameter("emit", typer.Option(None, "--emit", help="Write one launch script per node into this folder; run nothing."), Optional[Path]),
    _parameter("json", JsonOpt, bool),
    _parameter("quiet", QuietOpt, bool),
])
serve.__annotations__ = {p.name: p.annotation for p in serve.__signature__.parameters.values()}


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
    if p.placement:
        from dsr1 import gguf_place

        c.print(f"[bold]placement[/]  {gguf_place.describe(p.placement, p.gguf_quant)}")
    if p.expected_tok_s:
        c.print(f"[bold]expected[/]   {p.expected_tok_s[0]:g}-{p.expected_tok_s[1]:g} output tok/s single-stream, as "
                f"measured elsewhere: {p.expected_source}")
    c.print(f"[bold]context[/]    {p.max_model_len:,} tokens; {p.max_num_seqs} concurrent sequences "
            f"({p.sequences_at_full_context} at full context)")
    if p.engine == "embedded":
        c.print(f"[bold]embedded[/]   dtype {p.dtype} ({p.dtype_reason}); forward "
                f"{'compiled' if p.compile else 'fast' if p.fast_path_reason is None else 'transformers'}"
                f"{f' with weight-only {p.weights}' if p.weights else ''} "
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
