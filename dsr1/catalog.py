"""The R1-family model catalog (data in dsr1/data/models.toml) and size arithmetic.

Parameter counts are derived from the architecture so the fit estimator can split
weights into "linear" (quantizable) and "embedding" (kept 16-bit) parts; the test
suite checks the derivation against each model card's published count.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from dsr1.datafile import build, read_toml
from dsr1.errors import ConfigError, NotFoundError

CATALOG_PATH = Path(__file__).parent / "data" / "models.toml"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo: str
    description: str
    architecture: str  # llama | qwen2 | deepseek_v3
    params_b: float
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    max_context: int
    native_dtype: str
    hub_size_gb: float
    licence: str
    reasoning: bool
    tie_embeddings: bool = False
    attention_bias: bool = False
    head_dim: int | None = None
    aliases: tuple[str, ...] = ()
    params_total_b: float | None = None
    # DeepseekV3 (MLA + MoE)
    mtp_layers: int = 0
    moe_intermediate: int | None = None
    routed_experts: int = 0
    shared_experts: int = 0
    experts_per_token: int = 0
    first_dense_layers: int = 0
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # Demo model shipped on PyPI
    pypi_package: str | None = None
    gguf_file: str | None = None
    # the format its tool calls come in, by vLLM's parser name (dsr1.toolcalls): deepseek_v3 (R1's
    # <｜tool▁calls▁begin｜> tokens), hermes (the Qwen2.5 <tool_call> JSON of the Qwen distills' base),
    # llama3_json (Llama 3.1's JSON of the Llama distills' base); None: no tool calls
    tool_format: str | None = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_moe(self) -> bool:
        return self.routed_experts > 0

    @property
    def native_bytes_per_param(self) -> float:
        return {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0}[self.native_dtype]

    # --- parameter arithmetic -------------------------------------------------
    def embedding_params(self, include_mtp: bool = False) -> int:
        """Input embedding + output head (tied heads count once).

        The DeepseekV3 checkpoint's MTP module carries its own copies of both.
        """
        per_copy = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        copies = 1 + (self.mtp_layers if include_mtp else 0)
        return per_copy * copies

    def _attention_params(self) -> int:
        h = self.hidden
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            return (
                h * self.q_lora_rank  # q_a_proj
                + self.q_lora_rank * self.heads * qk  # q_b_proj
                + h * (self.kv_lora_rank + self.qk_rope_head_dim)  # kv_a_proj_with_mqa
                + self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)  # kv_b_proj
                + self.heads * self.v_head_dim * h  # o_proj
            )
        hd = self.head_dim or h // self.heads
        q = h * self.heads * hd
        kv = 2 * h * self.kv_heads * hd
        o = self.heads * hd * h
        bias = (self.heads + 2 * self.kv_heads) * hd if self.attention_bias else 0
        return q + kv + o + bias

    def _mlp_params(self, layer: int) -> int:
        h = self.hidden
        if self.is_moe and layer >= self.first_dense_layers:
            per_expert = 3 * h * self.moe_intermediate
            router = self.routed_experts * h
            return (self.routed_experts + self.shared_experts) * per_expert + router
        return 3 * h * self.intermediate

    def linear_params(self, include_mtp: bool = False) -> int:
        """Parameters in transformer-block Linear layers: what int8/nf4/fp8 quantize."""
        total = sum(self._attention_params() + self._mlp_params(i) for i in range(self.layers))
        if include_mtp and self.mtp_layers:
            # Each MTP module: one more MoE block plus eh_proj (2h -> h).
            mtp = self._attention_params() + self._mlp_params(self.layers) + 2 * self.hidden * self.hidden
            total += mtp * self.mtp_layers
        return total

    def norm_params(self, include_mtp: bool = False) -> int:
        per_layer = 2 * self.hidden
        if self.is_mla:
            per_layer += self.q_lora_rank + self.kv_lora_rank
        layers = self.layers + (self.mtp_layers if include_mtp else 0)
        return per_layer * layers + self.hidden

    def total_params(self, include_mtp: bool = False) -> int:
        return (
            self.linear_params(include_mtp)
            + self.embedding_params(include_mtp)
            + self.norm_params(include_mtp)
        )

    def kv_bytes_per_token(self, dtype_bytes: float = 2.0, tp: int = 1) -> float:
        """KV cache bytes for one token on one device.

        GQA/MHA: 2 x layers x kv_heads x head_dim x bytes, kv_heads split over TP
        ranks (replicated when there are fewer heads than ranks).
        MLA (DeepseekV3), as vLLM/SGLang store it: layers x (kv_lora_rank +
        qk_rope_head_dim) x bytes; the latent is replicated on every TP rank.
        """
        if self.is_mla:
            return self.layers * (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes
        hd = self.head_dim or self.hidden // self.heads
        heads_per_rank = max(1, -(-self.kv_heads // tp))
        return 2 * self.layers * heads_per_rank * hd * dtype_bytes


def _load(path: Path) -> tuple[ModelSpec, ...]:
    data = read_toml(path)
    unknown = set(data) - {"model"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; expected [[model]] tables")
    specs = tuple(build(ModelSpec, entry, f"{path} model #{i + 1}") for i, entry in enumerate(data.get("model", [])))
    names = [n for s in specs for n in (s.name, *s.aliases)]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{path}: duplicate model names {sorted(dupes)}")
    return specs


@lru_cache(maxsize=1)
def models() -> tuple[ModelSpec, ...]:
    return _load(CATALOG_PATH)


def find(name: str) -> ModelSpec | None:
    key = name.strip().lower()
    for spec in models():
        if key in (spec.name, *spec.aliases) or key == spec.repo.lower():
            return spec
    return None


def suggestions(name: str, n: int = 3) -> list[str]:
    names = [spec.name for spec in models()]
    return difflib.get_close_matches(name.lower(), names, n=n, cutoff=0.4)


def get(name: str) -> ModelSpec:
    spec = find(name)
    if spec is None:
        close = suggestions(name)
        hint = f"did you mean {', '.join(close)}?" if close else "run `dsr1 models` to list the catalog"
        raise NotFoundError(f"unknown model '{name}'", hint=hint)
    return spec
