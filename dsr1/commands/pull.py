"""`dsr1 pull`, `dsr1 verify`, `dsr1 list`, `dsr1 rm`: thin wrappers over dsr1.pull and dsr1.store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

from dsr1.commands.options import JsonOpt, ProfileOpt, QuietOpt
from dsr1.download import DEFAULT_WORKERS, MAX_WORKERS, Reporter
from dsr1.output import Output

if TYPE_CHECKING:
    from rich.table import Table

NameArg = typer.Argument(..., help="A stored model's name (see `dsr1 list`).")


class RichReporter(Reporter):
    """One rich progress display on stderr: bytes, speed and ETA for the whole pull."""

    def __init__(self, console: Console):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self.task = None

    def stage(self, text: str) -> None:
        self.close()  # a stage after the download: finish the bar first, so lines stay in order
        self.console.print(f"[dim]{text}[/]")

    def start(self, total: int, done: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("download", total=total, completed=done)

    def file(self, path: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=path[-40:])

    def advance(self, n: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)

    def close(self) -> None:
        if self.task is not None:
            self.progress.update(self.task, description="download")
            self.progress.stop()
            self.task = None


def pull(
    source: str = typer.Argument(..., help="Catalog name, hub repo id (org/name), a GGUF repo and quantization (org/name:Q4_K_M), a .gguf file "
                                       "(of a split set: its first shard) or a model directory."),
    name: Optional[str] = typer.Option(None, "--name", help="Store the model under this name."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit to download (default main)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="none | int8 | nf4 (bitsandbytes). Default: what the profile picks."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub or mirror URL (default: HF_ENDPOINT or https://huggingface.co)."),
    local_dir: Optional[Path] = typer.Option(None, "--local-dir", help="Download here instead of the Hugging Face cache."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (.bin/.pt) when a repo has no safetensors."),
    workers: int = typer.Option(DEFAULT_WORKERS, "--workers", help=f"Files downloaded at once, 1-{MAX_WORKERS}."),
    base: Optional[str] = typer.Option(None, "--base", help="For a LoRA adapter: its base model (stored name or directory); checked against it (default: the adapter's base_model_name_or_path)."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="For a LoRA adapter: store the base model with the adapter merged in, as a model of its own."),
    profile: Optional[str] = ProfileOpt,
    json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Download (resumable, sha256-verified), import a GGUF, optionally quantize, and store the model
    under DSR1_HOME/models/NAME. Running the same command again after an interruption continues
    where it stopped. Token: HF_TOKEN. Mirror: HF_ENDPOINT or --endpoint."""
    from dsr1 import pull as core

    out = Output(json, quiet)
    reporter = Reporter() if (json or quiet) else RichReporter(out.err)
    reporter.silence_libraries = json or quiet
    try:
        result = core.pull(source, name=name, revision=revision, endpoint=endpoint, quant=quant, profile=profile,
                           local_dir=local_dir, allow_pickle=allow_pickle, reporter=reporter,
                           workers=workers, base=base, merge_lora=merge_lora)
    finally:
        if isinstance(reporter, RichReporter):
            reporter.close()

    def render(c: Console) -> None:
        rev = f" @ {result.resolved_revision[:12]}" if result.resolved_revision else ""
        kept = (f"GGUF {result.gguf_quant}, kept as it came" if result.format == "gguf" else
                f"quantization {result.quantization} ({result.quantization_source})")
        c.print(f"[green]stored[/] [bold]{result.name}[/]{rev}: {result.total_bytes / 1e9:.2f} GB, {kept}")
        if result.resolved_revision:
            c.print(f"  downloaded {result.downloaded_bytes / 1e6:.1f} MB, reused {result.reused_bytes / 1e6:.1f} MB"
                    + (f", resumed from {result.resumed_bytes / 1e6:.1f} MB of partial files" if result.resumed_bytes else ""))
        c.print(f"  model dir: {result.model_dir}")
        if result.embedded_dir:
            c.print(f"  embedded engine's bf16 copy: {result.embedded_dir}")
        if result.lora_base:
            c.print(f"  LoRA adapter for {result.lora_base}; next: [green]dsr1 serve {result.lora_base} "
                    f"--lora {result.name}={result.name}[/]")
        else:
            c.print(f"  next: [green]dsr1 verify {result.name}[/]")

    out.result(result, render)


