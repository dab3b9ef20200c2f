"""Weight-only int8 and int4 for the embedded engine's fast path on CPU.

Why low-bit weights: a decode step at a few rows is bound by reading the weights (a 7B distill
in bf16 reads ~15 GB per token), so storing them in 8 or 4 bits cuts what each step reads 2x or
~3.5x.

The kernels are PyTorch's own CPU operators, chosen by measuring (2-core AMD EPYC, AVX-512 VNNI,
no AMX; eight distinct [17920, 1536] matrices in turn, so nothing sits in cache; ms per matrix at
1 / 4 / 16 rows):

    bf16 F.linear                                   2.85 / 2.87 / 4.20
    int8 fbgemm dynamic (quantized.linear_dynamic)  0.95 / 1.18 / 1.59   <- int8
    int8 _weight_int8pack_mm (weight-only)          1.65 / 2.23 / 8.33
    int4 _weight_int4pack_mm_for_cpu (groups of 32) 0.79 / 1.52 / 5.57   <- int4

- int8 runs fbgemm's dynamic linear: the weight per output channel in int8, prepacked once; each
  call quantizes the activations to 8 bits and multiplies in integers (VNNI), so it stays fast at
  16 rows where the weight-only kernel, which widens every weight to floating point per row, is
  2x slower than bf16. fbgemm takes one activation scale per call; to keep a row's result
  independent of the rows batched with it, each row is divided by its own largest magnitude first
  (and multiplied back after), with one extra row holding +1 and -1 so the range is always [-1, 1].
  On the demo model's real weights the NLL of pull's fixed text moved 2.7355 -> 2.7095 (target +1%).
  Where fbgemm is not PyTorch's quantized engine (ARM), `_weight_int8pack_mm` is used instead.
- int4 runs `_weight_int4pack_mm_for_cpu` over a weight packed by `_convert_weight_to_int4pack_for_cpu`:
  groups of 32 input columns, each with a scale and offset in the compute dtype. It wins at 1-4
  rows and loses to bf16 at 16 (no integer path: it widens per row). With the compiled step (`Frozen`)
  inductor's own int4 GEMM template takes the same integers: it widens each weight tile once for every
  row of the call (AMX), 2.6x faster at 16 rows and 11x at 256, slower at a row or two, so the
  batch size picks (fastpath.measure_rows). Without AMX (AVX-512 VNNI), int4 runs dsr1's own int4 x int8
  kernel instead (int4vnni: activations quantized to int8 per row and group of 32, integer dot products), in
  its own layout (group VNNI), eager at every batch size: 2-core AMD EPYC, same matrices, 0.50 / 0.64 / 2.01 ms
  at 1 / 4 / 16 rows against PyTorch's 0.79 / 1.38 / 5.44 (benchmarks/int4_gemm.py --vnni).
- "packed" is not quantization: the bf16 weight reordered once into oneDNN's blocked layout
  (`mkldnn._reorder_linear_weight`, what inductor's freezing does for a compiled linear) and run by
  `mkldnn._linear_pointwise`: 2.09 / 2.22 / 1.85 / 2.93 ms at 1 / 2 / 4 / 16 rows where the plain
  layout took 2.9 / 2.6 / 2.7 / 3.7, and no slower on prompt chunks (64 rows: 8.5 vs 9.0 ms). Used
  for bf16 on a CPU when the step is not compiled (FastForward.pack), replacing the plain weights.
torchao 0.18 (the release that imports beside torch 2.13) was measured first: its CPU int4 layout
is gone ("Unsupported int4 packing format: opaque") and its int8 weight-only tensor dequantizes the
whole weight per call (7x slower than bf16 at one row), so dsr1 calls the operators directly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from dsr1.serve import int4vnni

METHODS = ("int8", "int4")
PACKED = "packed"  # bf16 in oneDNN's blocked layout (not a user-facing precision)
VNNI = "vnni"  # int4's group marker for dsr1's int4 x int8 kernel's layout (int4vnni; groups of 32 too)
# int4: input columns per scale/offset pair. 32, as llama.cpp's 4-bit blocks: on the demo model's real
# weights the NLL of pull's fixed text rose 13% with groups of 64/128 (outlier columns) and 0.07% with 32.
GROUPS = (32,)


@functools.lru_cache(maxsize=None)
def _fbgemm() -> tuple[bool, bool]:
    """(whether int8 runs fbgemm's dynamic linear, whether it needs 7-bit activations). fbgemm is
    PyTorch's quantized engine on x86; without VNNI its u8*s8 pair sums can saturate int16, which
    7-bit activations (reduce_range) avoid."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return False, True
    try:
        from dsr1.probe.host import cpu_info

        flags = set(cpu_info()[1])
    except Exception:  # noqa: BLE001 - no /proc/cpuinfo: assume the safe, 7-bit activations
        flags = set()
    return True, not ({"avx512_vnni", "avx_vnni"} & flags)


class QuantWeight:
    """A [out, in] weight stored in `method`; `mm(x)` is x @ w.T for rows x [m, in].

    fbgemm's int8 is packed when first needed (`pack`), from its integers and scales (`plain`), because
    packing is slow and not every weight needs it: on R1-Distill-Qwen-1.5B's int8 LM head (2-core Xeon)
    packing took 2.1 s and unpacking it again 1.8 s, and with the compiled step the head is read as
    plain int8 tensors only (`frozen`). `lazy=False` packs at once (the projections of `--precision
    int8`, which every eager step reads)."""

    __slots__ = ("method", "shape", "q", "scales", "dtype", "group", "plain")  # group: int4's, or "fbgemm" for int8

    def __init__(self, w: torch.Tensor, method: str, lazy: bool = False):
        if method not in METHODS + (PACKED,):
            raise ValueError(f"unknown weight-only method {method!r}")
        if w.device.type != "cpu":
            raise ValueError("weight-only int8/int4 runs on the CPU")
        # activations, scales and the result in the model's compute dtype (bf16, or fp32 on a CPU without
        # bf16 units: both kernels take either)
        self.method, self.shape, self.dtype = method, tuple(w.shape), w.dtype
        self.plain = None  # fbgemm's int8 not packed yet: (integers, fp32 scales)
        if method == PACKED:
            if w.dtype != torch.bfloat16:
                raise ValueError("packing is for bf16 weights")
            self.q, self.scales, self.group = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 1), None, None
            return
        wf = w.detach().float()
        n, k = wf.shape
        if method == "int8":
            # symmetric per output channel: w ~= q * s, q in [-127, 127]
            s = (wf.abs().amax(1) / 127).clamp(min=1e-12)
            if _fbgemm()[0]:
                import warnings

                with warnings.catch_warnings():  # quantize_per_channel: "deprecated" in 2.13, the one way in
                    warnings.simplefilter("ignore")
                    qw = torch.quantize_per_channel(wf, s.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
                self.q, self.plain = None, (qw.int_repr(), s)
                del qw
                self.scales = s  # kept for nbytes: the packed weight carries its own
                self.group = "fbgemm"
                if not lazy:
                    self.pack()
            else:
                self.q = torch.round(wf / s[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
                self.scales = s.to(self.dtype)
                self.group = None
        else:
            group = next((g for g in GROUPS if k % g == 0), None)
            if group is None:
                raise ValueError(f"int4 needs the input size ({k}) to be a multiple of {GROUPS[-1]}")
            self.group = group
            q, s, lo = int4_groups(wf, group)
            if int4_layout() == VNNI and int4vnni.fits(n, k):
                # dsr1's int4 x int8 kernel (int4vnni), in its own layout: without AMX it is 1.5x PyTorch's
                # int4 kernel at one row and 2.7x at sixteen (benchmarks/int4_gemm.py --vnni)
                self.group = VNNI
                self.q, self.scales = int4vnni.pack(q, s, lo)
                return
            self.q, self.scales = _int4pack(q, s, lo, self.dtype)

    def parts(self) -> dict:
        """These bits as plain tensors and facts, for keeping on disk (dsr1.serve.wstore); `from_parts` is
        the inverse. fbgemm's packed int8 is opaque: its integers and per-channel scales (exact), packed
        again at load."""
        if self.method == PACKED:
            raise ValueError("oneDNN-packed weights are not kept: they are reordered from bf16 at every start")
        q, scales = self.q, self.scales
        if self.group == "fbgemm":
            q, scales = self.plain if self.plain is not None else self._unpack()
        return {"method": self.method, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "group": self.group, "q": q, "scales": scales}

    @classmethod
    def from_parts(cls, d: dict, lazy: bool = False) -> "QuantWeight":
        """The weight `parts` described; its tensors are used as they are (mapped from the file by the
        caller), except fbgemm's int8, which is packed again (a copy in fbgemm's layout; when first
        needed with `lazy`)."""
        self = cls.__new__(cls)
        self.method, self.shape, self.group = d["method"], tuple(d["shape"]), d["group"]
        self.dtype = getattr(torch, d["dtype"])
        self.q, self.scales, self.plain = d["q"], d["scales"], None
        if self.group == "fbgemm":
            if not _fbgemm()[0]:
                raise ValueError("these int8 weights were packed for fbgemm, which this PyTorch does not run")
            self.q, self.plain = None, (d["q"], d["scales"])
            if not lazy:
                self.pack()
        return self

    def pack(self) -> None:
        """fbgemm's int8: packed now (a no-op when it is, or for other methods); the plain copy goes."""
        if self.plain is None:
            return
        q, s = self.plain
        import warnings

        with warnings.catch_warnings():  # "quantized tensor creation ... deprecated" in 2.13, the one way in
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(self.shape[0], dtype=torch.long), 0)
        self.q, self.plain = torch.ops.quantized.linear_prepack(qw, None), None

    def _unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        qw, _ = torch.ops.quantized.linear_unpack(self.q)
        return qw.int_repr().contiguous(), qw.q_per_channel_scales().float()

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == PACKED:
            return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.q, None, "none", [], "")
        if self.group == "fbgemm":
            self.pack()
            lead = x.shape[:-1]
            xf = x.reshape(-1, self.shape[1]).float()
            peak = xf.abs().amax(1, keepdim=True).clamp(min=1e-30)
            # each row scaled to [-1, 1] and one row spanning it: the activation scale fbgemm picks
            # for the whole call is then the same whatever rows share it (batch-independent output)
            span = torch.zeros(1, xf.shape[1])
            span[0, 0], span[0, 1] = 1.0, -1.0
            y = torch.ops.quantized.linear_dynamic(torch.cat([xf / peak, span]), self.q, _fbgemm()[1])
            return (y[:-1] * peak).to(self.dtype).reshape(*lead, self.shape[0])
        x = x.to(self.dtype)
        if self.method == "int8":
            return torch._weight_int8pack_mm(x, self.q, self.scales)
        if self.group == VNNI:
            return int4vnni.mm(x, self.q, self.scales)
        return torch._weight_int4pack_mm_for_cpu(x, self.q, self.group, self.scales)

    def frozen(self) -> "Frozen":
        """These bits as plain tensors a compiled step can hold as constants (fastpath.FrozenStep). int4: the
        same tensors. int8: fbgemm's packed weight is an opaque object inductor cannot trace, so it is
        unpacked into int8 values and per-channel scales (exact: the same integers and scales) for
        `_weight_int8pack_mm`, which inductor lowers to its own int8 GEMM template."""
        if self.method == PACKED:
            raise ValueError("oneDNN-packed weights are compiled from the plain bf16 weights, not these")
        if self.group == "fbgemm":
            q, s = self.plain if self.plain is not None else self._unpack()
            return Frozen("int8", q, s.to(self.dtype), None)
        if self.group == VNNI:
            # `--compile on` where int4 runs dsr1's kernel (opaque to inductor): the same integers, scales
            # and minima in PyTorch's int4 layout, replacing these (one copy; the eager forward beside the
            # compiled step reads them too)
            self.q, self.scales = _int4pack(*int4vnni.unpack(self.q, self.scales), self.dtype)
            self.group = GROUPS[0]
        return Frozen(self.method, self.q, self.scales, self.group)

    def dequantize(self) -> torch.Tensor:
        """The bf16 weight these bits stand for (tests; the quality check)."""
        eye = torch.eye(self.shape[1], dtype=self.dtype)
        return self.mm(eye).t().contiguous()

    @property
    def nbytes(self) -> int:
        if self.method == PACKED:
            return self.shape[0] * self.shape[1] * 2
        if self.group == "fbgemm":  # int8 weights + an fp32 scale per channel (fbgemm's packed copy: the same)
            return self.shape[0] * self.shape[1] + 4 * self.shape[0]
        return self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()


class Frozen(NamedTuple):
    """A weight-only int8/int4 weight as the compiled step reads it (QuantWeight.frozen): tensors only, so
    export and inductor see the operator and its constants; `frozen_mm` is its x @ w.T. Inductor lowers the
    int4 call to its own GEMM template (benchmarks/int4_gemm.py, 2-core Xeon with AMX, eight [17920, 1536]
    matrices in turn, ms per matrix eager / compiled: 1 row 1.16 / 1.30, 4: 1.61 / 1.53, 16: 5.97 / 2.33,
    256: 88.9 / 8.48): the eager kernel widens the weights again for every few rows, the template once per
    tile for all of them."""

    method: str  # "int8" or "int4"
    q: torch.Tensor
    scales: torch.Tensor
    group: int | None

    @property
    def shape(self) -> tuple[int, int]:
        n = self.q.shape[0] if self.method == "int8" else self.scales.shape[1]
        return n, self.q.shape[1] if self.method == "int8" else self.q.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes


def frozen_mm(w: Frozen, x: torch.Tensor) -> torch.Tensor:
    """x @ w.T for rows x [m, in], in the scales' dtype."""
    x = x.to(w.scales.dtype)
    if w.method == "int8":
        return torch._weight_int8pack_mm(x, w.q, w.scales)
    return torch._weight_int4pack_mm_for_cpu(x, w.q, w.group, w.scales)


def int4_groups(w: torch.Tensor, group: int = GROUPS[0]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dsr1's int4 quantization of a float weight [N, K]: per group of `group` input columns, q in 0..15 with a
    scale and the group's minimum, w ~= q * scale + minimum. (q int32 [N, K], scale [N, K/group], minimum
    [N, K/group]), fp32; each layout (`_int4pack`, int4vnni.pack) packs these."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    return q, s, lo


def _int4pack(q: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's int4 layout for `_weight_int4pack_mm_for_cpu` and inductor's int4 template: (packed integers,
    scales and offsets [groups, N, 2] in `dtype`) from q [N, K] in 0..15 and per-group scale and minimum."""
    # the kernel computes w = (q - 8) * scale + zero per group, so zero = lo + 8 * scale
    zero = lo + 8 * s
    return (torch._convert_weight_to_int4pack_for_cpu(q, 1),
            torch.stack([s, zero], -1).transpose(0, 1).contiguous().to(dtype))


def int4_layout() -> str:
    """How int4 weights are laid out on this machine: VNNI (dsr1's int4 x int8 kernel, int4vnni: AVX-512 VNNI
    without usable AMX) or "torch" (PyTorch's int4 kernel, and inductor's int4 template when compiled)."""
    return VNNI if int4vnni.available() else "torch"


def head_method(method: str, shape: tuple[int, int]) -> str:
    """How the LM head of a model in `method` is stored. int8 for int8 and int4 (llama.cpp's Q4_K_M keeps its
    head at 6 bits), except where int4 runs dsr1's VNNI kernel: there int4 too, because a one-row step reads the
    head more than any other weight (R1-Distill-Qwen-1.5B's: 233 MB in int8, 9 of a 46 ms step on a 2-core AMD
    EPYC) and the demo model's NLL of pull's fixed text moved +0.49% -> +0.84% of bf16 (the target: +7%). `shape`:
    the head's [vocab, hidden]; one the kernel does not take stays int8."""
    if method == PACKED:
        return PACKED
    vnni = method == "int4" and int4_layout() == VNNI and int4vnni.fits(*shape)
    return "int4" if vnni else "int8"


def quantize(w: torch.Tensor, method: str, lazy: bool = False) -> QuantWeight:
    return QuantWeight(w, method, lazy)


def can_pack() -> bool:
    """Whether bf16 weights can be packed for oneDNN here (PyTorch built with it, x86)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
