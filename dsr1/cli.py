"""The `dsr1` command line: one command table, lazy imports, one error handler.

Command modules import only typer and dsr1's light core at module level; torch
and transformers are imported inside the functions that need them, so
`dsr1 --help` and `dsr1 doctor` stay fast (tests/test_cli.py checks).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import traceback
from typing import Callable

import typer

from dsr1 import __version__, settings
from dsr1.errors import EXIT_INTERRUPTED, Dsr1Error

# name -> (module, function, one-line help). Order is the order `--help` shows.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "doctor": ("dsr1.commands.doctor", "doctor", "Check this machine: GPUs, memory, disk, software; pick a profile and say what fits."),
    "models": ("dsr1.commands.models", "models", "List the R1-family catalog and what fits this machine."),
    "pull": ("dsr1.commands.pull", "pull", "Download or import a model into the local store, verified and optionally quantized."),
    "verify": ("dsr1.commands.pull", "verify", "Re-check a stored model's files against their sha256."),
    "list": ("dsr1.commands.pull", "list_models", "List the models in the local store."),
    "rm": ("dsr1.commands.pull", "rm", "Remove a model from the local store."),
    "serve": ("dsr1.commands.serve", "serve", "Serve a model with an OpenAI-compatible API and continuous batching."),
    "chat": ("dsr1.commands.chat", "chat", "Chat with a model in the terminal (starts it, or talks to --url)."),
    "bench": ("dsr1.commands.bench", "bench", "Benchmark an OpenAI-compatible server: latency/throughput sweeps, plots, compare."),
    # A group: the module attribute is a dict of subcommand name -> function.
    "engine": ("dsr1.commands.engine", "SUBCOMMANDS", "Install inference engines (vLLM, SGLang, llama.cpp) in their own environments; list them."),
    "monitor": ("dsr1.commands.monitor", "SUBCOMMANDS", "Monitoring for a running deployment: Prometheus config, alert rules, Grafana dashboard."),
}


def _report(exc: BaseException) -> int:
    err = sys.stderr
    if settings.debug():
        traceback.print_exception(exc, file=err)  # plain traceback: never locals
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=err)
        return EXIT_INTERRUPTED
    assert isinstance(exc, Dsr1Error)
    print(f"error: {exc}", file=err)
    if exc.hint:
        print(f"  fix: {exc.hint}", file=err)
    if not settings.debug():
        print("  (set DSR1_DEBUG=1 for the full traceback)", file=err)
    return exc.exit_code


def _guarded(fn: Callable) -> Callable:
    """Map dsr1's error family to messages and exit codes: the one place it happens."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (Dsr1Error, KeyboardInterrupt) as exc:
            raise typer.Exit(_report(exc)) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        print(f"dsr1 {__version__}")
        raise typer.Exit()


def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_version_callback, is_eager=True),
) -> None:
    pass


HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


def _readable_metavars(fn: Callable) -> Callable:
    """Name every value a flag takes after the flag (`--port PORT`, as argparse and vLLM do) where the
    command did not name it: typer's default shows the Python type (`<str>`, `<list[str]>`)."""
    for param in inspect.signature(fn).parameters.values():
        info = param.default
        if isinstance(info, (typer.models.OptionInfo, typer.models.ArgumentInfo)) and info.metavar is None:
            if param.annotation in (bool, "bool") or getattr(info, "is_flag", False):
                continue
            info.metavar = param.name.upper()
    return fn


def build_app(only: str | None = None) -> typer.Typer:
    """The typer app with every command, or just `only` (what `main` runs).

    Registering one command imports one command module: start-up stays fast as
    commands with many options are added.
    """
    app = typer.Typer(
        name="dsr1",
        help="Get DeepSeek-R1 and its distills running on the hardware you have. Exit codes: see docs/cli.md.",
        no_args_is_help=True,
        add_completion=False,
        # Our own handler prints errors; typer's pretty tracebacks would show locals (tokens live there).
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings=HELP_OPTIONS,
    )
    app.callback()(_root)
    for name, (module, func, help_text) in COMMANDS.items():
        if only is not None and name != only:
            continue
        target = getattr(importlib.import_module(module), func)
        if isinstance(target, dict):
            group = typer.Typer(name=name, help=help_text, no_args_is_help=True, rich_markup_mode=None,
                                context_settings=HELP_OPTIONS)
            for sub, fn in target.items():
                group.command(sub, help=inspect.cleandoc(fn.__doc__ or ""),
                              context_settings=HELP_OPTIONS)(_guarded(_readable_metavars(fn)))
            app.add_typer(group, name=name, help=help_text)
        else:
            app.command(name, help=help_text + "\n\n" + inspect.cleandoc(target.__doc__ or ""),
                        context_settings=HELP_OPTIONS)(_guarded(_readable_metavars(target)))
    return app


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in args if not a.startswith("-")), None)
    build_app(only=first if first in COMMANDS else None)(args=args, prog_name="dsr1")
