"""Weight-only int8 and int4 for the embedded engine's fast path on CPU.

Why weight-only: a decode step at a few rows is bound by reading the weights (a 7B distill in
bf16 reads ~15 GB per token), so storing them in 8 or 4 bits and widening on the fly inside the
matmul cuts what each step reads 2x or ~3.5x, with activations kept in bf16.

Why PyTorch's own kernels and not torchao: the CPU kernels are ATen operators in PyTorch
itself (`_weight_int8pack_mm`: per-output-channel int8; `_weight_int4pack_mm_for_cpu` over a
weight packed by `_convert_weight_to_int4pack_for_cpu`: groups of `group` (32) input columns, each
with a bf16 scale and offset). torchao's CPU layouts called these; torchao 0.18 (the release
that imports beside torch 2.13) removed its CPU int4 layout and its int8 weight-only tensor
dequantizes the whole weight per call (measured 7x slower than bf16 at one row on a 2-core
AMD EPYC), so dsr1 calls the operators directly.

Measured at one row on that CPU (gate|up of R1-Distill-Qwen-1.5B, [17920, 1536]): bf16 2.48 ms,
int8 1.18 ms, int4 0.71 ms; at 16 rows bf16 3.91, int8 7.32, int4 5.10: these kernels win while
decode is bound by memory and lose once it is bound by arithmetic (benchmarks/engines.py).
"""

from __future__ import annotations

import torch

METHODS = ("int8", "int4")
# int4: input columns per scale/offset pair. 32, as llama.cpp's 4-bit blocks: on the demo model's real
# weights the NLL of pull's fixed text rose 13% with groups of 64/128 (outlier columns) and 0.07% with 32.
GROUPS = (32,)


class QuantWeight:
    """A [out, in] weight stored in `method`; `mm(x)` is x @ w.T for rows x [m, in]."""

    __slots__ = ("method", "shape", "q", "scales", "dtype", "group")

    def __init__(self, w: torch.Tensor, method: str):
        if method not in METHODS:
            raise ValueError(f"unknown weight-only method {method!r}")
        if w.device.type != "cpu":
            raise ValueError("weight-only int8/int4 runs on the CPU")
        # activations, scales and the result in the model's compute dtype (bf16, or fp32 on a CPU without
        # bf16 units: both kernels take either)
        self.method, self.shape, self.dtype = method, tuple(w.shape), w.dtype
        wf = w.detach().float()
        n, k = wf.shape
        if method == "int8":
            # symmetric per output channel: w ~= q * s, q in [-127, 127]
            s = (wf.abs().amax(1) / 127).clamp(min=1e-12)
            self.q = torch.round(wf / s[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scales = s.to(self.dtype)
        else:
            group = next((g for g in GROUPS if k % g == 0), None)
            if group is None:
                raise ValueError(f"int4 needs the input size ({k}) to be a multiple of {GROUPS[-1]}")
            self.group = group
            g = wf.view(n, k // group, group)
            lo, hi = g.amin(-1), g.amax(-1)
            s = ((hi - lo) / 15).clamp(min=1e-12)
            q = torch.round((g - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
            # the kernel computes w = (q - 8) * scale + zero per group, so zero = lo + 8 * scale
            zero = lo + 8 * s
            self.q = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            self.scales = torch.stack([s, zero], -1).transpose(0, 1).contiguous().to(self.dtype)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.method == "int8":
            return torch._weight_int8pack_mm(x, self.q, self.scales)
        return torch._weight_int4pack_mm_for_cpu(x, self.q, self.group, self.scales)

    def dequantize(self) -> torch.Tensor:
        """The bf16 weight these bits stand for (tests; the quality check)."""
        eye = torch.eye(self.shape[1], dtype=self.dtype)
        return self.mm(eye).t().contiguous()

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()


def quantize(w: torch.Tensor, method: str) -> QuantWeight:
    return QuantWeight(w, method)
