"""dsr1's edits of inductor's CPU GEMM kernels, compiled into every step dsr1 compiles on a CPU: a faster
one-row int4 path, the int8 head's prefetch and its one layout (_HEAD_VNNI), and the AMX int4 kernel reading
the integers in place.

One row. Inductor's AVX-512 int4 micro-kernel (torch 2.13, `CppMicroGemmWoQInt4Avx512`), which a compiled
int4 step runs for a single stream's decode (the one-row library on a CPU with AMX; every row count's tail
without AMX), widens every weight to `lut[q] * scale + offset` before multiplying it by the input: two fused
multiply-adds per weight, and at one row nothing shares that widening. On a 2-core Xeon with AMX one
[17920, 1536] int4 matrix (the 1.5B shape's gate|up) took 1.26-1.34 ms streamed from memory, 13 GB/s, where
the CPU reads 22 GB/s. Here one row sums `input * lut[q]` over each quantization group and applies the
group's scale and offset once at its end (scale * sum(a * q) + offset * sum(a): the same sum in another
order, fp32 throughout), and prefetches further ahead: 1.02-1.11 ms (16-17 GB/s; `benchmarks/int4_gemm.py
--rows 1 --mats 64`). Two rows and more keep inductor's code, which shares each widened weight between the
rows. The int4 model's int8 LM head prefetches further ahead too (_HEAD_PREFETCH). Behind the server, 1.5B
shape at one user: ~62-66 ms per token instead of 76-79 (docs/performance.md).

In place (_AMX_*). Inductor's AMX int4 kernel, which the dynamic library runs at every row count it serves and
for every prompt, read a copy of every int4 weight its template re-blocked at compile time, kept in the
package beside the integers the other kernels read: peak RSS 1.72-1.80x of weights + KV cache. It now reads
those integers (gathering a block's nibbles into the copy's byte order as it widens them): 1.00-1.09x the time
over the copy at 8-256 rows (`benchmarks/int4_gemm.py --dynamic --mats 64`), a restart's peak 1.28x at the 7B
shape.

Applied as a patch of the templates' text (and of the two methods that write the AMX kernel's arguments,
and of the int4 template's choice to re-block) while dsr1 compiles (`patched`), never left in place: other
compiles in the process get inductor's own, and inductor's graph cache is off meanwhile (its key does not
see the text). The text is part of the compiled package's key (dsr1.serve.aotstep), so a package built
with or without it is never loaded by the other.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Inserted before the kernel's first statement that reads C; everything it uses (lut, scale, zero,
# load_scale_and_zeros, PREFETCH_SIZE_K, the arguments) is declared above that point.
_MARKER = "  auto loadc = [&](auto i) {"

ONE_ROW = r"""
  // dsr1 one-row path (dsr1/serve/kernel_edits.py): per quantization group, sum a*lut[q] and apply the
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


# The same head in one layout for both libraries. The dynamic library's AMX kernel reads the head from its
# own blocked copy in AMX's VNNI-2 layout (rows k and k+1 interleaved, two bytes per column); the one-row
# library's vector kernel read another blocked copy, in plain rows: two copies of the head in a package, the
# 1.5B shape's 0.23 GB each, the 7B's 0.55 GB. Here the vector kernel reads the VNNI-2 layout: its template
# then blocks the head exactly as the AMX template does (the same [N/32, K, 32] blocks), and aotstep stores
# the one copy once. The sums are the vector kernel's, in its order (k, then k + 1, into each output), so
# its results do not change by a bit, nor its time: 12.3 ms against 12.1 for the 1.5B head streamed at one
# row (`benchmarks/int4_gemm.py --head`, 2-core Xeon with AMX). Inductor's AMX kernel, which inductor does
# not pick below 5 rows, took 12.1 there too: the other way to one layout, with other sums.
_HEAD_LOOP = """    for (int k = 0; k < K; ++k) {
        c10::ForcedUnroll<ROWS * COLS>{}(compute, k);
    }
"""
_HEAD_VNNI = """    // dsr1 (dsr1/serve/kernel_edits.py): B in VNNI-2 pairs, the AMX kernel's layout of the same head; a
    // pair's 2 * VLEN bytes per VLEN columns widen to int16 (column j's rows k, k + 1 in one 32-bit lane)
    static_assert(VLEN == 16, "dsr1: the VNNI-2 head is read with AVX-512");
    for (int k = 0; k < K; k += 2) {
        const {{input2_t}}* bp = B + k * ldb;
        if constexpr (prefetch) {
            _mm_prefetch(bp + 256 * ldb, _MM_HINT_T0);  // as far ahead as _HEAD_PREFETCH
        }
        for (int c = 0; c < COLS; ++c) {
            const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(bp + c * 2 * VLEN)));
            const Vectorized b0(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 16), 16)));
            const Vectorized b1(_mm512_cvtepi32_ps(_mm512_srai_epi32(w, 16)));
            for (int r = 0; r < ROWS; ++r) {
                vc[r * COLS + c] = at::vec::fmadd(Vectorized(static_cast<float>(A[r * lda + k])), b0, vc[r * COLS + c]);
                vc[r * COLS + c] = at::vec::fmadd(Vectorized(static_cast<float>(A[r * lda + k + 1])), b1,
                                                  vc[r * COLS + c]);
            }
        }
    }
"""

