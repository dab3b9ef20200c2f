from __future__ import annotations

from typing import Optional

from rich.console import Console

from dsr1.commands.options import JsonOpt, ProfileOpt


def models(profile: Optional[str] = ProfileOpt, json: bool = JsonOpt) -> None:
    """Each model's architecture and size, and on this machine: the best precision
    that fits, its memory, and the context it leaves."""
    from dsr1 import catalog
    from dsr1 import doctor as core
    from dsr1.output import Output

    report = core.run(profile)
    recs = {r.model: r for r in report.recommendations}
    rows = [{"name": s.name, "repo": s.repo, "architecture": s.architecture, "params_b": s.params_b,
             "layers": s.layers, "hidden": s.hidden, "heads": s.heads, "kv_heads": s.kv_heads,
             "kv_bytes_per_token_bf16": s.kv_bytes_per_token(2.0), "max_context": s.max_context,
             "native_dtype": s.native_dtype, "hub_size_gb": s.hub_size_gb, "licence": s.licence,
             "fit": recs[s.name]} for s in catalog.models()]

    def render(c: Console) -> None:
        from dsr1.commands.doctor import models_table

        c.print(f"Profile [cyan]{report.profile}[/]")
        c.print(models_table(report.recommendations, title="R1-family models on this machine"))

    Output(json).result({"profile": report.profile, "models": rows}, render)
