/* int4 weights x int8 activations on AVX-512 VNNI: y = x @ w.T for rows x [M, K], w [N, K] in 4 bits.
 *
 * Why: without AMX, PyTorch's int4 kernels (eager `_weight_int4pack_mm_for_cpu` and inductor's AVX-512
 * int4 micro-kernel) widen every weight to floating point for every few rows, so a batch of 16 rows costs
 * ~6x one row. Multiplying in integers (vpdpbusd: 64 u8 x s8 products summed in fours per instruction)
 * makes a weight cost one nibble-unpack for all the rows of a call, as llama.cpp's Q4 x Q8 dot products do.
 *
 * Numbers:
 *  - weights: per group of 32 input columns, q in 0..15 with a scale s and the group's minimum lo:
 *    w = q * s + lo (asymmetric, as dsr1's int4 has always been quantized);
 *  - activations: per row and group of 32, symmetric int8 with their own scale a (a_q = round(x / a),
 *    |a_q| <= 127), made here at every call;
 *  - so y[m, n] = sum_g a[m,g] * (s[n,g] * dot(a_q[m,g], q[n,g]) + lo[n,g] * sum(a_q[m,g])).
 *
 * Layout (made by int4vnni.py's pack): for every block of 16 output rows (channels) and group of 32
 * inputs, 256 bytes: four 64-byte vectors, vector j holding for each channel c (4 bytes at 4c) the
 * inputs 8j..8j+3 in the low nibbles and 8j+4..8j+7 in the high ones, i.e. exactly what vpdpbusd's
 * 32-bit lanes take (four consecutive inputs of one channel); then the group's 16 scales and 16 minima
 * in bf16 in a separate array [N/16][K/32][2][16].
 *
 * Threads: one OpenMP region per call, over blocks of 16 channels; the process's OpenMP runtime is
 * torch's own libgomp (the same soname), so calls from the engine thread reuse its team.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline void f32x16_store(void *out, int bf16, __m512 v) {
    if (!bf16) {
        _mm512_storeu_ps(out, v);
        return;
    }
    /* round to nearest even, as torch's float -> bf16 conversion (NaN is not expected here) */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

/* One row of activations, K = 32 * G inputs, to int8 per group of 32: a_q, the scale a and a * sum(a_q). */
static void quantize_row(const void *x, int bf16, int64_t G, int8_t *aq, float *sa, float *ca) {
    for (int64_t g = 0; g < G; g++) {
        __m512 v0, v1;
        if (bf16) {
            v0 = bf16x16_to_f32((const uint16_t *)x + 32 * g);
            v1 = bf16x16_to_f32((const uint16_t *)x + 32 * g + 16);
        } else {
            v0 = _mm512_loadu_ps((const float *)x + 32 * g);
            v1 = _mm512_loadu_ps((const float *)x + 32 * g + 16);
        }
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float a = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i *)(aq + 32 * g), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(aq + 32 * g + 16), _mm512_cvtsepi32_epi8(q1));
        int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        sa[g] = a;
        ca[g] = a * (float)s;
    }
}

/* MT rows (m0..m0+MT-1) against one block of 16 channels; MT is a constant in each instance, so the
 * accumulators stay in registers (8 weight vectors + 2 per row <= 24 of the 32). */
