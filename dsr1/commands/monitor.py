"""`dsr1 monitor init` and `dsr1 monitor agent`: thin CLI over dsr1.monitoring."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dsr1.commands.options import JsonOpt, ProfileOpt, QuietOpt


def init(
    directory: Path = typer.Argument(..., help="Folder to write the monitoring setup into (created if missing)."),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="The running `dsr1 serve` (its front on a multi-node head)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="The server's API key file; Prometheus reads it from there to scrape /metrics."),
    scrape_interval: str = typer.Option("5s", "--scrape-interval", help="How often Prometheus scrapes (a Prometheus duration)."),
    ttft_slo: float = typer.Option(2.0, "--ttft-slo", help="Seconds: the alert fires when TTFT p99 stays above this for 5 minutes."),
    prometheus_url: str = typer.Option("http://localhost:9090", "--prometheus-url", help="Prometheus as Grafana reaches it (the datasource URL)."),
    dashboards_path: Optional[str] = typer.Option(None, "--dashboards-path", help="Where Grafana will find DIR/grafana/dashboards (its provisioning reads this path; default: that folder's absolute path here)."),
    model: Optional[str] = typer.Option(None, "--model", help="Write the files from the plan `dsr1 serve MODEL` would run (no server needed); --url is then the address it will listen on."),
    profile: Optional[str] = ProfileOpt,
    engine: str = typer.Option("auto", "--engine", help="With --model: the engine `dsr1 serve` will run (auto, embedded, vllm, sglang, llamacpp)."),
    json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Write Prometheus config, alert rules and a Grafana dashboard for the deployment running at --url, or, with --model, for the one `dsr1 serve MODEL` will run: only panels and alerts for the series it exports (docs/monitoring.md)."""
    from dsr1 import settings
    from dsr1.monitoring import deployment, setup
    from dsr1.output import Output

    out = Output(json, quiet)
    opts = setup.Options(scrape_interval=scrape_interval, ttft_slo_s=ttft_slo, api_key_file=api_key_file,
                         prometheus_url=prometheus_url, dashboards_path=dashboards_path)
    setup.check(opts)
    if model is not None:  # from the plan: what that serve will export, before it runs
        from urllib.parse import urlsplit

        from dsr1 import plan

        u = urlsplit(url)
        p = plan.make_plan(model, profile, plan.Overrides(engine=engine, host=u.hostname or "127.0.0.1",
                                                          port=u.port or 8000, engine_port=1))
        d = deployment.from_plan(p, url)
    else:
        key = api_key_file.expanduser().read_text().strip() if api_key_file else settings.api_key(None)
        d = deployment.fetch(url, key)
    files = setup.write(directory, d, opts)
    from dsr1.monitoring import signals

    result = {"deployment": d, "files": [str(f) for f in files],
              "panels": sum(len(r.panels) for r in signals.rows(d)),
              "alerts": [a.name for a in signals.alerts(d, ttft_slo_s=ttft_slo)],
              "next": f"prometheus --config.file {directory / 'prometheus.yml'}"}

    def render(c) -> None:
        c.print(f"[bold]{d.model}[/] on {d.engine} at {d.url}: {result['panels']} panels, "
                f"{len(result['alerts'])} alerts ({', '.join(result['alerts'])})")
        for f in files:
            c.print(f"  wrote {f}")
        c.print(f"next: {result['next']}   (Grafana: point its provisioning at "
                f"{directory / 'grafana/provisioning'}, or `docker compose -f deploy/compose.yaml up`)")

    out.result(result, render)


SUBCOMMANDS = {"init": init}
