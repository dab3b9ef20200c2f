"""Where llama-server keeps each part of a GGUF: which layers on which GPU, which routed-expert
tensors in system RAM, how big a KV cache, and how much host RAM that needs.

Placement reads the file's own tensor table (dsr1.gguf_files), grouped by what llama.cpp moves as a
unit: each layer's attention, norms, router and shared experts go with the layer; its routed experts
(`ffn_*_exps`) may stay in RAM (`--n-cpu-moe N`: the experts of layers 0..N-1, llama.cpp's own
option, else the same tensors by `--override-tensor`); the output head goes with the last GPU; the
token embeddings always stay in host memory (llama.cpp keeps the input embeddings on the CPU).
Before the file is here the table is built from the model's shapes and the published recipe of the
quantization (dsr1/data/gguf_quants.toml), checked in the tests against each file's published size.

The rules, each one llama.cpp's (b11434: src/llama-model.cpp, common/common.h):
- `-ts` ratios become cumulative fractions; layer il goes to the first GPU whose fraction exceeds
  il / (n_layer + 1), the output head counting as layer n_layer. Whole layer counts per GPU, summing
  to n_layer + 1, therefore place exactly the layers this module assigned.
- `--n-cpu-moe N` moves the expert tensors of blocks 0..N-1 (the count includes dense layers).
- With fewer than all layers offloaded (`-ngl K <= n_layer`), the last K layers are on the GPUs,
  the output head on the CPU.
- The KV cache of a layer lives with the layer. DeepSeek-V2/V3 GGUFs in llama.cpp's MLA format
  (`attn_k_b`) cache the compressed latent only (kv_lora_rank + rope dims, one K-only cache, so K
  and V types cannot differ); older ones (`attn_kv_b`, all of unsloth/DeepSeek-R1-GGUF) cache
  decompressed K and V for every head, 70x more, so the plan quantizes K to q4_0 as the references
  do. Other architectures: K and V per KV head.

dsr1 computes the placement itself rather than leave it to llama-server's `--fit` (on by default in
b11434), and turns `--fit` off: a plan is made for machines it does not run on (doctor, --profile,
--emit), must say before launch what runs where and what host RAM it needs, and must start the same
way every time. `--fit` decides only at start-up, on the devices present, and gives up when the
layer placement is set by hand (docs/r1-671b.md has the measurement behind this choice).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from dsr1.gguf_files import Tensor, tensor_kind

if TYPE_CHECKING:
    from dsr1.catalog import ModelSpec
    from dsr1.gguf_files import GgufSet

GiB = 1 << 30
DATA = Path(__file__).resolve().parent / "data" / "gguf_quants.toml"
FIT_MARGIN = 1 * GiB  # llama-server's own --fit-target default: free memory left on each GPU
HOST_RESERVE = 4 * GiB  # the OS, llama-server itself, page cache for what is mapped
UBATCH = 512  # llama-server's default physical batch (-ub)
_LAYER = re.compile(r"^blk\.(\d+)\.")


# --- the published files ---------------------------------------------------------------------

@dataclass(frozen=True)
class Quant:
    model: str
    repo: str
    quant: str
    bits: float
    folder: str
    shards_gb: tuple[float, ...]
    mla: bool
    recipe: dict
    recipe_source: str
    loaded_gib: float | None = None
    exps_down_high: dict | None = None
    experts_from_total: bool = False

    @property
    def size_bytes(self) -> int:
        return int(sum(self.shards_gb) * 1e9)

    @property
    def checkpoint(self) -> str:
        """What `dsr1 pull` takes for it: OWNER/NAME:QUANT."""
        return f"{self.repo}:{self.quant}"

    @property
    def first_shard(self) -> str:
        n = len(self.shards_gb)
        stem = self.folder
        return f"{self.folder}/{stem}-00001-of-{n:05d}.gguf" if n > 1 else f"{self.folder}/{stem}.gguf"


@lru_cache(maxsize=1)
def _data() -> dict:
    from dsr1.datafile import read_toml

    return read_toml(DATA)


def quants(model: str) -> list[Quant]:
    """The published GGUFs of catalog model `model`, smallest first."""
    out = []
    for e in _data().get("gguf", []):
        if e["model"] == model:
            out.append(Quant(model=e["model"], repo=e["repo"], quant=e["quant"], bits=float(e["bits"]),
                             folder=e["folder"], shards_gb=tuple(e["shards_gb"]), mla=bool(e["mla"]),
                             recipe=dict(e["recipe"]), recipe_source=e["recipe_source"],
                             loaded_gib=e.get("loaded_gib"), exps_down_high=e.get("exps_down_high"),
                             experts_from_total=bool(e.get("experts_from_total", False))))
    return sorted(out, key=lambda q: q.size_bytes)


def speed(placement: str) -> tuple[tuple[float, float], str]:
    s = _data()["speed"][placement]
    return (float(s["range"][0]), float(s["range"][1])), s["source"]


# --- a GGUF's tensor table -------------------------------------------------------------------

@dataclass
class Layout:
    """What placement needs of a GGUF: its tensors and the per-token KV cache of one layer."""

    tensors: list[Tensor]
    n_layer: int
    kv_k_values: int  # per layer per token, in elements
    kv_v_values: int  # 0: a K-only (MLA latent) cache
    mla: bool
    heads: int
    vocab: int
    arch: str
    source: str  # "file" or what the table was built from

    @property
    def size(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _nbytes(type_name: str, elements: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    return elements // block * size


def _t(name: str, type_name: str, *dims: int) -> Tensor:
    from gguf import GGMLQuantizationType

    n = math.prod(dims)
    return Tensor(name, int(GGMLQuantizationType[type_name.upper()]), n, _nbytes(type_name, n))


def layout_of(gset: "GgufSet") -> Layout:
    """The layout of a GGUF that is here, from its own header and tensor table."""
    h = gset.header
    arch = gset.architecture

    def get(key, default=0):
        v = h.get(f"{arch}.{key}")
        return default if v is None else v

    n_layer = int(get("block_count"))
    heads = int(get("attention.head_count", 1) or 1)
    kv_heads = get("attention.head_count_kv", heads)
    kv_heads = int(max(kv_heads) if isinstance(kv_heads, list) else kv_heads or heads)
    names = {t.name for t in gset.tensors}
    mla = any(n.endswith("attn_k_b.weight") for n in names)
    if mla:  # llama.cpp caches the compressed latent + rope part, K only
        k, v = int(get("attention.kv_lora_rank")) + int(get("rope.dimension_count")), 0
    else:
        emb = int(get("embedding_length"))
        k = kv_heads * int(get("attention.key_length", emb // heads) or emb // heads)
        v = kv_heads * int(get("attention.value_length", emb // heads) or emb // heads)
    tokens = h.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else int(get("vocab_size", 32000))
    return Layout(gset.tensors, n_layer, k, v, mla, heads, vocab, arch, "file")


def layout_from_recipe(spec: "ModelSpec", q: Quant) -> Layout:
    """A DeepSeek-V3-architecture GGUF's tensor table (llama.cpp's deepseek2 names, pre-MLA layout as
    in unsloth/DeepSeek-R1-GGUF) from the model's shapes and the quantization's recipe."""
    r = q.recipe
    h, v = spec.hidden, spec.vocab
    heads, nope, rope, vd = spec.heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
    ql, kvl, moe, e = spec.q_lora_rank, spec.kv_lora_rank, spec.moe_intermediate, spec.routed_experts
    ts = [_t("token_embd.weight", r["embd"], h, v), _t("output_norm.weight", "F32", h), _t("output.weight", r["output"], h, v)]
    high = q.exps_down_high or {}
    for i in range(spec.layers):
        b = f"blk.{i}."
        ts += [_t(b + "attn_norm.weight", "F32", h), _t(b + "attn_q_a_norm.weight", "F32", ql),
               _t(b + "attn_kv_a_norm.weight", "F32", kvl), _t(b + "ffn_norm.weight", "F32", h),
               _t(b + "attn_q_a.weight", r["attn_q"], h, ql), _t(b + "attn_q_b.weight", r["attn_q"], ql, heads * (nope + rope)),
               _t(b + "attn_kv_a_mqa.weight", r["attn_kv"], h, kvl + rope),
               _t(b + "attn_kv_b.weight", r["attn_kv"], kvl, heads * (nope + vd)),
               _t(b + "attn_output.weight", r["attn_output"], heads * vd, h)]
        if i < spec.first_dense_layers:
            ts += [_t(b + "ffn_gate.weight", r["dense_gate_up"], h, spec.intermediate),
                   _t(b + "ffn_up.weight", r["dense_gate_up"], h, spec.intermediate),
                   _t(b + "ffn_down.weight", r["dense_down"], spec.intermediate, h)]
            continue
        sh = moe * spec.shared_experts
        down = high["type"] if i in high.get("layers", ()) else r["exps_down"]
        ts += [_t(b + "ffn_gate_inp.weight", "F32", h, e), _t(b + "exp_probs_b.bias", "F32", e),
               _t(b + "ffn_gate_shexp.weight", r["shexp_gate_up"], h, sh), _t(b + "ffn_up_shexp.weight", r["shexp_gate_up"], h, sh),
               _t(b + "ffn_down_shexp.weight", r["shexp_down"], sh, h),
               _t(b + "ffn_gate_exps.weight", r["exps_gate_up"], h, moe, e), _t(b + "ffn_up_exps.weight", r["exps_gate_up"], h, moe, e),
               _t(b + "ffn_down_exps.weight", down, moe, h, e)]
    if q.experts_from_total:  # no load log: the routed experts take what the published total leaves
        fixed = sum(t.nbytes for t in ts if tensor_kind(t.name) != "routed_experts")
        routed = [t for t in ts if tensor_kind(t.name) == "routed_experts"]
        scale = (q.size_bytes - fixed) / sum(t.nbytes for t in routed)
        ts = [t if tensor_kind(t.name) != "routed_experts" else Tensor(t.name, t.ggml_type, t.elements, int(t.nbytes * scale))
              for t in ts]
    return Layout(ts, spec.layers, heads * (nope + rope), heads * vd, False, heads, v, "deepseek2",
                  f"{q.checkpoint} (tensor table from the catalog's shapes and {q.recipe_source})")


# --- placement ---------------------------------------------------------------------------------

@dataclass
class Placement:
    fits: bool
    where: str  # all_gpu | experts_in_ram | layers_in_ram | cpu_only
    n_gpu_layers: int  # llama-server -ngl (n_layer + 1 = every layer and the output head)
    tensor_split: tuple[int, ...]  # layers per GPU, as -ts gives them
    n_cpu_moe: int  # the experts of blocks 0..n_cpu_moe-1 stay in RAM
    context: int  # KV cells (-c)
    kv_type: str  # -ctk (and -ctv for a K-only cache)
    kv_bytes: int
    gpu_bytes: tuple[int, ...]  # weights + KV + compute, per GPU
    gpu_usable: tuple[int, ...]
    host_bytes: int  # weights, KV and compute kept in host RAM, plus the OS reserve
    host_usable: int
    weights_on_gpus: int
    weights_in_ram: int
    why: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def kv_per_token(self) -> int:
        return self.kv_bytes // max(1, self.context)


def _kv_type(lay: Layout) -> str:
    # The pre-MLA DeepSeek cache is ~4.8 MiB/token in f16: quantize K as the published runs do (q4_0
    # K, f16 V; without flash attention V stays f16). A K-only latent cache is small: f16.
    return "q4_0" if lay.arch == "deepseek2" and not lay.mla else "f16"


def kv_bytes_per_token_layer(lay: Layout, kv_type: str) -> int:
    k = _nbytes(kv_type, lay.kv_k_values) if lay.kv_k_values % 32 == 0 or kv_type == "f16" else 2 * lay.kv_k_values
    return k + 2 * lay.kv_v_values


def _groups(lay: Layout) -> tuple[list[int], list[int], int, int]:
    """Per layer: bytes that go with the layer, bytes of its routed experts; the output head; the
    input embeddings."""
    base, exps = [0] * lay.n_layer, [0] * lay.n_layer
    output = embd = 0
    for t in lay.tensors:
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) < lay.n_layer:
            i = int(m.group(1))
            if tensor_kind(t.name) == "routed_experts":
                exps[i] += t.nbytes
            else:
                base[i] += t.nbytes
        elif t.name.startswith("token_embd"):
            embd += t.nbytes
        elif not m:
            output += t.nbytes
    if output == 0 or not any(t.name.startswith("output.") for t in lay.tensors):
        output += embd  # a tied head: llama.cpp puts a copy of the embeddings' weights with the output layer
    return base, exps, output, embd


def compute_bytes(lay: Layout, context: int, last: bool) -> int:
    """llama.cpp's compute buffer, estimated: without flash attention the attention scores of one
    micro-batch (heads x context x 512 x f32), and on the last GPU the logits (vocab x 512 x f32)."""
    scores = lay.heads * max(context, UBATCH) * UBATCH * 4
    return scores + (lay.vocab * UBATCH * 4 if last else 0) + 256 * (1 << 20)


def place(lay: Layout, gpu_memory: list[int], host_ram: int, context: int) -> Placement:
    """Place `lay` with a KV cache of `context` cells on GPUs of `gpu_memory` bytes each and `host_ram`
    bytes of RAM: every layer on the GPUs when it fits; else the fewest leading layers' routed experts
    in RAM; else, with every expert in RAM, the fewest whole layers in RAM. CPU only: everything in RAM."""
    kv_type = _kv_type(lay)
    kv_layer = kv_bytes_per_token_layer(lay, kv_type) * context
    base, exps, output, embd = _groups(lay)
    n = lay.n_layer
    host_usable = max(0, int(host_ram * 0.9) - HOST_RESERVE)
    common = dict(context=context, kv_type=kv_type, kv_bytes=kv_layer * n, host_usable=host_usable)
    if not gpu_memory:
        need = lay.size + kv_layer * n + compute_bytes(lay, context, True)
        return Placement(need <= host_usable, "cpu_only", 0, (), 0, gpu_bytes=(), gpu_usable=(),
                         host_bytes=need + HOST_RESERVE, weights_on_gpus=0, weights_in_ram=lay.size, **common)
    caps = [max(0, m - FIT_MARGIN - compute_bytes(lay, context, i == len(gpu_memory) - 1))
            for i, m in enumerate(gpu_memory)]

    def greedy(cost: list[int], with_output: bool, limit: list[float]) -> list[int] | None:
        """Contiguous layers per GPU, each filled up to `limit` in order; the output head on the last."""
        counts, g, used = [0] * len(limit), 0, 0
        for c in cost:
            while g < len(limit) and used + c > limit[g]:
                g, used = g + 1, 0
            if g == len(limit):
                return None
            counts[g] += 1
            used += c
        if with_output:
            last = max(i for i, k in enumerate(counts) if k) if any(counts) else len(limit) - 1
            tail = sum(cost[sum(counts[:last]):sum(counts[:last + 1])]) + output
            while tail > limit[last]:
                last += 1  # the head alone on the next GPU
                if last == len(limit):
                    return None
                tail = output
            counts[last] += 1
        return counts

    def assign(cost: list[int], with_output: bool) -> list[int] | None:
        """The layers spread so the fullest GPU is as empty as it can be (the same share of each GPU's
        room): headroom on every GPU for what the estimate of llama.cpp's buffers misses."""
        if greedy(cost, with_output, caps) is None:
            return None
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            if greedy(cost, with_output, [c * mid for c in caps]) is None:
                lo = mid
            else:
                hi = mid
        return greedy(cost, with_output, [c * hi for c in caps])

    def result(where, ngl, counts, n_moe, cpu_layers):
        on_gpu_layers = range(n - (ngl if ngl <= n else n), n)
        w_gpu = sum(base[i] + (exps[i] if i >= n_moe else 0) for i in on_gpu_layers) + (output if ngl > n else 0)
        w_ram = lay.size - w_gpu
        kv_ram = kv_layer * cpu_layers
        per_gpu, at = [], 0
        gpu_layers = list(on_gpu_layers) + ([n] if ngl > n else [])
        for g, k in enumerate(counts):
            mine = gpu_layers[at:at + k]
            at += k
            per_gpu.append(sum((base[i] + (exps[i] if i >= n_moe else 0) + kv_layer) if i < n else output for i in mine)
                           + FIT_MARGIN + compute_bytes(lay, context, g == len(counts) - 1))
        host = w_ram + kv_ram + (compute_bytes(lay, context, False) if cpu_layers else 0) + HOST_RESERVE
        return Placement(host - HOST_RESERVE <= host_usable, where, ngl, tuple(counts), n_moe, gpu_bytes=tuple(per_gpu),
                         gpu_usable=tuple(gpu_memory), host_bytes=host, weights_on_gpus=w_gpu, weights_in_ram=w_ram,
                         **common)

    full = [base[i] + exps[i] + kv_layer for i in range(n)]
    counts = assign(full, True)
    if counts is not None:
        return result("all_gpu", n + 1, counts, 0, 0)
    for n_moe in range(1, n + 1):
        if exps[n_moe - 1] == 0:
            continue  # a dense layer: nothing to move
        cost = [base[i] + (exps[i] if i >= n_moe else 0) + kv_layer for i in range(n)]
        counts = assign(cost, True)
        if counts is not None:
            return result("experts_in_ram", n + 1, counts, n_moe, 0)
    for ngl in range(n, 0, -1):  # every expert in RAM, and the first n - ngl layers whole
        cost = [base[i] + kv_layer for i in range(n - ngl, n)]
        counts = assign(cost, False)
        if counts is not None:
            return result("layers_in_ram", ngl, counts, n, n - ngl)
    return result("layers_in_ram", 0, [0] * len(caps), n, n)


