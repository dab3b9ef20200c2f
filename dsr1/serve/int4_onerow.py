"""A faster one-row path for inductor's AVX-512 int4 micro-kernel, the kernel a compiled int4 step runs for
a single stream's decode (the one-row library on a CPU with AMX; every row count's tail without AMX).

Inductor's kernel (torch 2.13, `CppMicroGemmWoQInt4Avx512`) widens every weight to `lut[q] * scale +
offset` before multiplying it by the input: two fused multiply-adds per weight, and at one row nothing
shares that widening. On a 2-core Xeon with AMX one [17920, 1536] int4 matrix (the 1.5B shape's gate|up)
took 1.26-1.34 ms streamed from memory, 13 GB/s, where the CPU reads 22 GB/s. Here one row sums
`input * lut[q]` over each quantization group and applies the group's scale and offset once at its end
(scale * sum(a * q) + offset * sum(a): the same sum in another order, fp32 throughout), and prefetches
further ahead: 1.02-1.11 ms (16-17 GB/s; `benchmarks/int4_gemm.py --rows 1 --mats 64`). Two rows and
more keep inductor's code, which shares each widened weight between the rows. The int4 model's int8 LM
head prefetches further ahead too (_HEAD_PREFETCH). Behind the server, 1.5B shape at one user: ~62-66 ms
per token instead of 76-79 (docs/performance.md).

Applied as a patch of the template's text while dsr1 compiles (`patched`), never left in place: other
compiles in the process get inductor's own, and inductor's graph cache is off meanwhile (its key does
not see the text). The text is part of the compiled package's key
(dsr1.serve.aotstep), so a package built with or without it is never loaded by the other.
"""

from __future__ import annotations

import contextlib
import functools
import logging

log = logging.getLogger(__name__)

# Inserted before the kernel's first statement that reads C; everything it uses (lut, scale, zero,
# load_scale_and_zeros, PREFETCH_SIZE_K, the arguments) is declared above that point.
_MARKER = "  auto loadc = [&](auto i) {"

ONE_ROW = r"""
  // dsr1 one-row path (dsr1/serve/int4_onerow.py): per quantization group, sum a*lut[q] and apply the
  // group's scale and offset once at its end
  if constexpr (ROWS == 1 && COLS == 4) {
    __m512 acc[4];
    for (int i = 0; i < 4; i++) {
      if constexpr (accum) { acc[i] = _mm512_loadu_ps(C + i * 16); } else { acc[i] = _mm512_setzero_ps(); }
    }
    int kb = 0;
    for (int k = 0; k < K;) {
      c10::ForcedUnroll<COLS>{}(load_scale_and_zeros, kb++);
      const int kend = std::min<int64_t>(K, k + q_group_size - (k_start + k) % q_group_size);
      __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps(), t2 = _mm512_setzero_ps(), t3 = _mm512_setzero_ps();
      float asum = 0.f;
      for (; k < kend; ++k) {
        const float aa = static_cast<float>(A[k]);
        asum += aa;
        const __m512 va = _mm512_set1_ps(aa);
        const __m256i b4 = _mm256_loadu_si256((const __m256i*)(B + k * ldb));
        _mm_prefetch(B + (k + 512) * ldb, _MM_HINT_T0);
        const __m512i lo = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(b4));
        const __m512i hi = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(b4, 1));
        t0 = _mm512_fmadd_ps(va, _mm512_permutexvar_ps(lo, lut), t0);
        t2 = _mm512_fmadd_ps(va, _mm512_permutexvar_ps(_mm512_srli_epi32(lo, 4), lut), t2);
        t1 = _mm512_fmadd_ps(va, _mm512_permutexvar_ps(hi, lut), t1);
        t3 = _mm512_fmadd_ps(va, _mm512_permutexvar_ps(_mm512_srli_epi32(hi, 4), lut), t3);
      }
      const __m512 vs = _mm512_set1_ps(asum);
      acc[0] = _mm512_fmadd_ps(vs, zero[0], _mm512_fmadd_ps(t0, scale[0], acc[0]));
      acc[1] = _mm512_fmadd_ps(vs, zero[1], _mm512_fmadd_ps(t1, scale[1], acc[1]));
      acc[2] = _mm512_fmadd_ps(vs, zero[2], _mm512_fmadd_ps(t2, scale[2], acc[2]));
      acc[3] = _mm512_fmadd_ps(vs, zero[3], _mm512_fmadd_ps(t3, scale[3], acc[3]));
    }
    for (int i = 0; i < 4; i++) { _mm512_storeu_ps(C + i * 16, acc[i]); }
    return;
  }
"""


# The int8 LM head of an int4 model, at one row known at compile time, runs inductor's small-row int8
# template over the generic vector micro-kernel, which prefetches 64 weight rows (2 KB) ahead: 14.2-14.3 ms
# for R1-Distill-Qwen-1.5B's head ([151936, 1536], 233 MB) streamed from memory, 16.4 GB/s. 256 rows ahead:
# 10.3-11.0 ms (21-23 GB/s, 2-core Xeon with AMX). The line is only compiled where that template asks the
# kernel to prefetch (`prefetch` true: int8 weights at a static row count below 16).
_HEAD_PREFETCH = ("_mm_prefetch(B + (k + {{block_k}}) * ldb + col * VLEN, _MM_HINT_T0);",
                  "_mm_prefetch(B + (k + 256) * ldb + col * VLEN, _MM_HINT_T0);  // dsr1: further ahead")

TEXT = ONE_ROW + _HEAD_PREFETCH[1]  # what compiled code depends on (aotstep's package key, the probe's)


@functools.cache
def _edits() -> tuple[tuple[type, str, str], ...]:
    """(inductor micro-kernel class, its TEMPLATE_KERNEL as inductor wrote it, as dsr1 compiles it), made
    once: the just-in-time step enters `patched` at every call. A kernel whose text is not the one this
    was written against (another torch) is left out, and said once."""
    import torch._inductor.compile_fx  # noqa: F401 - inductor's codegen modules import in this order
    from torch._inductor.codegen import cpp_micro_gemm as mg

    wanted = [("CppMicroGemmWoQInt4Avx512", _MARKER, ONE_ROW + _MARKER), ("CppMicroGemmFP32Vec", *_HEAD_PREFETCH)]
    edits = []
    for name, old, new in wanted:
        cls = getattr(mg, name, None)
        if cls is None or cls.TEMPLATE_KERNEL.count(old) != 1:
            log.info("inductor's %s is not the one dsr1's one-row kernels were written for: left as it is", name)
            continue
        edits.append((cls, cls.TEMPLATE_KERNEL, cls.TEMPLATE_KERNEL.replace(old, new)))
    return tuple(edits)


@contextlib.contextmanager
def patched():
    """Inductor's micro-kernels with dsr1's one-row int4 path and the head's prefetch, for the compiles
    inside; inductor's own texts put back after."""
    import torch._inductor.config as inductor_config

    applied = []
    try:
        for cls, theirs, ours in _edits():
            if cls.TEMPLATE_KERNEL is not ours:  # not inside another `patched` already
                cls.TEMPLATE_KERNEL = ours
                applied.append((cls, theirs))
        # inductor's graph cache keys a compile by the graph, the options and inductor's source files, not
        # by a template's text at run time: a graph compiled outside this patch would be found again here
        # (seen: the start-up probe reused another process's unpatched kernels), and this one outside it
        with inductor_config.patch({"fx_graph_cache": False}):
            yield
    finally:
        for cls, theirs in applied:
            cls.TEMPLATE_KERNEL = theirs
