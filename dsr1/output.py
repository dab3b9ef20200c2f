"""One output object for human, --json and --quiet modes.

A command builds a JSON-able result and a render function; `Output.result`
prints one or the other. Progress and messages go to stderr so stdout stays
clean for `--json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable

from rich.console import Console


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


PIPE_WIDTH = 120


def _width(stream) -> int | None:
    """Rich's width, except into a pipe or file without COLUMNS: there it would use 80, which
    folds doctor's tables into ten-line rows in every log and `| tee`; logs are read wide."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return None if tty or os.environ.get("COLUMNS") else PIPE_WIDTH


class Output:
    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.console = Console(highlight=False, width=_width(sys.stdout))
        self.err = Console(stderr=True, highlight=False, width=_width(sys.stderr))

    def result(self, data: Any, render: Callable[[Console], None] | None = None) -> None:
        if self.json_mode:
            sys.stdout.write(json.dumps(to_jsonable(data), indent=2) + "\n")
            sys.stdout.flush()
        elif render is not None and not self.quiet:
            render(self.console)

    def info(self, message: str) -> None:
        if not (self.quiet or self.json_mode):
            self.err.print(message)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {message}")