def verify(name: str = NameArg, json: bool = JsonOpt, quiet: bool = QuietOpt) -> None:
    """Re-hash every file of a stored model against its manifest. Exit 7 when any differs."""
    from dsr1 import store
    from dsr1.errors import IntegrityError

    result = store.verify(name)

    def render(c: Console) -> None:
        state = "[green]ok[/]" if result.ok else "[red]FAILED[/]"
        c.print(f"{state} {result.name}: {result.checked} files, {result.bytes / 1e9:.2f} GB checked in {result.model_dir}")
        for p in result.problems:
            c.print(f"  [red]{p['path']}[/]: {p['problem']}")

    Output(json, quiet).result(result, render)
    if not result.ok:
        m = store.load(name)
        raise IntegrityError(f"{len(result.problems)} file(s) of '{name}' do not match the manifest",
                             hint=f"fetch them again: `dsr1 pull {m.source} --name {name}`")


def list_models(json: bool = JsonOpt) -> None:
    """Models in the store (DSR1_HOME/models), with source, revision, quantization and size."""
    from dsr1 import store

    rows = [{"name": m.name, "source": m.source, "source_kind": m.source_kind, "source_path": m.source_path,
             "label": m.label, "repo_id": m.repo_id, "resolved_revision": m.resolved_revision,
             "quantization": m.quantization, "size_bytes": m.total_size, "files": len(m.files),
             "model_dir": m.model_dir, "created": m.created, "kind": m.kind, "lora_base": m.lora_base,
             "format": m.format, "gguf_quant": m.gguf_quant, "gguf_file": m.gguf_file,
             "embedded_copy_bytes": sum(f.size for f in m.embedded_files or []) if m.embedded_ready else None}
            for m in store.list_models()]

    def render(c: Console) -> None:
        if not rows:
            c.print("no stored models; get one with `dsr1 pull NAME` (`dsr1 models` lists the catalog)")
            return
        c.print(stored_models_table(rows, title=f"Stored models in {store.store_root()}"))

    Output(json).result({"store": str(store.store_root()), "models": rows}, render)


def stored_models_table(rows: list[dict], title: str) -> "Table":
    """One row per model: its name, with what it came from (repo id or GGUF file name) and the revision
    on lines below it. As a column of its own the source was squeezed and cut (`SmolLM2-135M-I…`) in an
    80-column terminal; sharing the name's column it has all the width the short columns leave. Those
    keep their width; a source longer than the terminal folds onto the next line rather than being cut.
    The full path is in `dsr1 list --json` (source_path)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    # A GGUF shows llama.cpp's name for its quantization (IQ1_S, Q4_K_M ...) and the files' size; the
    # embedded engine's dequantized copy, when one was made, on the line below the name.
    short = [(r["gguf_quant"] if r.get("format") == "gguf" else r["quantization"],
              f"{r['size_bytes'] / 1e9:.2f} GB", (r["created"] or "-")[:10]) for r in rows]
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("model", overflow="fold")
    for i, (head, justify) in enumerate((("quant", "left"), ("size", "right"), ("created", "left"))):
        t.add_column(head, justify=justify, no_wrap=True, min_width=max(len(head), *(len(s[i]) for s in short)))
    for r, s in zip(rows, short):
        cell = Text(r["name"], style="bold")
        cell.append(f"\n  {r['label']}", style="cyan")
        if r["resolved_revision"]:
            cell.append(f"\n  @ {r['resolved_revision'][:12]}", style="dim")
        if r.get("embedded_copy_bytes"):
            cell.append(f"\n  + embedded engine's bf16 copy, {r['embedded_copy_bytes'] / 1e9:.2f} GB", style="dim")
        t.add_row(cell, *s)
    return t


def rm(name: str = NameArg, json: bool = JsonOpt, quiet: bool = QuietOpt) -> None:
    """Remove a stored model. Files in the shared Hugging Face cache are kept (other tools use them)."""
    from dsr1 import store

    m = store.remove(name)
    # Weights outside the store entry (HF cache, --local-dir, a registered directory) are not ours to delete.
    kept = m.model_dir if m and not Path(m.model_dir).is_relative_to(store.store_root() / name) else None
    data = {"removed": name, "kept_files_at": kept}

    def render(c: Console) -> None:
        c.print(f"removed {name}" + (f" (weights kept at {kept})" if kept else ""))

    Output(json, quiet).result(data, render)
