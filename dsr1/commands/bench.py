from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from dsr1.commands.options import JsonOpt, QuietOpt
from dsr1.errors import UsageError


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a list of integers", hint=f"e.g. {flag} 1,2,4,8") from None


def _rates(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]  # float() reads "inf" too
    except ValueError:
        raise UsageError(f"--rate {text!r} is not a list of rates", hint="e.g. --rate 1,2,4,inf") from None


def bench(
    target: Optional[list[str]] = typer.Argument(
        None, metavar="[MODEL | compare A.json B.json ...]",
        help="A model for `dsr1 serve` to run for the benchmark (omit with --url); `compare` and results files; "
             "or `tune` and a model."),
    url: Optional[str] = typer.Option(None, "--url", help="Base URL of a running OpenAI-compatible server."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name the server serves (default: its first)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Bearer key the server expects (or DSR1_API_KEY)."),
    endpoint: str = typer.Option("chat", "--endpoint", help="chat (/v1/chat/completions) or completions."),
    concurrency: Optional[str] = typer.Option(None, "--concurrency", help="Closed-loop sweep: users in flight, e.g. 1,2,4,8,16."),
    rate: Optional[str] = typer.Option(None, "--rate", help="Open-loop sweep: requests/s, e.g. 1,2,4,inf."),
    arrival: str = typer.Option("poisson", "--arrival", help="Open-loop arrivals: poisson or constant."),
    max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency", help="Cap on requests in flight in open loop."),
    requests: Optional[int] = typer.Option(None, "--requests", help="Requests per point (default 100 unless --duration)."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Seconds per point (with --requests: first bound wins)."),
    warmup: int = typer.Option(2, "--warmup", help="Uncounted warm-up requests before each point."),
    input_len: str = typer.Option("256", "--input-len", help="Prompt tokens, chat template included: 256 or 128-512."),
    output_len: Optional[str] = typer.Option(None, "--output-len", help="Output tokens: 128 or 64-256 (default 128; "
                                             "with --dataset: the dataset reply's length)."),
    prefix_len: int = typer.Option(0, "--prefix-len", help="Tokens of a prefix shared by every random prompt."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="ShareGPT-format JSON file instead of random prompts."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer: a model directory, a stored model's "
                                            "name or a hub id (default: the model's; see docs/bench.md)."),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--no-ignore-eos", help="Ask the server to generate exactly the output length."),
    think_tags: bool = typer.Option(False, "--think-tags", help="Count content before </think> as reasoning (R1 "
                                    "served without a reasoning parser)."),
    slo: Optional[str] = typer.Option(None, "--slo", help="Goodput limits in ms: ttft=2000,tpot=80 (also e2el, ttft_answer, itl) or mlperf-r1."),
    seed: int = typer.Option(0, "--seed", help="Seed for prompts, lengths and arrivals."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds before one request counts as a timeout."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for results.json, CSV and plots (default bench-results/<time>)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots."),
    serve_arg: Optional[list[str]] = typer.Option(None, "--serve-arg", help="Extra argument for `dsr1 serve` (repeatable)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="tune: engines to try, e.g. embedded,vllm (default: the "
                                         "embedded engine and every installed engine that can serve the model)."),
    budget: str = typer.Option("30m", "--budget", help="tune: time allowed, e.g. 30m, 90s, 1h; candidates that would "
                               "overrun it are skipped and listed."),
    max_load: int = typer.Option(64, "--max-load", help="tune: highest concurrency tried on one candidate."),
    server_timeout: float = typer.Option(600.0, "--server-timeout", help="Seconds to wait for `dsr1 serve` to be ready."),
    json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Measure TTFT, TPOT, ITL, latency and throughput of an OpenAI-compatible server across
    a concurrency or request-rate sweep, as vLLM's benchmark_serving defines them. Writes
    results.json (schema: dsr1/data/bench-results.schema.json), CSV and PNG plots; see docs/bench.md.
    `dsr1 bench compare A.json B.json` shows results side by side."""
    args = target or []
    if args and args[0] == "compare":
        return _compare(args[1:], json)
    if args and args[0] == "tune":
        if len(args) != 2 or url:
            raise UsageError("tune measures servers it starts itself", hint="dsr1 bench tune MODEL --slo ttft_p99=2s,tpot_p99=100ms")
        from dsr1.commands.tune import run_tune

        return run_tune(args[1], slo=slo, engines=engine, budget=budget, input_len=input_len,
                        output_len=output_len or "128", requests=requests, max_load=max_load, seed=seed, out=out,
                        server_timeout=server_timeout, json_mode=json, quiet=quiet)
    if len(args) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(args[1:])}",
                         hint="pass one MODEL, or --url; or `dsr1 bench compare A.json B.json`")
    serve_model = args[0] if args else None
    if (serve_model is None) == (url is None):
        raise UsageError("say which server to measure",
                         hint="pass --url http://HOST:PORT for a running server, or a MODEL for dsr1 serve to run")
    from dsr1 import settings
    from dsr1.bench.metrics import parse_slo
    from dsr1.bench.sweep import BenchConfig

    # Same source as `dsr1 serve` and `dsr1 chat`: a DSR1_API_KEY that a spawned `dsr1 serve`
    # inherits (and then requires) is also the key the benchmark sends.
    api_key = settings.api_key(api_key)

    cfg = BenchConfig(url=url or "", model=model, api_key=api_key, endpoint=endpoint,
                      concurrency=_ints(concurrency, "--concurrency") if concurrency else [],
                      rate=_rates(rate) if rate else [], arrival=arrival, max_concurrency=max_concurrency,
                      requests=requests if (requests is not None or duration is not None) else 100,
                      duration=duration, warmup=warmup, input_len=input_len,
                      output_len=output_len or ("128" if dataset is None else ""), prefix_len=prefix_len,
                      dataset=str(dataset) if dataset else None, tokenizer=tokenizer, ignore_eos=ignore_eos,
                      slo=parse_slo(slo), seed=seed, timeout=timeout, think_tags=think_tags)
    if not cfg.concurrency and not cfg.rate:
        cfg.concurrency = [1, 2, 4, 8, 16]
    cfg.validate()
    import datetime as dt

    out_dir = out or Path("bench-results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if serve_model is None:
        return _run(cfg, serve_model, out_dir, plots, json, quiet, {"started_by_dsr1": False})
    from dsr1.serve.child import running

    with running(serve_model, log=out_dir / "server.log", extra_args=serve_arg, timeout=server_timeout,
                 api_key=cfg.api_key) as base:
        cfg.url = base
        return _run(cfg, serve_model, out_dir, plots, json, quiet,
                    {"started_by_dsr1": True, "serve_command": ["dsr1", "serve", serve_model, *(serve_arg or [])]})


def _run(cfg: Any, serve_model: str | None, out_dir: Path, plots: bool, json_mode: bool, quiet: bool,
         server_extra: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dsr1.bench import report
    from dsr1.bench.sweep import Hooks, check_server, new_document, run_sweep
    from dsr1.bench.workload import build_workload, token_counter
    from dsr1.output import Output

    o = Output(json_mode, quiet)
    # Preflight first: a wrong URL, model or key fails in a second, before the tokenizer loads.
    info = check_server(cfg)
    o.info(f"server {info.base_url} serves [cyan]{info.model}[/]; usage reported: {info.usage_reported}")
    if cfg.ignore_eos and info.ignore_eos_honoured is False:
        o.warn("the server stopped before max_tokens with ignore_eos set: output lengths will be short "
               "(see short_outputs in the results)")
    workload, choice = build_workload(cfg, serve_model)
    if choice.tokenizer is None:  # a dataset run can do without: the server's usage counts
        o.info(f"tokenizer: none found ({escape('; '.join(choice.tried))}); token counts come from the server's usage")
    else:
        o.info(f"tokenizer: {escape(choice.label)}")

    show = not (json_mode or quiet)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("ok {task.fields[ok]} err {task.fields[err]}"), TimeElapsedColumn(),
                        console=o.err, disable=not show, transient=False)
    state: dict[str, Any] = {}

    def point_start(i: int, label: str, total: int | None) -> None:
        state["task"] = progress.add_task(label, total=total, ok=0, err=0)
        state["ok"] = state["err"] = 0

    def request_done(r) -> None:
        state["ok" if r.ok else "err"] += 1
        progress.update(state["task"], advance=1, ok=state["ok"], err=state["err"])

    def point_done(p) -> None:
        s = p["summary"]
        progress.update(state["task"], description=f"{report.point_label(p)}: {s['request_throughput']:.2f} req/s, "
                        f"{s['output_throughput']:.1f} tok/s")

    def preparing(n: int) -> None:
        if show and n >= 500:
            progress.console.print(f"preparing {n} prompts...")

    hooks = Hooks(preparing=preparing, point_start=point_start, request_done=request_done, point_done=point_done)
    # Ours, not run_sweep's: on Ctrl-C it still holds the finished points (already written to
    # out_dir by run_sweep), whatever an earlier run left in out_dir.
    doc = new_document(cfg, tokenizer=choice.public())
    try:
        with progress:
            run_sweep(cfg, workload, encode=token_counter(choice.tokenizer), out_dir=out_dir, hooks=hooks,
                      server_extra=server_extra, info=info, doc=doc)
    except KeyboardInterrupt:
        if doc["points"]:
            _finish(doc, out_dir, plots, o)
            o.warn(f"interrupted: {len(doc['points'])} finished point(s) kept in {out_dir}")
        raise
    _finish(doc, out_dir, plots, o)


def _finish(doc: dict[str, Any], out_dir: Path, plots: bool, o: Any) -> None:
    from dsr1.bench import report

    files = {k: str(v) for k, v in report.paths(out_dir).items()}  # run_sweep wrote them after each point
    if plots:
        from dsr1.bench.plots import write_plots

        files["plots"] = [str(p) for p in write_plots(doc, out_dir)]
    data = {k: v for k, v in doc.items() if k != "points"}
    data["points"] = [{k: v for k, v in p.items() if k != "requests"} for p in doc["points"]]
    data["files"] = files

    def render(c) -> None:
        env = doc.get("environment") or {}
        if (env.get("load_average_1m") or 0) > (env.get("cpu_count") or 1):
            c.print(f"[yellow]the client machine was busy (load average {env['load_average_1m']:.1f} on "
                    f"{env['cpu_count']} CPUs): client-side latency may be inflated[/]")
        for table in report.sweep_tables(doc):
            c.print(table)
        for p in doc["points"]:
            s = p["summary"]
            chk = s["token_check"]
            if chk["mismatched"]:
                c.print(f"[yellow]{report.point_label(p)}: client tokenizer disagrees with server usage on "
                        f"{chk['mismatched']}/{chk['compared']} requests ({chk['client_output_tokens']} vs "
                        f"{chk['usage_output_tokens']} output tokens)[/]")
            if s.get("short_outputs"):
                c.print(f"[yellow]{report.point_label(p)}: {s['short_outputs']} responses shorter than max_tokens "
                        f"despite ignore_eos[/]")
            if s["errors"]:
                c.print(f"[red]{report.point_label(p)} errors: {s['errors']}[/]")
            for name, delta in (p.get("server_token_counters") or {}).items():
                if ("generation" in name or "completion" in name) and not s["failed"] \
                        and abs(delta - s["output_tokens"]) > max(1.0, 0.01 * s["output_tokens"]):
                    c.print(f"[yellow]{report.point_label(p)}: the server's {name} grew by {delta:,.0f}, "
                            f"the client counted {s['output_tokens']:,} output tokens[/]")
        c.print(f"results: {files['json']}  csv: {files['csv']}" + (f"  plots: {out_dir}" if plots else ""))

    o.result(data, render)


def _compare(paths: list[str], json_mode: bool) -> None:
    from dsr1.bench import report
    from dsr1.output import Output

    if len(paths) < 2:
        raise UsageError("compare needs at least two results files", hint="dsr1 bench compare A.json B.json")
    docs = [report.load(Path(p)) for p in paths]
    cmp = report.compare(docs, [Path(p).parent.name + "/" + Path(p).name if Path(p).name == "results.json"
                                else Path(p).name for p in paths])
    Output(json_mode).result(cmp, lambda c: c.print(report.compare_table(cmp)))
