"""Option types shared by several commands, declared once."""

from __future__ import annotations

import typer

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Print nothing but errors.")
ProfileOpt = typer.Option(None, "--profile", help="Profile name (see docs/profiles.md) or path to a profile .toml.")
