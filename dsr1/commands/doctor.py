from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dsr1.commands.options import JsonOpt, ProfileOpt, QuietOpt
from dsr1.output import Output

_MARK = {"pass": "[green]pass[/]", "warn": "[yellow]warn[/]", "fail": "[red]fail[/]", "info": "[blue]info[/]"}


def doctor(profile: Optional[str] = ProfileOpt, json: bool = JsonOpt, quiet: bool = QuietOpt) -> None:
    """Exit 0 when the machine (or, with --profile for hardware this machine lacks, the profile's
    hardware) can serve at least one model, 5 when it cannot. Each row is the plan `dsr1 serve MODEL
    --dry-run` makes. The --json schema is dsr1/schemas/doctor.schema.json (docs/doctor.md)."""
    from dsr1 import doctor as core

    report = core.run(profile)
    Output(json, quiet).result(report, lambda c: render(c, report))
    if not report.can_serve:
        raise typer.Exit(5)


def render(c: Console, r) -> None:
    c.rule("[bold]dsr1 doctor")
    h = r.host
    c.print(f"[bold]Host[/]  {h.cpu_model}, {h.cores_physical} cores ({h.cores_logical} threads), "
            f"RAM {h.usable_ram / 1e9:.1f} GB, flags: {', '.join(h.cpu_flags) or 'none of note'}")
    c.print(f"[bold]Disk[/]  {h.disk_free / 1e9:.0f} GB free of {h.disk_total / 1e9:.0f} GB at {h.store_path} ({h.disk_kind})")
    if r.gpus.gpus:
        t = Table(title=f"GPUs (driver {r.gpus.driver_version}, CUDA {r.gpus.cuda_driver_version})", title_justify="left")
        for col in ("#", "name", "memory", "cc", "PCIe", "NVLink", "temp", "power", "procs"):
            t.add_column(col)
        for g in r.gpus.gpus:
            t.add_row(str(g.index), g.name, f"{g.memory_free / 1e9:.0f}/{g.memory_total / 1e9:.0f} GB", g.compute_capability or "?",
                      f"gen{g.pcie_gen_current or '?'} x{g.pcie_width_current or '?'}",
                      f"{g.nvlink_active_links} links, {g.nvlink_bandwidth_gbps:.0f} GB/s" if g.nvlink_active_links else "-",
                      f"{g.temperature_c} C" if g.temperature_c is not None else "-",
                      f"{g.power_w:.0f}/{g.power_limit_w:.0f} W" if g.power_w is not None and g.power_limit_w else "-",
                      str(len(g.processes)))
        c.print(t)
    else:
        c.print("[bold]GPUs[/]  none")
    if r.host.infiniband:
        c.print("[bold]InfiniBand[/]  " + "; ".join(f"{p.device}/{p.port} {p.state} {p.rate} ({p.link_layer})" for p in r.host.infiniband))
    sw = r.software
    pkgs = ", ".join(f"{k} {v}" for k, v in sw.packages.items() if v)
    c.print(f"[bold]Software[/]  Python {sw.python}; {pkgs}; torch CUDA build: {sw.torch_cuda or 'none (CPU)'}")
    c.print()
    c.print("[bold]Checks")
    for f in r.checks:
        c.print(f"  {_MARK.get(f.level, f.level)}  {f.message}" + (f"\n        fix: {f.fix}" if f.fix else ""))
    c.print()
    how = {"selected": "chosen for this machine", "requested": "requested",
           "virtual": "requested; planned for its own hardware, not this machine's"}[r.profile_source]
    c.print(f"[bold]Profile[/]  [cyan]{r.profile}[/] ({how})")
    for rej in r.rejected_profiles:
        c.print(f"  not {rej['profile']}: {'; '.join(rej['unmet'])}")
    for note in r.notes:
        c.print(f"  [dim]{note}[/]")
    c.print()
    c.print(models_table(r.recommendations, title="What fits"))
    c.print()
    if r.next_command:
        c.print(f"[bold]Next:[/] [green]{r.next_command}[/]")
    else:
        c.print("[red]Nothing in the catalog fits this machine.[/] See the failed checks above.")


def models_table(recs, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("model", no_wrap=True)
    for col in ("fits", "engine", "precision", "TPxPPxDP", "memory", "context", "seqs", "why not / where"):
        t.add_column(col)
    for rec in recs:
        if rec.fits:
            t.add_row(rec.model, "[green]yes[/]", rec.engine, rec.precision,
                      f"{rec.tensor_parallel}x{rec.pipeline_parallel}x{rec.data_parallel}", f"{rec.memory_gb:.1f} GB",
                      f"{rec.context:,}", str(rec.max_sequences),
                      f"[dim]{rec.repo}: {rec.placement}[/]" if rec.placement else "")
        else:
            t.add_row(rec.model, "[red]no[/]", "", "", "", "", "", "", f"[dim]{rec.reason}[/]")
    return t
