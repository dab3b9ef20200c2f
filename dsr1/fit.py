"""Memory-fit estimator: will model X at precision P fit these devices, with how
much context and how many concurrent sequences?

Pure arithmetic over the catalog (no torch import). Formulas and the published
figures they are checked against are in ../shared/anchors/doctor.md and
docs/performance.md; `benchmarks/fit_accuracy.py` measures the error on a real
model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsr1.catalog import ModelSpec
from dsr1.errors import UsageError

GiB = 1024**3

# Bytes per parameter of quantized Linear weights, scales included.
#   fp8: 1 B + one fp32 scale per 128x128 block (DeepSeek's block quantization).
#   int8: bitsandbytes LLM.int8, 1 B + one fp32 scale per output row (negligible).
#   nf4: 4 bits + fp32 absmax per 64 weights = 4.5 bits.
#   nf4-dq: double quantization, 8-bit absmax per 64 + fp32 per 256 blocks = ~4.13 bits.
#   int4: AWQ/GPTQ, group 128, fp16 scale + 4-bit zero per group = ~4.16 bits.
#   gguf-*: llama.cpp block formats (bits per weight / 8).
LINEAR_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0 + 4.0 / (128 * 128),
    "int8": 1.0,
    "nf4": 0.5 + 4.0 / 64,
    "nf4-dq": 0.5 + 1.0 / 64 + 4.0 / (64 * 256),
    "int4": 0.5 + 2.5 / 128,
    "gguf-q8_0": 8.5 / 8,
    "gguf-q6_k": 6.5625 / 8,
    "gguf-q4_k_m": 4.9 / 8,
    "gguf-q4_1": 5.0 / 8,
    "gguf-q4_0": 4.5 / 8,
}
PRECISIONS = tuple(LINEAR_BYTES)
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0}

# Per-GPU overhead outside weights and KV: CUDA context and cuBLAS/attention
# workspaces. Ollama reserves 457 MiB for the context alone; 1 GiB leaves room
# for workspaces. CUDA graphs (vLLM/SGLang) cost more and are counted by engine.
CUDA_OVERHEAD_BYTES = 1 * GiB
CUDA_GRAPH_BYTES = {"embedded": 0, "vllm": 4 * GiB, "sglang": 4 * GiB}
# Resident memory of the runtime itself on CPU: Python, torch, transformers, the
# model and generation code, oneDNN/OpenMP workspaces. Measured as the peak RSS
# of loading and generating with a 2-layer, 64-wide random Llama (~0.4% of it
# is the model): 360 MiB with torch 2.13 CPU / transformers 5.24 on Linux
# x86-64. `import torch, transformers` alone is ~240 MiB; the rest appears on
# the first generate. benchmarks/fit_accuracy.py re-measures it every run.
CPU_RUNTIME_BYTES = 360 * 1024**2
# Context a model must hold at least once to count as "fits".
MIN_CONTEXT = 4096


def _check_precision(precision: str) -> None:
    if precision not in LINEAR_BYTES:
        raise UsageError(f"unknown precision '{precision}'", hint=f"choose one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class Weights:
    linear: float
    embedding: float
    norms: float

    @property
    def total(self) -> float:
        return self.linear + self.embedding + self.norms


def weight_bytes(spec: ModelSpec, precision: str, *, compute_dtype: str = "bf16", include_mtp: bool = False) -> Weights:
    """Bytes of weights once loaded. Quantizers touch Linear layers only: embeddings,
    the output head and norms stay in the compute dtype (bitsandbytes, AWQ, FP8 alike);
    GGUF files quantize the embeddings too."""
    _check_precision(precision)
    lin = LINEAR_BYTES[precision]
    if precision in DTYPE_BYTES:
        compute_dtype = precision if precision != "fp8" else compute_dtype
    other = DTYPE_BYTES[compute_dtype]
    emb_bytes = lin if precision.startswith("gguf-") else other
    return Weights(
        linear=spec.linear_params(include_mtp) * lin,
        embedding=spec.embedding_params(include_mtp) * emb_bytes,
        norms=spec.norm_params(include_mtp) * other,
    )


def activation_bytes(spec: ModelSpec, tokens: int, dtype_bytes: float, sequences: int = 1) -> float:
    """Transient memory of one forward pass over `tokens` batched tokens.

    Hidden states and MLP intermediates for every token (the MLP's gate, up and
    activated tensors dominate), fp32 logits for the last token of each sequence
    (generation keeps only those), and, on CPU, attention scores when the math
    SDPA path materialises them (per sequence: heads x len^2 fp32).
    """
    inter = spec.moe_intermediate * spec.experts_per_token if spec.is_moe else spec.intermediate
    per_token = (4 * spec.hidden + 3 * inter) * dtype_bytes
    logits = sequences * spec.vocab * 4
    per_seq_len = max(1, tokens // max(1, sequences))
    scores = sequences * spec.heads * per_seq_len * per_seq_len * 4
    return tokens * per_token + logits + scores


@dataclass(frozen=True)
class Target:
    """Where a model would run: n identical devices of `memory_bytes` each."""

    kind: str  # "cuda" | "cpu"
    count: int
    memory_bytes: int
    utilization: float = 0.9  # share of each device dsr1 may plan to use
    engine: str = "embedded"  # embedded | vllm | sglang
    supports_fp8: bool = False
    supports_bf16: bool = True

    def __post_init__(self) -> None:
        if self.count < 1 or self.memory_bytes <= 0:
            raise UsageError("a target needs at least one device with memory")


@dataclass(frozen=True)
class Fit:
    model: str
    precision: str
    target: Target
    tp: int
    weights_per_device: float
    overhead_per_device: float
    kv_bytes_per_token: float  # per device
    budget_per_device: float
    fits: bool
    max_context: int  # one sequence, capped at the model's own maximum
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def kv_free_per_device(self) -> float:
        return self.budget_per_device - self.weights_per_device - self.overhead_per_device

    @property
    def total_bytes(self) -> float:
        """Weights plus overhead over all devices (what the model needs before KV)."""
        return (self.weights_per_device + self.overhead_per_device) * self.tp

    def max_sequences(self, context: int) -> int:
        """How many sequences of `context` tokens fit in the KV cache at once."""
        if not self.fits or context <= 0:
            return 0
        return max(0, int(self.kv_free_per_device // (self.kv_bytes_per_token * context)))

    def memory_at(self, context: int, sequences: int = 1) -> float:
        """Total planned bytes over all devices for `sequences` x `context` tokens."""
        return (self.weights_per_device + self.overhead_per_device + self.kv_bytes_per_token * context * sequences) * self.tp


def estimate(
    spec: ModelSpec,
    precision: str,
    target: Target,
    *,
    tp: int | None = None,
    compute_dtype: str = "bf16",
    kv_dtype: str | None = None,
    prefill_tokens: int = 2048,
    min_context: int = MIN_CONTEXT,
    weights_total: float | None = None,
) -> Fit:
    """Plan `spec` at `precision` on `target`.

    Weights and KV are split over `tp` devices (all of them by default): tensor
    parallel for vLLM/SGLang, a layer split by accelerate's device_map for the
    embedded engine; either way each device holds about 1/tp of the weights.
    `weights_total` is a real checkpoint's size on disk, used instead of the arithmetic.
    """
    _check_precision(precision)
    tp = tp or target.count
    if tp > target.count:
        raise UsageError(f"tensor parallel {tp} needs {tp} devices, the target has {target.count}")
    notes: list[str] = []
    if precision == "fp8" and not target.supports_fp8:
        # Weight-only FP8 still loads on older GPUs (vLLM uses Marlin kernels on
        # A100), but on CPU transformers upcasts. Treat as bf16 there.
        if target.kind == "cpu":
            return _no_fit(spec, precision, target, tp, "fp8 weights need a GPU; on CPU they are upcast to bf16")
        notes.append("no FP8 units on this GPU: weight-only FP8 (Marlin) kernels, slower than on Hopper")
    if compute_dtype == "bf16" and not target.supports_bf16:
        compute_dtype = "fp16" if target.kind == "cuda" else "fp32"
    kv_dtype = kv_dtype or compute_dtype
    w = weight_bytes(spec, precision, compute_dtype=compute_dtype, include_mtp=False)
    weights_per_device = (weights_total if weights_total else w.total) / tp
    act = activation_bytes(spec, prefill_tokens, DTYPE_BYTES[compute_dtype]) / tp
    if target.kind == "cuda":
        overhead = CUDA_OVERHEAD_BYTES + CUDA_GRAPH_BYTES.get(target.engine, 0) + act
    else:
        overhead = CPU_RUNTIME_BYTES + act
    budget = target.memory_bytes * target.utilization
    kv_tok = spec.kv_bytes_per_token(DTYPE_BYTES[kv_dtype], tp=tp if target.kind == "cuda" else 1)
    if target.kind == "cpu" and tp > 1:
        kv_tok /= tp
    free = budget - weights_per_device - overhead
    max_ctx = int(free // kv_tok) if free > 0 else 0
    need = min(min_context, spec.max_context)
    fits = max_ctx >= need
    reason = "" if fits else _shortfall(free, kv_tok, need, weights_per_device, budget)
    return Fit(
        model=spec.name,
        precision=precision,
        target=target,
        tp=tp,
        weights_per_device=weights_per_device,
        overhead_per_device=overhead,
        kv_bytes_per_token=kv_tok,
        budget_per_device=budget,
        fits=fits,
        max_context=min(max_ctx, spec.max_context) if fits else max(0, max_ctx),
        reason=reason,
        notes=notes,
    )


def _shortfall(free: float, kv_tok: float, need: int, weights: float, budget: float) -> str:
    if weights > budget:
        return f"weights need {weights / GiB:.1f} GiB per device, {budget / GiB:.1f} GiB usable"
    return f"room for {max(0, int(free // kv_tok))} tokens of KV cache per device, {need} needed"


def _no_fit(spec: ModelSpec, precision: str, target: Target, tp: int, reason: str) -> Fit:
    return Fit(spec.name, precision, target, tp, 0.0, 0.0, 1.0, 0.0, False, 0, reason)


def predict_peak_cpu(spec: ModelSpec, dtype: str, *, batch: int, total_tokens: int, prompt_tokens: int, source_bytes: float = 0.0) -> dict[str, float]:
    """Predicted peak resident memory of loading `spec` on CPU in `dtype` and generating.

    `source_bytes` is the checkpoint mapped during loading when its dtype differs
    from `dtype` (safetensors are memory-mapped; a converting load holds the
    mapped file and the converted copy at once). Returned per component, bytes.
    """
    w = weight_bytes(spec, dtype, compute_dtype=dtype).total
    db = DTYPE_BYTES[dtype]
    kv = spec.kv_bytes_per_token(db) * total_tokens * batch
    act = activation_bytes(spec, prompt_tokens * batch, db, sequences=batch)
    load_peak = CPU_RUNTIME_BYTES + w + source_bytes
    run_peak = CPU_RUNTIME_BYTES + w + kv + act
    return {"runtime": CPU_RUNTIME_BYTES, "weights": w, "kv": kv, "activations": act,
            "source": source_bytes, "load_peak": load_peak, "run_peak": run_peak,
            "peak": max(load_peak, run_peak)}