# Inductor's AMX int4 kernel reads its weights re-blocked: [N/32, K, 16] bytes, a byte holding columns n and
# n+16 of a 32-column block, which its template makes at compile time from the [N/64, K, 32] integers every
# other int4 kernel reads (eager `_weight_int4pack_mm_for_cpu`, the AVX-512 kernel of the one-row library):
# a second copy of every int4 weight in a compiled package, kept beside the first (the 1.5B shape: 0.89 GB,
# the 7B: 3.8 GB). Here the AMX kernel reads the integers where they lie: its 32-column block is the low or
# the high nibbles of a 64-column block's 32-byte rows (in the block's first or second half), so the
# template keeps the weight as it is and the kernel is told which half (`w_half`) and the whole K (`w_K`,
# the block's row stride / 32) by its caller, the GEMM template's loop over 32-column blocks (`nci`). The
# kernel's text knows a weight was left as it is by inductor's `pack_vnni_B_locally` (set for a weight the
# template did not block), the one fact of that choice its template is given.
# (inductor's text, what the kernel runs instead for a weight left in place); `_edits` keeps inductor's text
# for a weight its template re-blocked (`{%- else %}`)
_AMX_LOAD = ("""            _mm_prefetch(B + (k + PREFETCH_SIZE_K) * ldb_int4, _MM_HINT_T0);

            // load 256 bits = 64 elements in int4
            __m128i b4 = _mm_loadu_si128((__m128i*)(B + n / 2 * K + k * ldb_int4));
            b32[0] = _mm512_cvtepu8_epi32(b4);
            b32[1] = _mm512_srli_epi32(b32[0], 4);
""", """            // dsr1 (dsr1/serve/kernel_edits.py): 32-byte rows of the 64-column block, this block's nibbles
            // gathered into the 16 bytes inductor's re-blocked copy would hold (columns n and n+16)
            _mm_prefetch(Bw + (k + PREFETCH_SIZE_K) * 32, _MM_HINT_T0);
            __m128i b4 = w_pack(Bw + k * 32);
            b32[0] = _mm512_cvtepu8_epi32(b4);
            b32[1] = _mm512_srli_epi32(b32[0], 4);
""")
_AMX_LOAD2 = ("""            __m128i b4_2 = _mm_loadu_si128((__m128i*)(B + n / 2 * K + (k + 1) * ldb_int4));
            b32[0 + COLS] = _mm512_cvtepu8_epi32(b4_2);
            b32[1 + COLS] = _mm512_srli_epi32(b32[0 + COLS], 4);
""", """            __m128i b4_2 = w_pack(Bw + (k + 1) * 32);
            b32[0 + COLS] = _mm512_cvtepu8_epi32(b4_2);
            b32[1 + COLS] = _mm512_srli_epi32(b32[0 + COLS], 4);
""")
# where the block's rows start: the caller's B is W + nci * 16 * w_K + k_start * 16 (its [N, K/2] view
# sliced at 32 columns); the block of 64 holding it starts 16 * w_K earlier when it is the second half
_DEQUANTIZE = """    auto dequantize_B = [&](int n) {
"""
_AMX_START = (_DEQUANTIZE, """    {{kernel.assert_function}}(N == {{block_n}}, "dsr1: one 32-column block per call");
    const uint8_t* Bw = reinterpret_cast<const uint8_t*>(B) - w_half * 16 * w_K + k_start * 16;
    // a row's 32 bytes hold columns j (low nibble) and j + 32 (high) of the 64-column block: this block's
    // 32 nibbles (the low ones of the first half, the high of the second) packed two to a byte, column
    // j in the low nibble of byte j and column j + 16 in its high one
    const __m128i w_lo = _mm_set1_epi8(0x0F);
    auto w_pack = [&](const uint8_t* row) {
        const __m128i a = _mm_loadu_si128((const __m128i*)row), c = _mm_loadu_si128((const __m128i*)(row + 16));
        // 0xCA: bit select, w_lo's ones from the second operand, its zeros from the third
        return w_half == 0 ? _mm_ternarylogic_epi32(w_lo, a, _mm_slli_epi16(c, 4), 0xCA)
                           : _mm_ternarylogic_epi32(w_lo, _mm_srli_epi16(a, 4), c, 0xCA);
    };
""" + _DEQUANTIZE)
# the GEMM template's call, inside `for (int64_t nci ...)` with `K` the whole K: the line the extra
# arguments are written from
_AMX_CALLER = 'kernel.slice_nd(W, [("nci * Nr", "(nci + 1) * Nr"), ("k_start * Nr / 2", "k_end * Nr / 2")])'

