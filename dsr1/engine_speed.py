"""Which engine was measured fastest on this kind of CPU (data in dsr1/data/engine_speed.toml).

`dsr1 serve --engine auto` on a CPU asks here, with the engines it could run: the figures are
output tokens/s from benchmarks/engines.py on a CPU of the same class, at the concurrency nearest the
plan's (1 or 16), for the measured model nearest in size. A tuned profile (`dsr1 bench tune`) is
measured on this very machine and wins over these (it sets the engine before planning).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from dsr1.datafile import build, read_toml

DATA = Path(__file__).parent / "data" / "engine_speed.toml"


@dataclass(frozen=True)
class Measured:
    cpu_class: str
    cores: int
    cpu: str
    model: str
    model_params_b: float
    dtype: str
    engine: str
    tok_s_c1: float
    tok_s_c16: float
    source: str

    def at(self, concurrency: int) -> float:
        return self.tok_s_c1 if concurrency < 4 else self.tok_s_c16


@lru_cache(maxsize=1)
def rows() -> tuple[Measured, ...]:
    data = read_toml(DATA)
    return tuple(build(Measured, e, f"{DATA} measured #{i + 1}") for i, e in enumerate(data.get("measured", [])))


def cpu_class(flags: Iterable[str]) -> str:
    flags = set(flags)
    if "amx_bf16" in flags or "amx_tile" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "other"


def fastest(flags: Sequence[str], params_b: float, engines: Sequence[str], concurrency: int) -> tuple[str, str] | None:
    """(engine, why with the figures) among `engines`, or None when nothing was measured on this CPU
    class for all of them."""
    cls = cpu_class(flags)
    here = [r for r in rows() if r.cpu_class == cls and r.engine in engines]
    if not here or {r.engine for r in here} != set(engines):
        return None
    size = min({r.model_params_b for r in here}, key=lambda b: abs(b - params_b))
    cands = sorted((r for r in here if r.model_params_b == size), key=lambda r: r.at(concurrency), reverse=True)
    best = cands[0]
    c = 1 if concurrency < 4 else 16
    figures = ", ".join(f"{r.engine} {r.at(concurrency):g}" for r in cands)
    why = (f"auto: {best.engine} measured fastest on this CPU class ({best.cpu}; {best.model}, {best.dtype}, "
           f"concurrency {c}: {figures} output tok/s; {best.source})")
    return best.engine, why
