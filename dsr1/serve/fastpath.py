"""The embedded engine's fast path: a lean Llama/Qwen2 forward over the loaded model's own weights.

Why: on a small model most of an eager transformers decode step is per-module Python overhead
(module calls, cache dispatch, mask helpers), not arithmetic (issue 10: 135M parameters, 30
layers, ~50 ms per step where llama.cpp needs ~12). This module runs the same arithmetic as
transformers' LlamaForCausalLM / Qwen2ForCausalLM (the R1 distills' architectures) in one
function per forward:

- q|k|v and gate|up are fused (one matmul each instead of three and two). No weight is copied:
  the fused matrices are allocated once and the original modules' weights are re-pointed at
  views of them, so the transformers model still works and memory does not double.
- RoPE cos/sin come from the model's own rotary module once, for every position (rope scaling
  included), and are gathered per step.
- Decode attention folds each KV head's group of query heads into the query-length axis
  ([n, kv_heads, group*t, d] against [n, kv_heads, span, d]): one SDPA call with no repeated
  keys and no GQA broadcast, measured the fastest form on CPU.
- The decode step can be compiled whole with torch.compile (inductor) over a FrozenStep: the
  weights become constants ("freezing"), packed once for inductor's own GEMM micro-kernels (AMX on
  CPUs that have it), which are timed against oneDNN's at compile time (max_autotune). Measured on
  a 2-core Xeon with AMX in bf16: 15/16/23 ms per step at batch 1/4/16 against 27/28/38 ms eager,
  after ~100 s of compiling. Batch rows and context span are dynamic; one row is its own variant.
  (An earlier per-layer compile without freezing measured no faster than eager: the GEMMs, most
  of the step, stayed oneDNN's with unpacked weights.)

RMSNorm runs in fp32 as transformers does, so greedy output matches the transformers path
(tests/test_fastpath.py checks it token for token in fp32). Only a model whose weights all sit on
one real device takes this path; device_map offload keeps the transformers forward.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from dsr1.serve import pages
from dsr1.serve.wquant import METHODS, PACKED, Frozen, QuantWeight, frozen_mm, head_method, quantize

ARCHS = ("llama", "qwen2")
MEASURED_ROWS = (1, 2, 4, 8, 16, 32, 64)  # batch sizes measure_rows times, up to the cache's rows
PROMPT_TOKENS = 256  # the prompt measure_rows times through the package and eagerly (one default chunk)
PROMPT_KEY = "prompt"  # its timing's key in the saved timings
TIE = 1.05  # the compiled step is kept unless eager measured this much faster (loses)


def unsupported_reason(model) -> str | None:
    """Why `model` cannot take the fast path, or None when it can."""
    cfg = model.config
    if cfg.model_type not in ARCHS:
        return f"architecture {cfg.model_type!r} (the fast path covers {', '.join(ARCHS)})"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return "weights spread over several devices or offloaded (device_map)"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    if getattr(cfg, "mlp_bias", False):
        return "biased MLP projections"
    if any(type(m).__name__.startswith(("Linear4bit", "Linear8bit")) for m in model.modules()):
        return "bitsandbytes-quantized weights"
    return None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, contiguous: bool = False) -> torch.Tensor:
    """x @ w.T (+ b), as F.linear; for bf16 on CPU computed as (w @ x.T).T.

    Why: PyTorch's bf16 F.linear on CPU (oneDNN, transposed weight) streamed a decode step's
    weights at about 12 GB/s on a 2-core Xeon with AVX512-BF16, while w @ x.T reached about
    19 GB/s for 2+ rows, and ran prompt chunks 1.6x faster too (a decode step: 28.1 -> 24.0 ms at
    batch 1, 37.3 -> 32.3 ms at batch 16; docs/performance.md). One row alone falls into a slower
    matrix-vector kernel, so it is sent as two identical rows. fp32 is the other way round
    (w @ x.T took 2.7x longer at one row), and GPUs have cuBLAS: both keep F.linear.
    `contiguous`: the caller needs a row-major result (attention inputs); otherwise it stays
    transposed in memory, which elementwise ops keep and the next projection's x.T then reads
    contiguously, the layout mm likes best.
    """
    if isinstance(w, (QuantWeight, Frozen)):  # weight-only int8/int4 (dsr1.serve.wquant), eager or compiled
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = frozen_mm(w, x2) if isinstance(w, Frozen) else w.mm(x2)
        if b is not None:
            y = y + b
        return y.view(*shape[:-1], w.shape[0])
    if w.dtype != torch.bfloat16 or w.device.type != "cpu" or torch.compiler.is_compiling():
        # compiled (FrozenStep): inductor packs a frozen weight for its own GEMM when it is the
        # second operand of x @ w.T; the transposed form above would hide it
        return F.linear(x, w, b)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    if m == 1:
        x2 = x2.expand(2, -1)
    y = torch.mm(w, x2.t()).t()
    if m == 1:
        y = y[:1]
    if contiguous:
        y = y.contiguous()
    if b is not None:
        y = y + b
    return y.view(*shape[:-1], w.shape[0])


def _offsets(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _drop_pages(sources: list[torch.Tensor], mappings: list[tuple[int, int, str]]) -> None:
    """Hand back the resident pages of tensors nothing reads any more (a layer's projection weights once
    fused: the modules view the fused copy) where they lie in a file mapping (a safetensors checkpoint
    loaded in place, bf16 into bf16): the mapping stays, other weights in it are read, but every page
    the fuse read through it stayed resident beside the fused copy (the 1.5B shape: 2.2 GB). Only whole
    pages inside a tensor's bytes and inside one file mapping (dsr1.serve.pages). The caller holds
    `sources`, so their mapping cannot go away meanwhile."""
    for t in sources:
        if t.device.type != "cpu" or not t.is_contiguous():
            continue
        lo = -(-t.data_ptr() // pages.PAGE) * pages.PAGE
        hi = (t.data_ptr() + t.nbytes) // pages.PAGE * pages.PAGE
        if hi > lo and any(a <= lo and hi <= b for a, b, _ in mappings):
            pages.drop(lo, hi)


def _mapped_table(t: torch.Tensor) -> tuple[int, int] | None:
    """The page range of the file mapping that `t` (the embedding table) lies in, to keep it there and drop
    the mapping's pages from this process; None where it is not in one, or where this process has written
    into the mapping (private copies on write, which dropping would lose: the table is copied then)."""
    if not t.is_contiguous():
        return None
    where = pages.mapping_of(t.data_ptr(), t.nbytes)
    if where is None or pages.written(where[0], where[1]) != 0:
        return None
    return where[0], where[1]


def _fused_bias(modules: list[torch.nn.Linear]) -> torch.Tensor | None:
    """The modules' biases end to end (None when they have none)."""
    biases = [m.bias for m in modules]
    b = torch.cat([x.data for x in biases], 0) if all(x is not None for x in biases) else None
    if b is None and any(x is not None for x in biases):
        raise ValueError("some fused projections have a bias and some do not")
    return b


