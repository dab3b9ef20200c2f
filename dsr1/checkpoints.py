"""Which real checkpoint gives a catalog model a precision on an engine (data in
dsr1/data/checkpoints.toml), or which on-load flag does.

A plan never states a precision without one of the two: `source(spec, precision, engine, target)`
answers with the repository to load (its format, real size on disk, compute dtype and the
--quantization value the engine needs), or None when nothing produces that precision there, and
the planner moves on to the next precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from dsr1.datafile import build, read_toml

if TYPE_CHECKING:
    from dsr1.catalog import ModelSpec
    from dsr1.fit import Target

DATA = Path(__file__).parent / "data" / "checkpoints.toml"
GB = 1e9
# On-load quantization of the model's own BF16 checkpoint, per engine: FP8 weights and activations
# need FP8 units (compute capability 8.9+; vLLM docs, features/quantization/fp8). bitsandbytes on
# load is the embedded engine's (dsr1.quantize).
ONLOAD = {"fp8": {"vllm": "fp8", "sglang": "fp8"}}


@dataclass(frozen=True)
class Checkpoint:
    model: str  # catalog name
    precision: str  # what it gives: bf16 | fp8 | int4
    repo: str
    format: str  # safetensors (the model's own dtype) | fp8-block | awq | compressed-tensors
    size_gb: float  # on disk, decimal GB
    size_source: str
    engines: tuple[str, ...]
    dtype: str = "bf16"  # the compute dtype it runs in
    vllm_quantization: str | None = None  # --quantization (None: the engine reads its config)
    sglang_quantization: str | None = None
    source: str = ""

    @property
    def size_bytes(self) -> float:
        return self.size_gb * GB

    def quantization(self, engine: str) -> str | None:
        return {"vllm": self.vllm_quantization, "sglang": self.sglang_quantization}.get(engine)


@dataclass(frozen=True)
class Source:
    """What produces a precision: a checkpoint, and the engine's --quantization for it (on-load or
    the checkpoint's own method where the engine must be told)."""

    checkpoint: Checkpoint
    quantization: str | None
    on_load: bool  # the precision is made while loading `checkpoint` (which is stored at another)


@lru_cache(maxsize=1)
def listed() -> tuple[Checkpoint, ...]:
    data = read_toml(DATA)
    return tuple(build(Checkpoint, e, f"{DATA} checkpoint #{i + 1}") for i, e in enumerate(data.get("checkpoint", [])))


def native(spec: "ModelSpec") -> Checkpoint:
    """The model's own repository, at the dtype it ships in (models.toml's size)."""
    fmt = "fp8-block" if spec.native_dtype == "fp8" else "safetensors"
    return Checkpoint(spec.name, spec.native_dtype, spec.repo, fmt, spec.hub_size_gb,
                      "hub file listing (dsr1/data/models.toml)", ("embedded", "vllm", "sglang"),
                      dtype="bf16" if spec.native_dtype == "fp8" else spec.native_dtype,
                      source=f"https://huggingface.co/{spec.repo}")


def for_model(spec: "ModelSpec") -> tuple[Checkpoint, ...]:
    """Every checkpoint of `spec`: its own first."""
    return (native(spec), *(c for c in listed() if c.model == spec.name))


def by_repo(repo: str) -> Checkpoint | None:
    key = repo.strip().lower()
    return next((c for c in listed() if c.repo.lower() == key), None)


def source(spec: "ModelSpec", precision: str, engine: str, target: "Target") -> Source | None:
    """The checkpoint (and flag) that runs `spec` at `precision` on `engine` here, or None."""
    own = native(spec)
    if precision == own.precision or (precision in ("bf16", "fp16") and own.precision in ("bf16", "fp16")):
        return Source(own, None, False)
    for c in listed():
        if c.model == spec.name and c.precision == precision and engine in c.engines:
            return Source(c, c.quantization(engine), False)
    flag = ONLOAD.get(precision, {}).get(engine)
    if flag and target.supports_fp8 and own.precision in ("bf16", "fp16"):
        return Source(own, flag, True)
    return None
