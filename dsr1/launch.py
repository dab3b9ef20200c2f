"""Run a deployment plan: what `dsr1 serve` and `dsr1.Deployer.serve` both call.

    values = {"max_concurrent": 8, "engine": "auto", ...}   # serve settings by name
    opts, overrides, note = launch.settings(model, profile, values, given={"max_concurrent"})
    plan = dsr1.plan.make_plan(model, profile, overrides)     # what --dry-run prints
    launch.run(plan, opts, overrides, out)                    # until SIGTERM / Ctrl-C

`settings` turns one set of named values into the two things the flow reads: the deployment
plan's `Overrides` and the server's `ServeOptions` (a name both know goes to both), after the tuned
profile `dsr1 bench tune` wrote for this model and machine has filled what was not given. `run` pulls
what the plan loads, refuses what its engine cannot honour and starts it: the embedded engine in
this process, an external one as a supervised child behind dsr1's front.
"""

from __future__ import annotations

import dataclasses
import json as _json
import sys
from typing import Any, Callable, Mapping

from dsr1 import servesettings
from dsr1.errors import UsageError

# serve settings whose name differs between the command line and ServeOptions/Overrides
RENAMES = {"served_model_name": "served_name"}


def settings(model: str, profile: str | None, values: Mapping[str, Any], *, given: set[str] = frozenset(),
             use_tuned: bool = True):
    """(ServeOptions, Overrides, tuned-profile note or None) from named serve settings. The tuned
    profile fills only settings not in `given` (flags on the command line win)."""
    from dsr1 import plan as planner
    from dsr1.serve import server

    values = {RENAMES.get(k, k): v for k, v in values.items()}
    note = engine_why = None
    if use_tuned:
        from dsr1 import tuned

        t = tuned.find(model)
        if t is not None:
            mine = {RENAMES.get(k, k) for k in given}
            applied = {k: v for k, v in t.settings.items() if k not in mine}
            values.update(applied)
            if "engine" in applied:
                engine_why = (f"tuned profile: {applied['engine']} measured best on this machine"
                              + (f" ({t.goodput:.2f} req/s under {t.slo})" if t.goodput else "") + f"; {t.path}")
            note = (f"tuned profile {t.path}: " + " ".join(f"{k}={v}" for k, v in applied.items())
                    + (f" (measured {t.goodput:.2f} req/s under {t.slo}, {t.default_goodput:.2f} with defaults)"
                       if t.goodput else "")
                    + ("; " + ", ".join(f"--{k.replace('_', '-')} given here" for k in sorted(mine & set(t.settings)))
                       if mine & set(t.settings) else "")
                    + "; --no-tuned ignores it")
    values["lora"] = list(values.get("lora") or [])
    opt_fields = {f.name for f in dataclasses.fields(server.ServeOptions)}
    ovr_fields = {f.name for f in dataclasses.fields(planner.Overrides)}
    declared = {RENAMES.get(s.name, s.name) for s in servesettings.SETTINGS} | {"api_key"}
    unknown = set(values) - declared
    if unknown:
        raise UsageError(f"unknown serve setting(s): {', '.join(sorted(unknown))}",
                         hint="see `dsr1 serve --help` for the settings and their names")
    opts = server.ServeOptions(model=model, profile=profile, **{k: v for k, v in values.items() if k in opt_fields})
    ovr = {k: v for k, v in values.items() if k in ovr_fields}
    ovr["lora"] = tuple(values["lora"])
    mine = {RENAMES.get(k, k) for k in given}
    ovr["given"] = tuple((k, values[k]) for k in sorted(mine) if k in values)
    ovr["engine_why"] = engine_why
    return opts, planner.Overrides(**ovr), note


def check_start(opts) -> None:
    """What a real start reads before anything loads, read now so `--dry-run` refuses what `serve`
    would: the guard policy (--guard) and plugin (--guard-plugin); adapters are read by the plan."""
    from dsr1.serve.server import load_guards

    load_guards(opts)