def lora_masks(owners: dict[str, torch.Tensor], rows: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per LoRA site, which stacked columns each row uses ([n, 1, w]): those its adapter owns (`owners`,
    adapter id per column; `rows`, each row's adapter id, 0 none). Eager and inside the compiled step."""
    return {site: (owner[None, :] == rows[:, None]).to(dtype).unsqueeze(1) for site, owner in owners.items()}


def _release_projections(layer, dtype: torch.dtype) -> None:
    """A transformers layer's projection weights emptied: the fast path holds them in its own form."""
    empty = torch.empty(0, dtype=dtype)
    a, m = layer.self_attn, layer.mlp
    for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
        lin.weight.data = empty


def _fuse(modules: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [sum(out), in] matrix holding the modules' weights; the modules now view into it."""
    w = torch.cat([m.weight.data for m in modules], 0)
    b = _fused_bias(modules)
    off = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight.data = w[off : off + rows]
        if b is not None:
            m.bias.data = b[off : off + rows]
        off += rows
    return w, b


class FastForward:
    """Prefill, decode and multi-token verify for a Llama/Qwen2 model into a SlotCache."""

    def __init__(self, model, max_len: int, quant: str | None = None, store=None):
        cfg = model.config
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.device = self.embed.device
        self.norm_w = inner.norm.weight
        self.eps = float(cfg.rms_norm_eps)
        self.head = model.get_output_embeddings().weight
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.group = self.heads // self.kv_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        self.inter = cfg.intermediate_size
        self.max_len = max_len
        self.quant = quant
        self.weights_how = None  # int8/int4 with a store: whether the weights came from it (dsr1.serve.wstore)
        self._shared = None  # the quantized weights as the model holds them for a later FastForward (_pack_rest)
        self._table_pages = None  # the embedding table's file mapping, where it stays (_pack_rest)
        self._mappings = pages.file_mappings() if self.device.type == "cpu" else []  # where _drop_pages may act
        if getattr(model, "_dsr1_released", False):
            raise ValueError("this model's weights were released to its compiled step (release_eager)")
        done = getattr(model, "_dsr1_quantized", None)  # a FastForward made before (a longer context)
        if done is not None:
            if done[0] != quant:
                raise ValueError(f"the model's weights are already {done[0] or 'unquantized'}, not {quant}")
            self.layers, self.head = list(done[1]), done[2]
            self._shared = done
        else:
            kept = writer = None
            if quant in METHODS and store is not None and self.device.type == "cpu":
                # int8/int4 weights of an earlier start (dsr1.serve.wstore), else kept as they are made
                from dsr1.serve import wstore

                name = wstore.key(model, quant)
                kept = wstore.load(store, name, len(inner.layers))
                writer = None if kept else wstore.Writer(store, name, wstore.need_bytes(model, quant))
            self.layers = []
            for i, layer in enumerate(inner.layers):
                a, m = layer.self_attn, layer.mlp
                if kept is not None:
                    ws, bqkv = kept[0][i], _fused_bias([a.q_proj, a.k_proj, a.v_proj])
                    self.layers.append((layer.input_layernorm.weight, ws["qkv"], bqkv, ws["o"], a.o_proj.bias,
                                        layer.post_attention_layernorm.weight, ws["gu"], ws["d"]))
                    _release_projections(layer, self.embed.dtype)
                    continue
                sources = [x.weight.data for x in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)]
                wqkv, bqkv = _fuse([a.q_proj, a.k_proj, a.v_proj])
                wgu, _ = _fuse([m.gate_proj, m.up_proj])
                _drop_pages(sources, self._mappings)
                del sources
                self.layers.append((layer.input_layernorm.weight, wqkv, bqkv, a.o_proj.weight, a.o_proj.bias,
                                    layer.post_attention_layernorm.weight, wgu, m.down_proj.weight))
                del wqkv, wgu
                if quant:  # now, so only one layer's fused bf16 copy exists at a time
                    self._pack_layer(i, layer, quant)
                    if writer is not None:
                        _, wqkv, _, wo, _, _, wgu, wd = self.layers[i]
                        writer.layer({"qkv": wqkv, "o": wo, "gu": wgu, "d": wd})
            if quant:
                self._pack_rest(model, quant, head=kept[1] if kept else None)
                if kept is not None:
                    self.weights_how = f"weights {'mapped' if wstore.maps(quant) else 'read'} from an earlier start"
                elif writer is not None:
                    writer.head(self.head)
                    self.weights_how = (f"weights quantized, not kept ({writer.why_not})" if writer.why_not else
                                        "weights quantized, kept for the next start")
        with torch.no_grad():
            pos = torch.arange(max_len, device=self.device)[None]
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32, device=self.device), pos)
        self.cos = cos[0].to(self.embed.dtype)
        self.sin = sin[0].to(self.embed.dtype)
        self.compiled = False
        self.compile_seconds = 0.0
        self._aot = self._store = None  # the ahead-of-time compiled step and where it is kept (enable_compile)
        self._aot_one = None  # its one-row, one-token library where there is one (warm_up)
        self._aot_head = None  # an int4 model's LM head alone, for the eager forward's logits (warm_up)
        self.package = None  # its file
        self.not_kept = None  # why the compiled step is not kept on disk (enable_compile), when it is not
        self.compiled_rows = 1 << 30  # batches up to this many rows take the compiled step (measure_rows)
        self._slots = 1 << 30  # the cache's rows when row_timings were taken
        self.row_timings: dict[int, tuple[float, float]] = {}  # rows -> (compiled, eager) seconds per step
        self.prompt_compiled = False  # prompts through the compiled package: it was faster (measure_rows)
        self.prompt_timing: tuple[float, float] | None = None  # (compiled, eager) seconds for a prompt
        self._lora_src: list[list[dict]] = []  # LoRA adapters, id i+1 (0 is the base model)
        self.lora_w: list[dict] = [{} for _ in self.layers]
        self.lora_owner: dict[str, torch.Tensor] = {}

    def _quantize(self, model, method: str) -> None:
        """Weight-only `method` (or PACKED) for every projection and the LM head of an existing fast
        path; the bf16 copies are released (the transformers modules keep empty weights: with the fast
        path nothing else reads them), so memory holds the new weights only. The embedding table stays
        bf16 (rows are looked up)."""
        for i, layer in enumerate(model.model.layers):
            self._pack_layer(i, layer, method)
        self._pack_rest(model, method)

    def _pack_layer(self, i: int, layer, method: str) -> None:
        """Layer i's projections in `method`, its plain weights released at once: the peak is the plain
        weights plus one layer's new ones (measured: releasing all at the end put the 1.5B shape's peak
        RSS at twice its weights; fusing every layer before quantizing put the 7B shape's int4 peak at
        21 GB)."""
        ln1, wqkv, bqkv, wo, bo, ln2, wgu, wd = self.layers[i]
        self.layers[i] = (ln1, quantize(wqkv, method), bqkv, quantize(wo, method), bo, ln2,
                          quantize(wgu, method), quantize(wd, method))
        # o and down still lie in the checkpoint's mapping, which a compiled package beside this may keep
        # alive (it reads the embedding there): the pages packing read go, as the fused ones' did
        _drop_pages([wo, wd], self._mappings)
        del wqkv, wo, wgu, wd
        _release_projections(layer, self.embed.dtype)

    def _pack_rest(self, model, method: str, head: QuantWeight | None = None) -> None:
        """The head in `method`'s head format (or `head`, kept from an earlier start), what is left copied
        out of the checkpoint's mapping."""
        empty = torch.empty(0, dtype=self.embed.dtype)
        # the head: wquant.head_method's (int8, or int4 through dsr1's VNNI kernel), packed when packing;
        # tied to the embedding in small models, whose bf16 table then stays for the lookups
        # (fbgemm packs it at the first eager call, or pack_head: a compiled step reads its plain integers)
        self.head = head if head is not None else quantize(self.head, head_method(method, tuple(self.head.shape)), lazy=True)
        out = model.get_output_embeddings()
        if out.weight.data_ptr() != self.embed.data_ptr():
            out.weight.data = empty
        # What else still points into the checkpoint's file mapping (norms, biases) is copied out, and
        # every page the packing read through it dropped from this process: measured on the 1.5B shape,
        # resident memory after packing bf16 6.6 -> 4.0 GB, int4 4.7 -> 2.1 GB. The embedding table
        # stays where it lies, as llama.cpp's mapped weights do: a step reads the rows of its tokens, so
        # only their pages come back (64 KB around each from the page cache; 256 random rows of the 1.5B
        # shape's 0.47 GB table: 16 MB), not a copy of all 152k rows. (A checkpoint is replaced by
        # renaming a new file over it, dsr1.download, so the mapped one stays whole while it is read.)
        keep = self._table_pages = _mapped_table(self.embed) if self.device.type == "cpu" else None
        for p in model.parameters():
            if p.numel() and not (keep and p is self.embed):
                p.data = p.data.clone()
        self._drop_table()
        # shared with a later FastForward (a longer context); a list, so that enable_compile's int8 head
        # replaces the fbgemm one here too instead of keeping it alive beside it
        self._shared = model._dsr1_quantized = [method, tuple(self.layers), self.head]

    def _drop_table(self) -> None:
        """The pages of the checkpoint's mapping (the embedding table kept there: _pack_rest) out of this
        process, after work that read all of them: packing, and building a compiled library (which
        compares each of its constants with the step's weights, the table's every row)."""
        if self._table_pages is not None:
            pages.drop(*self._table_pages)

    # -- LoRA ------------------------------------------------------------------------------------
    # Every adapter's A matrices are stacked on the rank axis and its B matrices side by side, per
    # layer and projection ("site"): one x @ A_all.T gives every adapter's low-rank input for every
    # row, a mask keeps each row's own adapter's columns (none for base-model rows), and one
    # @ B_all.T adds the delta. Two small matmuls per site whatever the mix of adapters in the
    # batch, no gather or scatter of rows (S-LoRA and punica get the same effect with custom kernels).
    SITES = ("qkv", "o", "gu", "d")

    def add_adapter(self, per_layer: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> int:
        """Add one adapter (dsr1.lora.load: per layer {module: (A, B*scale)}); returns its id (1, 2, ...).
        Before enable_compile: a compiled step holds the adapters it was compiled with."""
        if self.compiled:
            raise ValueError("adapters are added before the decode step is compiled")
        self._lora_src.append(per_layer)
        self._stack()
        return len(self._lora_src)

    def _site(self, mods: dict, site: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One adapter's (A [w, in], B [out, w]) for a fused site of one layer, or None."""
        parts = {"qkv": (("q_proj", self.q_size), ("k_proj", self.kv_size), ("v_proj", self.kv_size)),
                 "gu": (("gate_proj", self.inter), ("up_proj", self.inter)),
                 "o": (("o_proj", None),), "d": (("down_proj", None),)}[site]
        present = [(n, size, off) for (n, size), off in zip(parts, _offsets([sz or 0 for _, sz in parts]))
                   if n in mods]
        if not present:
            return None
        if len(parts) == 1:
            return mods[parts[0][0]]
        a = torch.cat([mods[n][0] for n, _, _ in present], 0)
        b = a.new_zeros(sum(sz for _, sz in parts), a.shape[0])
        r0 = 0
        for n, size, off in present:
            r = mods[n][0].shape[0]
            b[off : off + size, r0 : r0 + r] = mods[n][1]
            r0 += r
        return a, b

    def _stack(self) -> None:
        """Rebuild the stacked A_all/B_all per layer and site, and each site's column owners."""
        fan = {"qkv": (self.embed.shape[1], self.q_size + 2 * self.kv_size), "o": (self.q_size, self.embed.shape[1]),
               "gu": (self.embed.shape[1], 2 * self.inter), "d": (self.inter, self.embed.shape[1])}
        dt, dev = self.embed.dtype, self.device
        self.lora_w = [{} for _ in self.layers]
        self.lora_owner = {}
        for site in self.SITES:
            per = [[self._site(ad[li], site) for li in range(len(self.layers))] for ad in self._lora_src]
            widths = [max((p[0].shape[0] for p in layers if p is not None), default=0) for layers in per]
            if not sum(widths):
                continue
            owner = [k + 1 for k, w in enumerate(widths) for _ in range(w)]
            self.lora_owner[site] = torch.tensor(owner, device=dev)
            fin, fout = fan[site]
            for li in range(len(self.layers)):
                a = torch.zeros(len(owner), fin, dtype=dt, device=dev)
                b = torch.zeros(fout, len(owner), dtype=dt, device=dev)
                off = 0
                for k, w in enumerate(widths):
                    p = per[k][li]
                    if p is not None:
                        a[off : off + p[0].shape[0]] = p[0]
                        b[:, off : off + p[0].shape[0]] = p[1]
                    off += w
                self.lora_w[li][site] = (a, b)

    def _masks(self, adapters: list[int] | None, t: int = 1):
        """Per site, which stacked columns each row uses ([n, 1, w], or [n, t, w] broadcast over tokens);
        None when no row has an adapter."""
        if not adapters or not any(adapters):
            return None
        return lora_masks(self.lora_owner, torch.tensor(adapters, device=self.device), self.embed.dtype)

    def _layer_lora(self, li: int, masks, src=None):
        """Layer li's (A_all, B_all, mask) per site, the weights from `src` (as in `_step`), or None."""
        if not masks:
            return None
        lora_w = (self if src is None else src).lora_w[li]
        return {site: (*lora_w[site], m) for site, m in masks.items()}

    @staticmethod
    def _lora(y: torch.Tensor, x: torch.Tensor, lora, key: str) -> torch.Tensor:
        """y (= x @ W.T) plus each row's own adapter's x @ A.T @ B.T ([n, t, *] tensors)."""
        site = lora.get(key)
        if site is None:
            return y
        a, b, mask = site
        return y + linear(linear(x, a) * mask, b)

    # -- pieces --------------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm: normalized in fp32, cast back, then scaled. F.rms_norm is the
        # same arithmetic in one kernel (bit-identical here) instead of six small ones.
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin

    def logits(self, x: torch.Tensor, src=None) -> torch.Tensor:
        """Final norm and LM head, fp32; `src` as in `_step`."""
        src = self if src is None else src
        # Row-major: sampling reduces along the vocabulary, and on the transposed result of
        # `linear` amax/topk/argmax over [16, 49152] took 1-2 ms each instead of 0.03-0.6 ms.
        head = src.head_weight if isinstance(src, FrozenStep) else src.head
        x = self._norm(x, src.norm_w)
        if src is self and self._aot_head is not None:  # eager: the head's own library (warm_up)
            shape = x.shape
            return self._aot_head(x.reshape(-1, shape[-1]).to(self._aot_head.dtype)).float().view(*shape[:-1], -1)
        return linear(x, head, contiguous=True).float()

    # -- the decode / verify step ----------------------------------------------------------------
    def _step(self, tokens: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor, ks: list[torch.Tensor],
              vs: list[torch.Tensor], groups=None, src=None, pick: torch.Tensor | None = None) -> torch.Tensor:
        """tokens/pos [n, t]: the t new tokens of cache rows 0..n-1 and their positions; cols =
        arange(span), the cached columns attended (span > every position). Each query sees the
        columns up to its own position. Writes K/V in place; returns logits [n, t, vocab] (fp32), or
        with `pick` (indices into the n*t tokens, row-major) [len(pick), vocab]: a prompt needs its last
        token's only, and the LM head over every prompt token would cost more than the layers.
        `src`: where the weights and RoPE tables come from (this object, or a FrozenStep's parameters)."""
        src = self if src is None else src
        n, t = tokens.shape
        span = cols.shape[0]
        x = src.embed[tokens]
        cos = src.cos[pos].unsqueeze(2)  # [n, t, 1, d]: q and k heads ride along axis 2
        sin = src.sin[pos].unsqueeze(2)
        mask = (cols.view(1, 1, span) <= pos.unsqueeze(-1)).unsqueeze(1)  # [n, 1, t, span]
        if self.group > 1:
            mask = mask.repeat(1, 1, self.group, 1)  # the query heads of one KV head ride along t
        # Additive, in the compute dtype, once per step: SDPA turns a boolean mask into this in
        # every layer otherwise.
        mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        rows = torch.arange(n, device=tokens.device).view(n, 1)
        for li, weights in enumerate(src.layers):
            lora = self._layer_lora(li, groups, src)
            x = self._layer(x, cos, sin, mask, rows, pos, ks[li], vs[li], *weights, lora=lora)
        if pick is not None:
            x = x.reshape(n * t, -1)[pick]
        return self.logits(x, src)

    def _layer(self, x, cos, sin, mask, rows, pos, ck, cv, ln1, wqkv, bqkv, wo, bo, ln2, wgu, wd, lora=None):
        """One decoder layer for the decode/verify step."""
        n, t = pos.shape
        span = mask.shape[-1]
        h = self._norm(x, ln1)
        qkv = linear(h, wqkv, bqkv, True)
        if lora:
            qkv = self._lora(qkv, h, lora, "qkv")
        # RoPE on q and k heads together, in [n, t, heads, d] (one set of ops instead of two)
        qk = self._rope(qkv[..., : self.q_size + self.kv_size].view(n, t, self.heads + self.kv_heads,
                                                                      self.head_dim), cos, sin)
        ck[rows, :, pos] = qk[:, :, self.heads :]
        cv[rows, :, pos] = qkv[..., self.q_size + self.kv_size :].view(n, t, self.kv_heads, self.head_dim)
        q = qk[:, :, : self.heads].transpose(1, 2).reshape(n, self.kv_heads, self.group * t, self.head_dim)
        o = F.scaled_dot_product_attention(q, ck[:n, :, :span], cv[:n, :, :span], attn_mask=mask, scale=self.scale)
        # [n, kv_heads, group*t, d] -> [n, t, heads*d]. Split group from t before moving t forward: the
        # shorter view(n, heads, t, d) made export guard on an expression of t it could not prove, so
        # a token axis of any length (prompts through the compiled step) could not be exported.
        o = o.view(n, self.kv_heads, self.group, t, self.head_dim).permute(0, 3, 1, 2, 4).reshape(n, t, self.q_size)
        return self._mlp(x + self._out(o, wo, bo, lora), ln2, wgu, wd, lora)

    def _out(self, o, wo, bo, lora):
        y = linear(o, wo, bo)
        return self._lora(y, o, lora, "o") if lora else y

    def _mlp(self, x, ln2, wgu, wd, lora=None):
        """The second half of a decoder layer, the same in the step and in prompt prefill."""
        h = self._norm(x, ln2)
        gu = linear(h, wgu)
        if lora:
            gu = self._lora(gu, h, lora, "gu")
        g, u = gu.split((self.inter, self.inter), -1)
        a = F.silu(g) * u
        y = linear(a, wd)
        return x + (self._lora(y, a, lora, "d") if lora else y)

    def pack(self, model) -> None:
        """Reorder the bf16 weights into oneDNN's blocked layout, replacing the plain ones (eager decode
        1.3-1.45x faster per matmul on a 2-core AVX-512 CPU: dsr1.serve.wquant). Not with a step
        compiled just in time (inductor packs the frozen weights its own way, from these); with one
        compiled ahead of time, which keeps what it reads of the plain weights (aotstep._load), the eager
        forward beside it (prompts, and the batches it is faster at: measure_rows) runs on packed weights too."""
        if (self.compiled and self._aot is None) or self.quant:
            raise ValueError("pack() is for the eager bf16 step")
        self._frozen = None  # the package holds what it reads: the rest of the plain weights go once packed
        self.quant = PACKED
        self._quantize(model, PACKED)

    def release_eager(self, model) -> int:
        """Drop the eager forward's weights once the compiled package serves every batch size of this cache
        and every prompt (measure_rows): nothing reads them any more, and they were a second copy beside
        the package's own packed one (the 1.5B shape: 3.5 GB of a restart's 9.9 GB resident). The
        transformers modules keep empty weights, as after `_quantize`; what still points into the
        checkpoint's file mapping (norms, biases) is copied out so the mapping goes too. Bytes released.
        Not for speculative decoding (its verify steps run the eager forward), nor for LoRA adapters that
        are not in the package (lora_compiled)."""
        if self._aot is None or not self.prompt_compiled:
            raise ValueError("release_eager() is for a loaded package that serves prompts too")
        weights = {id(t): t for t in (self.embed, self.head, *(w for ws in self.layers for w in ws[1:]))
                   if t is not None}
        # what the package reads in place (the step's own weights, aotstep._load) stays, held by it
        kept = {t.untyped_storage().data_ptr() for run in (self._aot, self._aot_one, self._aot_head)
                for t in getattr(run, "shared", ())}
        freed = sum(n for w in weights.values() for ptr, n in _parts(w) if ptr not in kept)
        empty = torch.empty(0, dtype=self.embed.dtype, device=self.device)
        own = lambda t: None if t is None else t.clone()  # noqa: E731 - out of the file mapping
        self.layers = [(own(ln1), empty, own(bqkv), empty, own(bo), own(ln2), empty, empty)
                       for ln1, _, bqkv, _, bo, ln2, _, _ in self.layers]
        self.embed = self.head = empty
        self.norm_w = own(self.norm_w)
        self._frozen = None  # its parameters are these weights; the package holds its own copy
        for p in model.parameters():
            p.data = empty if p.numel() > 1 << 16 else p.data.clone()
        model._dsr1_released = True  # a later FastForward (a longer context) would find no weights
        if hasattr(model, "_dsr1_quantized"):  # nor quantized or packed ones: they go with the rest
            del model._dsr1_quantized
        self._shared = None
        from dsr1.serve import aotstep

        aotstep._release()
        return freed

    def pack_head(self) -> None:
        """An int8 head for the eager forward packed for fbgemm now, not at the first request (~2 s for
        R1-Distill-Qwen-1.5B's on 2 cores); not for a compiled step, which reads it as plain tensors."""
        if isinstance(self.head, QuantWeight):
            self.head.pack()

    def enable_compile(self, store=None) -> None:
        """Compile the whole decode step (inductor) over a FrozenStep: the weights are the module's
        parameters, frozen into the graph as constants, so inductor packs each one once for its own
        GEMM kernels (AMX/AVX-512 micro-kernels on CPU, timed against ATen's where compile_options
        leaves that choice: max_autotune) and fuses the small ops around them. `warm_up` compiles.

        `store` (a directory; CPU): ahead of time, into a package kept there and loaded by the next
        start in seconds (dsr1.serve.aotstep; one dynamic graph for every batch and span). Without
        it (and on a GPU) just in time with torch.compile: batch rows and span dynamic, one row a
        variant of its own, compiled again at every start."""
        from dsr1.serve import aotstep

        if self.quant not in (None, "int4"):
            raise ValueError(f"the decode step is not compiled over {self.quant} weights")
        if isinstance(self.head, QuantWeight):
            # int4's head is int8 (_pack_rest) for fbgemm, whose opaque packing inductor cannot trace: the
            # same integers and scales as plain tensors, for eager and compiled alike (one copy, never packed)
            self.head = self.head.frozen()
            if self._shared is not None:
                self._shared[2] = self.head
        self._frozen = FrozenStep(self)
        self._options = compile_options(self.embed.dtype, self.device)  # for every compile of this step
        self._store = store if store is not None and aotstep.supported(self.device) else None
        self._aot = self._aot_one = self._aot_head = None
        self.compile_how = "compiled"  # or "loaded" (a package from the store)
        self.not_kept = aotstep.room_for(self._frozen, store) if self._store is not None else None
        if self.not_kept:  # no disk for the package: compiled just in time, as on a GPU
            self._store = None
        if self._store is None:
            self._compiled_step = torch.compile(self._frozen)
        self.compiled = True

    @torch.inference_mode()
    def warm_up(self, cache, *, batches: tuple[int, ...] = (2, 1), progress=lambda m: None) -> float:
        """Compile now, not on a user's request: load or build the ahead-of-time package, or run the
        just-in-time step once per variant (writing only position 0 of rows it uses, which hold no
        request yet)."""
        t0 = time.perf_counter()
        if self._store is not None:
            from dsr1.serve import aotstep

            self._aot, self.compile_how, self.package = aotstep.load_or_build(
                self._frozen, cache, self._store, self._options, progress)
            if self.quant == "int4":
                # inductor's int4 template over a dynamic row count takes AMX tiles, slower than the eager
                # kernel at one row (1.5B shape: 117 vs 86 ms per step); with one row known at compile time
                # it takes its AVX-512 micro-kernel (the probe's static one-row step: 62 ms). measure_rows
                # then times this one at one row like the rest.
                self._aot_one, how, _ = aotstep.load_or_build(self._frozen, cache, self._store, self._options,
                                                              progress, one_row=True, sibling=self._aot)
                if how == "compiled":
                    self.compile_how = "compiled"
                if isinstance(self.head, Frozen) and self.head.method == "int8":
                    # the eager forward's logits (the row counts measure_rows leaves eager) through the head
                    # the dynamic library holds, not the kept [N, K] one beside it: one head resident
                    self._aot_head, how, _ = aotstep.load_or_build_head(self.head, self.package, self._options,
                                                                        self._aot, progress)
                    if how == "compiled":
                        self.compile_how = "compiled"
            if self.compile_how == "compiled":
                self._drop_table()
            self.compile_seconds = time.perf_counter() - t0
            return self.compile_seconds
        for n in batches:
            if n > cache.slots:
                continue
            progress(f"compiling the decode step (batch {'2 or more' if n > 1 else 1})")
            self._run_compiled(torch.zeros(n, 1, dtype=torch.long, device=self.device),
                               torch.zeros(n, 1, dtype=torch.long, device=self.device),
                               torch.arange(2, device=self.device), cache)
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds

    @property
    def ahead_of_time(self) -> bool:
        """Whether the compiled step is a package (dsr1.serve.aotstep), not torch.compile's."""
        return self._aot is not None

    def _run_compiled(self, ids, pos, cols, cache, pick=None, first: int = 0,
                      adapters: list[int] | None = None) -> torch.Tensor:
        """The compiled step over rows first..first+n-1 of `cache` (ids/pos [n, t]): logits of the tokens
        `pick` selects (default: every token, row-major), [len(pick), vocab]. `adapters`: each row's LoRA
        adapter id (None: the base model), for a package compiled with the adapters (`lora_compiled`)."""
        if pick is None:
            pick = torch.arange(ids.numel(), device=ids.device)
        if adapters and any(adapters) and not self.lora_compiled:
            raise ValueError("this compiled step was not compiled with the LoRA adapters")
        ks, vs = cache.k, cache.v
        if first:  # the step's rows are 0..n-1: hand it the cache from row `first` on (views, no copy)
            ks, vs = [k[first:] for k in ks], [v[first:] for v in vs]
        if self._aot is not None:
            if cols.shape[0] < 2:  # below the package's smallest span (no decode step attends to one column)
                return self._step(ids, pos, cols, ks, vs, self._masks(adapters), pick=pick)
            one = self._aot_one is not None and ids.shape == (1, 1) and pick.shape[0] == 1
            args = (ids, pos, cols, ks, vs, self.cos, self.sin, pick)
            if self.lora_compiled:  # every row's adapter id, 0 for the base model's rows
                args += (torch.tensor(adapters or [0] * ids.shape[0], dtype=torch.long, device=ids.device),)
            return (self._aot_one if one else self._aot)(*args)
        if ids.shape[0] > 1:  # rows and span vary from step to step: one graph for all of them
            for t, dim in ((ids, 0), (pos, 0), (cols, 0), (pick, 0)):
                torch._dynamo.mark_dynamic(t, dim)
        # The options as a config patch around every call, not torch.compile(options=): freezing
        # given that way was silently not applied (the weights stayed graph inputs, and the step
        # 1.6x slower). Around every call, so a recompile gets them too.
        with compiling(self._options, self.device):
            return self._compiled_step(ids, pos, cols, ks, vs, pick)

    @property
    def lora_compiled(self) -> bool:
        """Whether the package was compiled with this model's LoRA adapters (their weights frozen into it,
        each row's adapter id an input), so that rows with an adapter take it too. Only ahead of time:
        the step compiled just in time (a GPU, or no disk for the package) runs adapted rows eagerly."""
        return self._aot is not None and bool(self.lora_owner)

    def _prompts_compiled(self, masks) -> bool:
        """Whether prompts go through the compiled package: one was loaded (its token axis is dynamic,
        so a prompt is one call of it, fused and on its packed weights), it holds the LoRA adapters of
        any row that uses one, and it was the faster for a prompt on this CPU (measure_rows)."""
        return self._aot is not None and (masks is None or self.lora_compiled) and self.prompt_compiled

    # -- what the engine calls -----------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, cache, tokens: list[int], positions: list[int], adapters: list[int] | None = None) -> torch.Tensor:
        """One token for each of rows 0..n-1; row i's token sits at positions[i]. Logits [n, vocab].
        `adapters`: row i's LoRA adapter id (0: the base model)."""
        dev = self.device
        ids = torch.tensor(tokens, device=dev).view(-1, 1)
        pos = torch.tensor(positions, device=dev).view(-1, 1)
        cols = torch.arange(max(positions) + 1, device=dev)
        masks = self._masks(adapters)
        if (masks is None or self.lora_compiled) and self.takes_compiled(len(tokens)):
            return self._run_compiled(ids, pos, cols, cache, adapters=adapters)
        return self._step(ids, pos, cols, cache.k, cache.v, masks)[:, 0]

    @torch.inference_mode()
    def measure_rows(self, cache, *, sizes: tuple[int, ...] = MEASURED_ROWS, repeats: int = 3,
                     saved=None) -> int:
        """Time the compiled step against the eager one at every batch size of `sizes` up to the cache's rows
        on this CPU; each batch then takes the faster (`takes_compiled`: as the smallest measured size at
        least as large went; `compiled_rows`, the largest compiled, 0: none). Why every size: on a 2-core
        AVX-512 CPU without AMX the compiled bf16 step was 3.2x faster at one row and 0.69x at sixteen (issue
        14/14), and int4's the other way round at first (inductor's int4 template over a dynamic row count
        takes AMX tiles: slower than the eager kernel at two to four rows, 3.1x faster at sixteen) with its
        one-row step (aotstep, one_row) winning at one row again: the CPU, the weights and the batch
        decide. `saved` (a JSON file beside the
        package): timings of an earlier start are read from it, or written to it. Writes only position 0
        of the rows it uses, which hold no request yet (run at start-up). With a package, a prompt is timed
        through it and eagerly too, and goes the faster way (`prompt_compiled`)."""
        import json

        from dsr1.fsutil import atomic_write_bytes

        known = saved_timings(saved)
        prompt = kept_prompt = saved_prompt_timing(saved)
        if self._aot is not None and prompt is None:
            prompt = self._time_prompt(cache, repeats)
        if covers(known, cache.slots, sizes):
            self.row_timings = known
        else:  # never measured, or only for fewer rows than this cache has
            self.row_timings = {}
            dev = self.device
            for n in sizes:
                if n > cache.slots:
                    break
                ids = torch.zeros(n, 1, dtype=torch.long, device=dev)
                pos = torch.zeros(n, 1, dtype=torch.long, device=dev)
                cols = torch.arange(2, device=dev)
                # with adapters in the package, rows spread over them: an adapted row costs the eager
                # forward its LoRA matmuls, the package the same whatever the mix
                adapters = [i % len(self._lora_src) + 1 for i in range(n)] if self.lora_compiled else None
                masks = self._masks(adapters)
                compiled = fastest(lambda: self._run_compiled(ids, pos, cols, cache, adapters=adapters), repeats)
                eager = fastest(lambda: self._step(ids, pos, cols, cache.k, cache.v, masks), repeats)
                self.row_timings[n] = (compiled, eager)
        if saved is not None and (self.row_timings != known or prompt != kept_prompt):
            kept = {str(n): t for n, t in self.row_timings.items()}
            if prompt is not None:
                kept[PROMPT_KEY] = prompt
            atomic_write_bytes(saved, json.dumps(kept).encode())
        self.prompt_timing = prompt
        self.prompt_compiled = prompt is not None and not loses(*prompt)
        self._slots = cache.slots
        self.compiled_rows = rows_for(self.row_timings, cache.slots)
        return self.compiled_rows

    def takes_compiled(self, n: int) -> bool:
        """Whether a batch of n rows runs the compiled step (measure_rows; `compiled_rows` bounds it, and tests
        set it to force one way)."""
        return self.compiled and n <= self.compiled_rows and compiled_at(self.row_timings, n, self._slots)

    def _time_prompt(self, cache, repeats: int) -> tuple[float, float]:
        """(compiled, eager) seconds for one PROMPT_TOKENS-token prompt into row 0 (which holds no request
        yet: run at start-up), the package against the eager prompt forward. Why measured: the package's
        GEMMs were chosen by timing them at a few rows; on a 2-core Xeon with AMX it prefilled 8 x 256
        tokens 2.3x faster than the eager forward, but a CPU where its kernels lose may differ."""
        tokens = [0] * min(PROMPT_TOKENS, self.max_len - 1)
        compiled = fastest(lambda: self._prefill_compiled(cache, 0, tokens, 0), repeats)
        eager = fastest(lambda: self._prefill_eager(cache, 0, tokens, 0, None), repeats)
        return compiled, eager

    def decodes_eager(self, cache, saved, sizes: tuple[int, ...] = MEASURED_ROWS) -> bool:
        """Whether some batch size of `cache` will decode eagerly, by the timings saved beside the package
        (True when they do not answer yet: measure_rows times the eager step as it will run). When none
        will, the eager weights serve prompts only, where packing them gains little (64 rows: 8.5 vs
        9.0 ms per matrix, dsr1.serve.wquant) and costs 1.4-2.3 s of a 1.5B model's restart."""
        known = saved_timings(saved)
        return not covers(known, cache.slots, sizes) or bool(compiled_ranges(known, cache.slots)[1])

    @torch.inference_mode()
    def verify(self, cache, rows: list[list[int]], starts: list[int], adapters: list[int] | None = None) -> torch.Tensor:
        """Row i appends rows[i] (its last token and its draft) at starts[i]..; logits [n, t, vocab].
        Shorter rows are padded by repeating their last token one position further each time; the
        padded K/V land past the row's end, where nothing reads them before they are overwritten."""
        dev = self.device
        t = max(len(r) for r in rows)
        ids = [r + [r[-1]] * (t - len(r)) for r in rows]
        pos = [[min(s + j, self.max_len - 1) for j in range(t)] for s in starts]
        span = min(self.max_len, max(p[-1] for p in pos) + 1)
        return self._step(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev),
                          torch.arange(span, device=dev), cache.k, cache.v, self._masks(adapters))

    @torch.inference_mode()
    def prefill(self, cache, slot: int, tokens: list[int], start: int, adapter: int = 0) -> torch.Tensor:
        """Append `tokens` to row `slot` after `start` cached positions; logits of the last one.
        Eager: a prompt chunk is a few large matmuls, where Python overhead does not matter."""
        masks = self._masks([adapter])
        if self._prompts_compiled(masks):
            return self._prefill_compiled(cache, slot, tokens, start, adapter)
        return self._prefill_eager(cache, slot, tokens, start, masks)

    def _prefill_compiled(self, cache, slot: int, tokens: list[int], start: int, adapter: int = 0) -> torch.Tensor:
        """`prefill` as one call of the package."""
        dev = self.device
        c, end = len(tokens), start + len(tokens)
        ids = torch.tensor([tokens], device=dev)
        pos = torch.arange(start, end, device=dev).view(1, c)
        # at least two columns, the package's smallest span; a column past the end is masked
        cols = torch.arange(max(2, end), device=dev)
        return self._run_compiled(ids, pos, cols, cache, torch.tensor([c - 1], device=dev), first=slot,
                                  adapters=[adapter])[0]

    def _prefill_eager(self, cache, slot: int, tokens: list[int], start: int, masks) -> torch.Tensor:
        """`prefill` through the eager forward (`masks`: the row's LoRA adapter, or None)."""
        dev = self.device
        c, end = len(tokens), start + len(tokens)
        x = self.embed[torch.tensor(tokens, device=dev)].view(1, c, -1)
        cos = self.cos[start:end].view(1, 1, c, -1)
        sin = self.sin[start:end].view(1, 1, c, -1)
        cols = torch.arange(end, device=dev)
        mask = (cols[None, :] <= torch.arange(start, end, device=dev)[:, None]).view(1, 1, c, end)

        def kv(li, k, v):
            ck, cv = cache.k[li], cache.v[li]
            ck[slot, :, start:end] = k[0]
            cv[slot, :, start:end] = v[0]
            return ck[slot : slot + 1, :, :end], cv[slot : slot + 1, :, :end]

        x = self._prompt_layers(x, cos, sin, kv, mask, 1, c, masks)
        return self.logits(x[0, -1])

    @torch.inference_mode()
    def prefill_rows(self, cache, first: int, prompts: list[list[int]], adapters: list[int] | None = None) -> torch.Tensor:
        """Whole prompts into rows first.. in one forward (right-padded); logits of each last token."""
        dev = self.device
        n, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        ids = ids.to(dev)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        masks = self._masks(adapters)
        if self._prompts_compiled(masks):
            # Every row at positions 0..L-1: a shorter prompt's padding writes K/V past its end, where
            # nothing reads them before its own tokens overwrite them, and no real token attends there.
            pos = torch.arange(L, device=dev).repeat(n, 1)
            pick = torch.arange(n, device=dev) * L + lens - 1
            return self._run_compiled(ids, pos, torch.arange(max(2, L), device=dev), cache, pick, first=first,
                                      adapters=adapters)
        cols = torch.arange(L, device=dev)
        # causal, and never a padded key; padded queries still see column 0 (no all-masked rows)
        mask = ((cols[None, None, :] <= cols[None, :, None]) & (cols[None, None, :] < lens[:, None, None]))[:, None]
        cos = self.cos[:L].view(1, 1, L, -1)
        sin = self.sin[:L].view(1, 1, L, -1)
        a, b = first, first + n

        def kv(li, k, v):
            ck, cv = cache.k[li], cache.v[li]
            ck[a:b, :, :L] = k
            cv[a:b, :, :L] = v
            return ck[a:b, :, :L], cv[a:b, :, :L]

        x = self._prompt_layers(self.embed[ids], cos, sin, kv, mask, n, L, masks)
        return self.logits(x[torch.arange(n, device=dev), lens - 1])

    def _prompt_layers(self, x, cos, sin, kv, mask, n: int, t: int, groups=None):
        for li, (ln1, wqkv, bqkv, wo, bo, ln2, wgu, wd) in enumerate(self.layers):
            lora = self._layer_lora(li, groups)
            h = self._norm(x, ln1)
            qkv = linear(h, wqkv, bqkv, True)
            if lora:
                qkv = self._lora(qkv, h, lora, "qkv")
            q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), -1)
            q = self._rope(q.view(n, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)
            k = self._rope(k.view(n, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            v = v.view(n, t, self.kv_heads, self.head_dim).transpose(1, 2)
            K, V = kv(li, k, v)
            o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=self.scale,
                                               enable_gqa=self.group > 1)
            x = self._mlp(x + self._out(o.transpose(1, 2).reshape(n, t, self.q_size), wo, bo, lora), ln2, wgu, wd,
                          lora)
        return x


def _saved(saved) -> dict:
    import json

    if saved is None or not saved.is_file():
        return {}
    return json.loads(saved.read_text())


def saved_timings(saved) -> dict[int, tuple[float, float]]:
    """The batch-size timings measure_rows kept in `saved` (a JSON file; None or absent: none)."""
    return {int(n): tuple(t) for n, t in _saved(saved).items() if n.isdigit()}


def saved_prompt_timing(saved) -> tuple[float, float] | None:
    """The (compiled, eager) prompt timing measure_rows kept in `saved`, or None."""
    t = _saved(saved).get(PROMPT_KEY)
    return tuple(t) if t else None


def loses(compiled: float, eager: float) -> bool:
    """Whether the compiled step measured slower than eager by more than TIE. Within it the package is
    kept: it lets the eager copy of the weights go (release_eager; 3.1 GB of the 1.5B shape's restart),
    and differences that small flip between first starts (the 1.5B shape at 8 rows: 218 vs 212 ms per
    step in one, compiled ahead in another; its prompt likewise)."""
    return compiled > eager * TIE


def compiled_at(timings: dict[int, tuple[float, float]], n: int, slots: int) -> bool:
    """Whether a batch of n rows takes the compiled step, by (compiled, eager) seconds per measured batch
    size: as the smallest measured size of at least n rows went (past the largest, as the largest), of
    the sizes a cache of `slots` rows has. No timings: compiled."""
    sizes = sorted(m for m in timings if m <= slots) or sorted(timings)
    if not sizes:
        return True
    return not loses(*timings[next((m for m in sizes if m >= n), sizes[-1])])


def rows_for(timings: dict[int, tuple[float, float]], slots: int) -> int:
    """The largest batch of a `slots`-row cache that takes the compiled step (0: none does)."""
    return max((n for n in range(1, slots + 1) if compiled_at(timings, n, slots)), default=0)


def compiled_ranges(timings: dict[int, tuple[float, float]], slots: int) -> tuple[list[str], list[str]]:
    """The batch sizes 1..slots as ranges ("1", "5-16"): those that take the compiled step, those eager."""
    out: tuple[list[str], list[str]] = ([], [])
    n = 1
    while n <= slots:
        way = compiled_at(timings, n, slots)
        m = n
        while m < slots and compiled_at(timings, m + 1, slots) == way:
            m += 1
        out[0 if way else 1].append(str(n) if m == n else f"{n}-{m}")
        n = m + 1
    return out


def covers(timings: dict[int, tuple[float, float]], slots: int, sizes: tuple[int, ...]) -> bool:
    """Whether timings of an earlier start answer for a cache of `slots` rows: every size up to this
    cache's was measured (the compiled step may lose at some size and win again at a larger one: int4's
    one-row step, then its AMX template from a few rows on)."""
    wanted = [n for n in sizes if n <= slots]
    return bool(timings) and max(timings) >= max(wanted, default=1)


def fastest(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of `fn`, in seconds, after one untimed call."""
    fn()  # first call: caches, lazily initialised kernels
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# Inductor options for the compiled step. freezing: weights are constants (packed once);
# max_autotune with the CPP backend: inductor's own GEMM micro-kernels are timed against ATen's
# (oneDNN) per shape at compile time and the faster one is kept. autotune_num_choices_displayed 0:
# inductor writes each GEMM's timing table straight to stderr (sys.stderr.write, not logging), which put
# dozens of "AUTOTUNE mm(...)" lines on the server's console; its own debug logs still have them.
# max_autotune_report_choices_stats off: the same for its "Autotune Choices Stats" JSON lines.
COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                   "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


@contextlib.contextmanager
def compiling(options: dict, device: torch.device):
    """Around every compile of the step (just in time here, ahead of time in aotstep, the probe in
    compileprobe): inductor's options, and on a CPU dsr1's edits of inductor's int4 kernels (dsr1.serve.kernel_edits;
    they turn inductor's graph cache off, which a GPU's compile keeps)."""
    import torch._inductor.config as inductor_config

    from dsr1.serve import kernel_edits

    with inductor_config.patch(options), (kernel_edits.patched() if device.type == "cpu" else contextlib.nullcontext()):
        yield


def compile_options(dtype: torch.dtype, device: torch.device) -> dict:
    """COMPILE_OPTIONS for a step in `dtype` on `device`. bf16 on a CPU with AMX: inductor's AMX
    micro-kernels only, not timed against oneDNN's linear. Why (1.5B shape, 2-core Xeon with AMX,
    torch 2.13): the two tie at a few rows, so autotune picked oneDNN for a GEMM in some builds and not in
    others, and where it did the step's prompts ran 14% slower (468 vs 404 ms for 256 tokens; the choice
    was timed at the export's 4 tokens) and oneDNN's opaque packed weight kept every constant inside the
    library (aotstep._compile), compiled twice and held twice at a restart; decode within 3% either way.
    Elsewhere oneDNN can win by more (not measured without AMX), so it stays a choice there: also where the
    CPU has AMX but this process was refused it (inductor then has no AMX kernel to pick)."""
    from dsr1.serve.aotstep import amx_usable

    if dtype == torch.bfloat16 and device.type == "cpu" and amx_usable():
        return {**COMPILE_OPTIONS, "max_autotune_gemm_backends": "CPP"}
    return COMPILE_OPTIONS


_NAMES = ("ln1", "wqkv", "bqkv", "wo", "bo", "ln2", "wgu", "wd")


def _parts(w) -> list[tuple[int | None, int]]:
    """(storage address, bytes) of what a weight is made of: itself, or a weight-only one's integers and
    scales. oneDNN's packed bf16 (PACKED) and fbgemm's packed int8 are opaque (their storage cannot be
    asked for, and the package never reads them): no address, counted by their own size."""
    if isinstance(w, torch.Tensor):
        return [(w.untyped_storage().data_ptr(), w.nbytes)]
    if isinstance(w, QuantWeight) and (w.method == PACKED or w.group == "fbgemm"):
        return [(None, w.nbytes)]
    return [(t.untyped_storage().data_ptr(), t.nbytes) for t in (w.q, w.scales) if isinstance(t, torch.Tensor)]


class FrozenStep(torch.nn.Module):
    """FastForward's decode step as a module whose weights are its parameters (the same tensors, not
    copies), which is what torch.compile's freezing turns into constants (buffers stay inputs)."""

    def __init__(self, ff: FastForward):
        super().__init__()
        self._ff = [ff]  # in a list: a plain attribute, not something dynamo should treat as state
        self._n = len(ff.layers)
        self._quant: dict[str, tuple[str, int | None]] = {}  # weight-only weights: name -> (method, group)
        for i, weights in enumerate(ff.layers):
            for name, t in zip(_NAMES, weights):
                if t is not None:
                    self._add(f"{name}_{i}", t)
        for name in ("embed", "cos", "sin", "norm_w", "head"):
            self._add(name, getattr(ff, name))
        # LoRA adapters (FastForward._stack's stacked A/B and column owners): frozen into an ahead-of-time
        # package like the weights, each row's adapter id its input (aotstep._Bounded)
        self.lora_sites = tuple(ff.lora_owner)
        for site in self.lora_sites:
            self._add(f"lora_{site}_owner", ff.lora_owner[site])
            for i, w in enumerate(ff.lora_w):
                self._add(f"lora_{site}_a_{i}", w[site][0])
                self._add(f"lora_{site}_b_{i}", w[site][1])

    def lora_masks(self, adapters: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each row's columns of the stacked adapters (`adapters`: row -> adapter id, 0 none)."""
        return lora_masks(self.lora_owner, adapters, self.embed.dtype)

    @property
    def lora_owner(self) -> dict[str, torch.Tensor]:
        return {site: getattr(self, f"lora_{site}_owner") for site in self.lora_sites}

    @property
    def lora_w(self) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        return [{site: (getattr(self, f"lora_{site}_a_{i}"), getattr(self, f"lora_{site}_b_{i}"))
                 for site in self.lora_sites} for i in range(self._n)]

    def _add(self, name: str, t) -> None:
        """A weight as parameters (what freezing makes constants): a tensor as `name`; a weight-only one's
        integers as `name` and its scales as `name`_s (the same tensors as the eager forward's)."""
        if isinstance(t, QuantWeight):
            t = t.frozen()
        if isinstance(t, Frozen):
            self._quant[name] = (t.method, t.group)
            self.register_parameter(f"{name}_s", torch.nn.Parameter(t.scales, requires_grad=False))
            t = t.q
        self.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))

    def _get(self, name: str):
        t = getattr(self, name, None)
        kind = self._quant.get(name)
        return t if kind is None else Frozen(kind[0], t, getattr(self, f"{name}_s"), kind[1])

    @property
    def layers(self) -> list[tuple]:
        return [tuple(self._get(f"{name}_{i}") for name in _NAMES) for i in range(self._n)]

    @property
    def head_weight(self):
        """The LM head as `_step` reads it (a Frozen for a weight-only head)."""
        return self._get("head")

    def forward(self, tokens, pos, cols, ks, vs, pick=None):
        return self._ff[0]._step(tokens, pos, cols, ks, vs, src=self, pick=pick)