#define DEFINE_BLOCK(MT)                                                                                     \
    static void block_##MT(const int8_t *aq, const float *sa, const float *ca, int64_t K, int64_t G,        \
                           const uint8_t *w, const uint16_t *sz, void *out, int64_t ldo, int bf16) {        \
        const __m512i nib = _mm512_set1_epi8(0x0F);                                                         \
        __m512 acc[MT];                                                                                     \
        for (int r = 0; r < MT; r++) acc[r] = _mm512_setzero_ps();                                          \
        for (int64_t g = 0; g < G; g++) {                                                                   \
            const uint8_t *wg = w + 256 * g;                                                                \
            __m512i wq[8];                                                                                  \
            for (int j = 0; j < 4; j++) {                                                                   \
                __m512i v = _mm512_loadu_si512((const void *)(wg + 64 * j));                               \
                wq[2 * j] = _mm512_and_si512(v, nib);                                                       \
                wq[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);                             \
            }                                                                                               \
            __m512 s = bf16x16_to_f32(sz + 32 * g), lo = bf16x16_to_f32(sz + 32 * g + 16);                  \
            for (int r = 0; r < MT; r++) {                                                                  \
                const int8_t *a = aq + r * K + 32 * g;                                                      \
                /* two sums, so one row's eight dot products are two chains of four, not one of eight */  \
                __m512i d = _mm512_setzero_si512(), e = _mm512_setzero_si512();                             \
                for (int j = 0; j < 4; j++) {                                                               \
                    int32_t lo4, hi4;                                                                       \
                    memcpy(&lo4, a + 8 * j, 4);                                                             \
                    memcpy(&hi4, a + 8 * j + 4, 4);                                                         \
                    d = _mm512_dpbusd_epi32(d, wq[2 * j], _mm512_set1_epi32(lo4));                          \
                    e = _mm512_dpbusd_epi32(e, wq[2 * j + 1], _mm512_set1_epi32(hi4));                      \
                }                                                                                           \
                d = _mm512_add_epi32(d, e);                                                                 \
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, _mm512_set1_ps(sa[r * G + g])), \
                                         acc[r]);                                                           \
                acc[r] = _mm512_fmadd_ps(lo, _mm512_set1_ps(ca[r * G + g]), acc[r]);                        \
            }                                                                                               \
        }                                                                                                   \
        for (int r = 0; r < MT; r++)                                                                        \
            f32x16_store((char *)out + (size_t)r * ldo * (bf16 ? 2 : 4), bf16, acc[r]);                     \
    }

DEFINE_BLOCK(1)
DEFINE_BLOCK(2)
DEFINE_BLOCK(3)
DEFINE_BLOCK(4)
DEFINE_BLOCK(5)
DEFINE_BLOCK(6)
DEFINE_BLOCK(7)
DEFINE_BLOCK(8)

typedef void (*block_fn)(const int8_t *, const float *, const float *, int64_t, int64_t, const uint8_t *,
                         const uint16_t *, void *, int64_t, int);
static const block_fn BLOCKS[9] = {0, block_1, block_2, block_3, block_4, block_5, block_6, block_7, block_8};

/* y [M, N] = x [M, K] @ w.T; x and y in bf16 (x_bf16 = 1) or fp32; K % 32 == 0, N % 16 == 0 (checked by
 * the caller). Returns 0, or -1 when the workspace could not be allocated. */
int int4vnni_mm(const void *x, int bf16, int64_t M, int64_t K, int64_t N, const uint8_t *w, const uint16_t *sz,
                void *y) {
    const int64_t G = K / 32, NB = N / 16;
    int8_t *aq = (int8_t *)aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    float *sa = (float *)malloc(sizeof(float) * (size_t)(2 * M * G));
    if (!aq || !sa) {
        free(aq);
        free(sa);
        return -1;
    }
    float *ca = sa + M * G;
    const size_t xrow = (size_t)K * (bf16 ? 2 : 4), yel = bf16 ? 2 : 4;
    /* one parallel region for both phases: a region costs a wake-up of the team, and decode makes
     * hundreds of calls per step */
#pragma omp parallel if (M * K * N > (int64_t)1 << 16)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            quantize_row((const char *)x + m * xrow, bf16, G, aq + m * K, sa + m * G, ca + m * G);
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < NB; nb++) {
            const uint8_t *wb = w + nb * G * 256;
            const uint16_t *szb = sz + nb * G * 32;
            for (int64_t m0 = 0; m0 < M; m0 += 8) {
                int mt = (int)(M - m0 < 8 ? M - m0 : 8);
                BLOCKS[mt](aq + m0 * K, sa + m0 * G, ca + m0 * G, K, G, wb, szb,
                           (char *)y + (m0 * N + nb * 16) * yel, N, bf16);
            }
        }
    }
    free(aq);
    free(sa);
    return 0;
}