def run(deployment, opts, overrides, out, *, json: bool = False, on_ready: Callable[[str], None] | None = None,
        expect_model: str | None = None) -> None:
    """Serve `deployment` (dsr1.plan.Plan) until a signal; pull first what it loads."""
    for w in deployment.warnings:
        out.warn(w)
    if deployment.engine != "embedded":
        if deployment.needs_pull:
            deployment = _pull_then_plan(opts.model, opts.profile, overrides, out, deployment)
        from dsr1.serve.external import serve_external

        serve_external(deployment, opts, out, on_ready, expect_model=expect_model)
        return
    _serve_embedded(opts, overrides, deployment, out, json=json, on_ready=on_ready)
    out.info("dsr1 serve: stopped")


def _pull_then_plan(model: str, profile, overrides, out, deployment):
    """An external engine loads what is in the store: pull the plan's checkpoint first (no
    bitsandbytes: vLLM/SGLang load it as published), then plan on the stored copy."""
    from dsr1 import catalog
    from dsr1 import plan as planner
    from dsr1.pull import pull

    if deployment.checkpoint and deployment.model_path == deployment.checkpoint and deployment.catalog_name \
            and deployment.checkpoint != catalog.get(deployment.catalog_name).repo:
        # a quantized checkpoint of a catalog model: stored under its own name, served under the model's
        name = (f"{deployment.catalog_name}-{deployment.gguf_quant}".lower() if deployment.checkpoint_format == "gguf"
                else f"{deployment.catalog_name}-{deployment.precision}-{deployment.checkpoint_format}")
        out.info(f"dsr1 serve: pulling {deployment.checkpoint} (the {deployment.precision} checkpoint) as {name}")
        pull(deployment.checkpoint, name=name, quant="none")
        return planner.make_plan(model, profile, overrides)  # the plan now loads the stored copy
    out.info(f"dsr1 serve: {model} is not in the store; pulling it first")
    pull(model, profile=profile, quant="none")
    return planner.make_plan(model, profile, overrides)


def _serve_embedded(opts, overrides, deployment, out, *, json: bool, on_ready) -> None:
    """The embedded engine, in this process: load, print every choice, serve until a signal."""
    from dsr1 import preflight
    from dsr1.serve import server

    # a busy port fails now, not after loading the model (seconds to minutes), as the external engines' do
    preflight.port_free(opts.host, opts.port, "the API", "--port")

    precision = overrides.precision
    if precision is not None:  # the plan took --precision's dtype; here: what pull quantizes to
        if deployment.needs_pull and deployment.quant != "none":
            from dsr1.pull import pull

            pull(opts.model, profile=opts.profile, quant=deployment.quant)
        elif deployment.weights:
            pass  # the fast path packs the weights itself at load (the plan's `weights`)
        elif precision in ("int8", "nf4"):
            opts.quantize = precision  # a model already here: quantized while loading
    p, backend, cfg, metrics = server.plan(opts, progress=out.info, deployment=deployment)
    for w in p.warnings:
        out.warn(w)
    gib = 2**30
    quantized = f"; {opts.quantize} (bitsandbytes) while loading" if opts.quantize != "none" else \
        f"; weight-only {deployment.weights}, packed at load" if deployment.weights else ""
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
    compiled = f", ready in {p.compile_seconds}s" if p.forward == "compiled" else ""
    extras = [f"prefix cache {p.prefix_cache_bytes / 2**20:.0f} MiB" if p.prefix_cache_bytes else "prefix cache off",
              f"speculative {p.speculative}"]
    packed = (f" with weight-only {deployment.weights}" if deployment.weights and p.forward in ("fast", "compiled")
              else "")
    out.info(f"forward    {p.forward}{packed} ({p.forward_reason}{compiled}); {'; '.join(extras)}")

    def ready(url: str) -> None:
        if json:
            from dsr1.output import to_jsonable

            event = {"event": "ready", "url": url, "plan": to_jsonable(p), "deployment": to_jsonable(deployment)}
            sys.stdout.write(_json.dumps(event) + "\n")
            sys.stdout.flush()
        # Always on stderr, unconditionally: scripts and tests wait for this line.
        from dsr1.serve import requestlog

        requestlog.ready(url)
        if on_ready is not None:
            on_ready(url)

    server.run(opts, p, backend, cfg, metrics, ready)