# what compiled code depends on (aotstep's package key, the probe's): this module, its texts and the
# arguments and choices it writes into inductor's
TEXT = Path(__file__).read_text()


@functools.cache
def _edits() -> tuple[tuple[object, str, object, object], ...]:
    """(owner, attribute, inductor's value, dsr1's) for each edit, made once: the just-in-time step enters
    `patched` at every call. An edit whose text is not the one it was written against (another torch) is
    left out, and said once; the in-place AMX kernel goes whole or not at all."""
    import torch
    import torch._inductor.compile_fx  # noqa: F401 - inductor's codegen modules import in this order
    from torch._inductor.codegen import cpp_gemm_template as gt
    from torch._inductor.codegen import cpp_micro_gemm as mg

    edits = []
    vnni_loop = "{%- if template.dsr1_vnni is defined %}\n" + _HEAD_VNNI + "{%- else %}\n" + _HEAD_LOOP + "{%- endif %}\n"
    for name, *pairs in (("CppMicroGemmWoQInt4Avx512", (_MARKER, ONE_ROW + _MARKER)),
                         ("CppMicroGemmFP32Vec", _HEAD_PREFETCH, (_HEAD_LOOP, vnni_loop))):
        cls = getattr(mg, name, None)
        if cls is None or any(cls.TEMPLATE_KERNEL.count(old) != 1 for old, _ in pairs):
            log.info("inductor's %s is not the one dsr1's one-row kernels were written for: left as it is", name)
            continue
        ours = cls.TEMPLATE_KERNEL
        for old, new in pairs:
            ours = ours.replace(old, new)
        edits.append((cls, "TEMPLATE_KERNEL", cls.TEMPLATE_KERNEL, ours))
        if name == "CppMicroGemmFP32Vec":
            edits += _vnni_head(mg, gt)

    amx = getattr(mg, "CppMicroGemmWoQInt4Amx", None)
    meta = type(getattr(gt, "CppWoqInt4GemmTemplate", None))
    entry = getattr(amx, "TEMPLATE_ENTRY", "")
    if (amx is None or not hasattr(meta, "__getitem__") or getattr(gt, "GEMM_TEMPLATE", "").count(_AMX_CALLER) != 1
            or any(entry.count(old) != 1 for old, _ in (_AMX_LOAD, _AMX_LOAD2, _AMX_START))):
        log.info("inductor's AMX int4 kernel is not the one dsr1's in-place reading was written for: it keeps "
                 "its own re-blocked copy of the weights")
        return tuple(edits)
    ours = entry
    for theirs, in_place in (_AMX_LOAD, _AMX_LOAD2, _AMX_START):
        ours = ours.replace(theirs, "{%- if pack_vnni_B_locally %}\n" + in_place + "{%- else %}\n" + theirs
                            + "{%- endif %}\n")
    edits.append((amx, "TEMPLATE_ENTRY", entry, ours))
    declare, extra, getitem = amx.get_kernel_extra_args_declare, amx.get_kernel_extra_args, meta.__getitem__

    def declare_in_place(self):
        ours = "\n    const int64_t w_half,\n    const int64_t w_K,"
        return declare(self) + (ours if self.pack_vnni_B_locally else "")

    def extra_in_place(self, **kwargs):
        return extra(self, **kwargs) + (["nci & 1,", "K,"] if self.pack_vnni_B_locally else [])

    def template_in_place(cls, q_group_size):
        template = getitem(cls, q_group_size)

        @staticmethod
        def check_if_block_weight(W, micro_gemm):
            # re-blocked only where the integers' 64-column blocks do not cover N (a tail of 32)
            n = W.get_size()[0] if hasattr(W, "get_size") else W.shape[0]
            return isinstance(micro_gemm, amx) and n % 64 != 0

        template.check_if_block_weight = check_if_block_weight
        return template

    edits += [(amx, "get_kernel_extra_args_declare", declare, declare_in_place),
              (amx, "get_kernel_extra_args", extra, extra_in_place),
              (meta, "__getitem__", getitem, template_in_place)]
    return tuple(edits)


