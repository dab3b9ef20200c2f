"""`dsr1 bench tune MODEL --slo ...`: the CLI side of dsr1.bench.tune (progress, files, output)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsr1.errors import UsageError


def default_engines(model: str) -> list[str]:
    """The embedded engine, plus each installed external engine that can serve this model
    (llama-server needs a GGUF file; vLLM and SGLang a safetensors directory)."""
    from dsr1.engines import envs

    is_gguf = str(model).endswith(".gguf")
    out = [] if is_gguf else ["embedded"]
    for name in ("vllm", "sglang", "llamacpp"):
        if (name == "llamacpp") != is_gguf:
            continue
        try:
            if envs.find(name) is not None:
                out.append(name)
        except Exception:  # a half-installed engine is not a candidate
            continue
    return out


def run_tune(model: str, *, slo: str | None, engines: str | None, budget: str, input_len: str, output_len: str,
             requests: int | None, max_load: int, seed: int, out: Path | None, server_timeout: float,
             json_mode: bool, quiet: bool) -> None:
    from dsr1 import tuned
    from dsr1.bench import tune
    from dsr1.output import Output
    from dsr1.probe.gpu import probe_gpus

    o = Output(json_mode, quiet)
    targets = tune.parse_slo(slo or "")
    budget_s = tune.parse_budget(budget)
    names = [e.strip() for e in engines.split(",") if e.strip()] if engines else default_engines(model)
    for e in names:
        if e not in tune.KNOBS:
            raise UsageError(f"--engine {e!r} cannot be tuned", hint=f"use some of {', '.join(tune.KNOBS)}")
    if not names:
        raise UsageError("no engine to tune", hint="pass --engine embedded, or install one (`dsr1 engine install vllm`)")
    if max_load < 1:
        raise UsageError("--max-load must be at least 1")
    hardware = tuned.hardware_id()
    profile_path = tuned.path_for(model, hardware)
    out_dir = out or profile_path.with_suffix("")
    cfg = tune.TuneConfig(model=model, slo=targets, engines=names, budget_s=budget_s, out_dir=out_dir,
                          input_len=input_len, output_len=output_len, requests=requests, max_load=max_load, seed=seed,
                          cuda=bool(probe_gpus().gpus), server_timeout=server_timeout)
    o.info(f"tuning {model} on {hardware}: engines {', '.join(names)}; SLO {tune.slo_text(targets)}; "
           f"budget {budget_s:.0f} s; state and report in {out_dir}")

    def cand_start(c, i, left):
        o.info(f"#{i} {c.key}: starting dsr1 serve {' '.join(c.serve_args())} ({left:.0f} s of budget left)")

    def level_done(c, lv):
        pct = ", ".join(f"{k} {v} ms" for k, v in lv.percentiles.items())
        o.info(f"    concurrency {lv.concurrency}: goodput {lv.goodput:.2f} req/s, {lv.throughput:.1f} tok/s, {pct}"
               f" -> {'held' if lv.held else 'SLO broken'}")

    def cand_done(r):
        o.info(f"    => {r.score:.3f} req/s" + (f" at concurrency {r.best_load}" if r.best_load else "")
               + (f" ({r.error})" if r.error else "") + f", {r.seconds:.0f} s")

    hooks = tune.Hooks(info=o.info, candidate_start=cand_start, level_done=level_done, candidate_done=cand_done)
    try:
        outcome = tune.tune(cfg, hooks)
    except KeyboardInterrupt:
        o.warn(f"interrupted: finished candidates are kept in {out_dir / 'state.json'}; run the same command "
               f"again to resume")
        raise
    files = tune.write_report(cfg, outcome)
    data: dict[str, Any] = {"model": model, "hardware": hardware, "slo": tune.slo_text(targets),
                            "engines": names, "seconds": round(outcome.seconds, 1), "resumed": outcome.resumed,
                            "results": [r.to_json() for r in outcome.results],
                            "skipped": [{"candidate": k, "why": why} for k, why in outcome.skipped],
                            "files": files, "best": None, "tuned_profile": None}
    if outcome.best is None:
        o.warn("no candidate met the SLO at any load: nothing written as a tuned profile "
               "(loosen --slo, or shorten --input-len/--output-len)")
    else:
        t = tune.tuned_profile(cfg, outcome, hardware)
        tuned.write(t, profile_path)
        data["best"] = outcome.best.to_json()
        data["tuned_profile"] = str(profile_path)
        data["command"] = t.command

    def render(c) -> None:
        from rich.table import Table

        table = Table(title=f"goodput under {tune.slo_text(targets)}")
        for col in ("candidate", "goodput req/s", "at load", "time s"):
            table.add_column(col)
        for r in outcome.results:
            table.add_row(r.candidate.key, f"{r.score:.3f}", str(r.best_load or "-"), f"{r.seconds:.0f}")
        c.print(table)
        for k, why in outcome.skipped:
            c.print(f"[yellow]skipped {k}: {why}[/]")
        if outcome.best is not None:
            base = outcome.defaults.get(outcome.best.candidate.engine)
            gain = f" ({outcome.best.score / base.score:.2f}x its engine's defaults)" if base and base.score else ""
            c.print(f"best: [bold]{outcome.best.candidate.key}[/] {outcome.best.score:.3f} req/s{gain}")
            c.print(f"tuned profile: {profile_path} (dsr1 serve {model} uses it from now on)")
            c.print(f"reproduce: {data['command']}")
        c.print(f"report: {files['report']}" + (f"  plot: {files['plot']}" if "plot" in files else ""))

    o.result(data, render)