def choose(spec: "ModelSpec", gpu_memory: list[int], host_ram: int, context: int) -> tuple[Quant, Placement, list[str]]:
    """The largest published quantization of `spec` that fits GPUs + RAM with `context` (all on the GPUs
    when it fits there, experts in RAM when not), and what the next larger one would need."""
    options = quants(spec.name)
    if not options:
        raise LookupError(spec.name)
    best = None
    notes = []
    for q in options:
        p = place(layout_from_recipe(spec, q), gpu_memory, host_ram, context)
        if p.fits:
            best = (q, p)
        else:
            notes.append(f"the next larger, {q.quant} ({q.size_bytes / 1e9:.0f} GB), needs {p.host_bytes / GiB:.0f} GiB of "
                         f"host RAM with this placement ({p.host_usable / GiB:.0f} GiB usable)" if best else "")
            break
    if best is None:
        q = options[0]
        return q, place(layout_from_recipe(spec, q), gpu_memory, host_ram, context), []
    if best[0] is options[-1]:
        notes = [f"{best[0].quant} is the largest dynamic quantization published for {spec.name}"]
    return best[0], best[1], [x for x in notes if x]


def flags(p: Placement, n_layer: int, gpus: int, *, has: set[str] | None = None) -> list[str]:
    """llama-server arguments for placement `p` (has: the options the installed llama-server offers)."""
    has = has if has is not None else {"--n-cpu-moe", "--fit"}
    args: list[str] = []
    if gpus:
        args += ["-ngl", str(p.n_gpu_layers) if p.n_gpu_layers <= n_layer else "999"]
        if gpus > 1:
            args += ["--split-mode", "layer", "--tensor-split", ",".join(str(c) for c in p.tensor_split)]
        if p.n_cpu_moe:
            if "--n-cpu-moe" in has:
                args += ["--n-cpu-moe", str(p.n_cpu_moe)]
            else:
                layers = "|".join(str(i) for i in range(p.n_cpu_moe))
                args += ["--override-tensor", rf"blk\.({layers})\.ffn_(up|down|gate)_exps\.=CPU"]
    if p.kv_type != "f16":
        args += ["--cache-type-k", p.kv_type]
    if "--fit" in has:
        args += ["--fit", "off"]  # the placement above is the plan (module docstring)
    return args