def _vnni_head(mg, gt) -> list[tuple[object, str, object, object]]:
    """The choice that the one-row int8 head's vector kernel reads the VNNI-2 layout (_HEAD_VNNI): made where
    inductor would pick its AMX kernel for the same head over a dynamic row count (the dynamic library's),
    which blocks it the same way. `create_micro_gemm` is looked up by name in both modules."""
    import torch

    create = mg.create_micro_gemm
    if create is not getattr(gt, "create_micro_gemm", None):
        return []

    def create_vnni(*args, **kwargs):
        gemm = create(*args, **kwargs)
        k = kwargs.get("k", args[3] if len(args) > 3 else None)
        isa = mg.pick_vec_isa()
        if (type(gemm) is mg.CppMicroGemmFP32Vec and gemm.input_dtype == torch.bfloat16
                and gemm.input2_dtype == torch.int8 and not gemm.tail_n and not gemm.trans_b
                and gemm.register_blocking.block_n % 16 == 0 and gemm.register_blocking.block_k % 2 == 0
                and (isinstance(k, int) or getattr(k, "is_number", False)) and int(k) % 2 == 0
                and isinstance(isa, mg.VecAMX) and isa.is_avx512_bf16_supported()):
            # (every call's K a multiple of block_k, which the kernel's entry asserts: pairs never split)
            gemm.dsr1_vnni = True  # the kernel's text asks whether it is there (`template`: the micro-kernel)
            gemm.get_b_layout = lambda: mg.LayoutType.VNNI2  # how its template blocks the weight
        return gemm

    return [(mg, "create_micro_gemm", create, create_vnni), (gt, "create_micro_gemm", create, create_vnni)]


@contextlib.contextmanager
def patched():
    """Inductor's int4 kernels as dsr1 compiles them (the one-row path, the head's prefetch, the AMX kernel
    reading the integers in place), for the compiles inside; inductor's own put back after."""
    import torch._inductor.config as inductor_config

    applied = []
    try:
        for owner, attr, theirs, ours in _edits():
            if owner.__dict__.get(attr) is not ours:  # not inside another `patched` already
                setattr(owner, attr, ours)
                applied.append((owner, attr, theirs))
        # inductor's graph cache keys a compile by the graph, the options and inductor's source files, not
        # by a template's text at run time: a graph compiled outside this patch would be found again here
        # (seen: the start-up probe reused another process's unpatched kernels), and this one outside it
        with inductor_config.patch({"fx_graph_cache": False}):
            yield
    finally:
        for owner, attr, theirs in reversed(applied):
            setattr(owner, attr, theirs)