def describe(pl: dict, gguf_quant: str | None = None) -> str:
    """One line for people: what goes where, and the host RAM it needs (a plan's `placement`)."""
    n = pl["n_layer"]
    parts = []
    if pl["where"] == "cpu_only":
        parts.append(f"all {n} layers in RAM")
    else:
        first = n - min(pl["n_gpu_layers"], n)
        at = first
        for g, (k, used, cap) in enumerate(zip(pl["tensor_split"], pl["gpu_bytes"], pl["gpu_usable"])):
            if not k:
                parts.append(f"GPU{g} unused")
                continue
            last = at + k - 1
            head = last >= n
            span = f"layers {at}-{min(last, n - 1)}" if min(last, n - 1) >= at else "no layers"
            parts.append(f"GPU{g} {span}{' + output' if head else ''} ({used / GiB:.1f}/{cap / GiB:.1f} GiB)")
            at = last + 1
        if pl["n_cpu_moe"]:
            parts.append(f"routed experts of layers 0-{pl['n_cpu_moe'] - 1} in RAM")
        if first:
            parts.append(f"layers 0-{first - 1} whole in RAM")
    kv = f"KV {pl['kv_bytes'] / GiB:.1f} GiB ({pl['kv_type']})"
    ram = f"host RAM {pl['host_bytes'] / GiB:.0f} of {(pl['host_usable'] + HOST_RESERVE) / GiB:.0f} GiB"
    return f"{gguf_quant + ': ' if gguf_quant else ''}{'; '.join(parts)}; {kv}; {ram}"
