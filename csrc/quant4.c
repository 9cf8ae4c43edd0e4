/* quant4.c - the 4-bit matmul kernels (model.bin version 3), one set per instruction set.
 *
 * As in quant.c, the sets compute the same integer sums and differ only in the order of
 * float additions. Weights are unsigned 0..15 and activations signed int8, which is just
 * what the x86 byte dot products take (dpbusd, maddubs): no offset to correct, the min's
 * share of a group comes from the activations' group sum instead.
 */
#include "quant4.h"
#include "common.h"

#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define L2_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

float f16_to_f32(uint16_t h) {
    uint32_t e = (h >> 10) & 0x1f, f = h & 0x3ff;
    uint32_t bits = e == 31 ? 0x7f800000u | f << 13 : (e + 112) << 23 | f << 13;
    float v;
    memcpy(&v, &bits, sizeof(v));
    if (e == 0) v = (float)f * 0x1p-24f; /* zero or subnormal */
    return h & 0x8000 ? -v : v;
}

/* Value j of a row starting at element `at` of the matrix (at even: rows start on a byte). */
static inline int nibble(const uint8_t *q, size_t at, int j) {
    uint8_t b = q[(at + j) / 2];
    return j % 2 ? b >> 4 : b & 15;
}

void dequantize_q4_row(float *x, const Q4Mat *w, size_t row, int n, int gs) {
    size_t at = row * n, g0 = at / gs;
    for (int j = 0; j < n; j++) {
        size_t g = g0 + j / gs;
        x[j] = f16_to_f32(f16_at(w->s, g)) * nibble(w->q, at, j) + f16_to_f32(f16_at(w->m, g));
    }
}

/* ---- portable C: the reference, any even group size, the file's layout ---- */

static void matmul_q4_portable(float *out, const Q8Act *x, const Q4Mat *w, int T, int n, int d,
                               int gs, int r0, int r1) {
    size_t ng = n / gs;
    for (int i = r0; i < r1; i++) {
        const uint8_t *wq = w->q + (size_t)i * n / 2;
        for (int t = 0; t < T; t++) {
            const int8_t *xq = x->q + (size_t)t * n;
            float val = 0.0f;
            for (size_t g = 0; g < ng; g++) {
                int32_t sum = 0;
                for (size_t j = g * gs; j < (g + 1) * gs; j += 2)
                    sum += (wq[j / 2] & 15) * xq[j] + (wq[j / 2] >> 4) * xq[j + 1];
                size_t wg = i * ng + g, xg = t * ng + g;
                float scale = f16_to_f32(f16_at(w->s, wg)), min = f16_to_f32(f16_at(w->m, wg));
                val += x->s[xg] * (scale * (float)sum + min * (float)x->sum[xg]);
            }
            out[(size_t)t * d + i] = val;
        }
    }
}

static const Q4Kernels PORTABLE4 = {"portable", matmul_q4_portable, NULL, NULL};

#ifdef L2_X86

/* The avx2 and avx512 layout puts 16 rows side by side, 4 bytes (8 values) of each in turn,
 * so that one 512-bit load feeds dpbusd 4 values of 16 rows (the low nibbles) and 4 more
 * (the high ones), and a group's sums end up one row per 32-bit lane. For each block of
 * 16 rows (the last padded with zero rows), for each group: its values in gs / 8 pieces
 * of [16 rows][4 bytes], byte k of a row's 4 holding values 8c + k (low nibble) and
 * 8c + 4 + k (high); then the 16 rows' fp16 scales, then their fp16 mins. The same bytes
 * as the file's, read front to back in one stream. Group sizes not a multiple of 8 keep
 * the file's layout and run the portable loops. */
#define BLOCK4 16 /* = KERNEL_ROWS */

static size_t group_bytes4(int gs) { return (size_t)BLOCK4 * (gs / 2 + 4); }
static size_t block_bytes4(int n, int gs) { return (size_t)(n / gs) * group_bytes4(gs); }

static size_t packed_size_q4(int d, int n, int gs) {
    if (gs % 8) return 0;
    return (size_t)(d + BLOCK4 - 1) / BLOCK4 * block_bytes4(n, gs);
}

static void pack_q4(void *dst, const Q4Mat *w, int d, int n, int gs) {
    size_t ng = n / gs;
    for (int b = 0; b < (d + BLOCK4 - 1) / BLOCK4; b++) {
        for (size_t g = 0; g < ng; g++) {
            uint8_t *v = (uint8_t *)dst + b * block_bytes4(n, gs) + g * group_bytes4(gs);
            uint8_t *s = v + (size_t)BLOCK4 * gs / 2, *m = s + 2 * BLOCK4;
            for (int r = 0; r < BLOCK4; r++) {
                size_t row = (size_t)b * BLOCK4 + r, at = row * n + g * gs;
                for (int c = 0; c < gs / 8; c++)
                    for (int k = 0; k < 4; k++)
                        v[c * 64 + r * 4 + k] = (int)row < d ? nibble(w->q, at, 8 * c + k) |
                                                              nibble(w->q, at, 8 * c + 4 + k) << 4 : 0;
                memset(s + 2 * r, 0, 2);
                memset(m + 2 * r, 0, 2);
                if ((int)row < d) {
                    memcpy(s + 2 * r, w->s + 2 * (row * ng + g), 2);
                    memcpy(m + 2 * r, w->m + 2 * (row * ng + g), 2);
                }
            }
        }
    }
}

/* 4 activation bytes, as one int32 to broadcast to every row. */
static inline int32_t four(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ---- AVX2 + FMA + F16C ---- */

#define AVX2_4 __attribute__((target("avx2,fma,f16c")))
#define T_STEP2 4 /* tokens per pass in prefill: 16 ymm registers hold no more */

/* Half h (rows 8h..8h+7) of one block times nt tokens, into out8[u * 8 ..]. maddubs adds
 * pairs of products in int16 (at most 2 * 15 * 127: no saturation), madd the pairs in
 * int32. */
AVX2_4 __attribute__((always_inline)) static inline void
half_q4_avx2(float *out8, const Q8Act *x, int t0, int nt, const uint8_t *v, int n, int gs, int h) {
    int ng = n / gs;
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[T_STEP2];
    for (int u = 0; u < nt; u++) acc[u] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        const uint8_t *vg = v + g * group_bytes4(gs);
        __m256i isum[T_STEP2];
        for (int u = 0; u < nt; u++) isum[u] = _mm256_setzero_si256();
        for (int c = 0; c < gs / 8; c++) {
            __m256i wv = _mm256_load_si256((const __m256i *)(vg + c * 64 + h * 32));
            __m256i lo = _mm256_and_si256(wv, low), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
            for (int u = 0; u < nt; u++) {
                const int8_t *xq = x->q + (size_t)(t0 + u) * n + g * gs + 8 * c;
                __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(four(xq))),
                                                 _mm256_maddubs_epi16(hi, _mm256_set1_epi32(four(xq + 4))));
                isum[u] = _mm256_add_epi32(isum[u], _mm256_madd_epi16(pairs, ones));
            }
        }
        const uint8_t *s = vg + (size_t)BLOCK4 * gs / 2 + h * 16;
        __m256 ws = _mm256_cvtph_ps(_mm_load_si128((const __m128i *)s));
        __m256 wm = _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(s + 2 * BLOCK4)));
        for (int u = 0; u < nt; u++) {
            size_t tg = (size_t)(t0 + u) * ng + g;
            __m256 sx = _mm256_set1_ps(x->s[tg]);
            acc[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[u]), _mm256_mul_ps(ws, sx), acc[u]);
            acc[u] = _mm256_fmadd_ps(wm, _mm256_set1_ps(x->s[tg] * (float)x->sum[tg]), acc[u]);
        }
    }
    for (int u = 0; u < nt; u++) _mm256_storeu_ps(out8 + u * 8, acc[u]);
}

/* A block's halves one after the other: the second reads the other half of the same cache
 * lines, from L1 (a row block of a 768-wide matrix is 7.5 KiB). */
AVX2_4 static void matmul_q4_avx2(float *out, const Q8Act *x, const Q4Mat *w, int T, int n, int d,
                                  int gs, int r0, int r1) {
    if (!w->packed) {
        matmul_q4_portable(out, x, w, T, n, d, gs, r0, r1);
        return;
    }
    size_t stride = block_bytes4(n, gs);
    float rows[T_STEP2][BLOCK4];
    for (int i = r0; i < r1; i += BLOCK4) {
        const uint8_t *v = (const uint8_t *)w->packed + (size_t)(i / BLOCK4) * stride;
        int nr = r1 - i < BLOCK4 ? r1 - i : BLOCK4;
        for (int t = 0; t < T;) {
            int nt = T - t >= T_STEP2 ? T_STEP2 : 1; /* constant counts keep acc[] in registers */
            for (int h = 0; h < 2; h++) {
                float half[T_STEP2 * 8];
                if (nt == T_STEP2)
                    half_q4_avx2(half, x, t, T_STEP2, v, n, gs, h);
                else
                    half_q4_avx2(half, x, t, 1, v, n, gs, h);
                for (int u = 0; u < nt; u++) memcpy(rows[u] + 8 * h, half + u * 8, 8 * sizeof(float));
            }
            for (int u = 0; u < nt; u++) memcpy(out + (size_t)(t + u) * d + i, rows[u], nr * sizeof(float));
            t += nt;
        }
    }
}

static const Q4Kernels AVX2_4_KERNELS = {"avx2", matmul_q4_avx2, packed_size_q4, pack_q4};

/* ---- AVX-512 (F, BW, VL) with VNNI ---- */

#define AVX512_4 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define T_STEP KERNEL_TOKENS /* tokens per pass in prefill: each weight vector serves them all */

/* One block of 16 rows times nt tokens (nt <= T_STEP), writing the rows `keep` selects. The
 * low and high nibbles go to two sums per token, so that two dpbusd chains run side by
 * side. */
AVX512_4 __attribute__((always_inline)) static inline void
block_q4_avx512(float *out, size_t d, const Q8Act *x, int t0, int nt, const uint8_t *v, int n,
                int gs, __mmask16 keep) {
    int ng = n / gs;
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[T_STEP];
    for (int u = 0; u < nt; u++) acc[u] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        const uint8_t *vg = v + g * group_bytes4(gs);
        __m512i isum[T_STEP][2];
        for (int u = 0; u < nt; u++) isum[u][0] = isum[u][1] = _mm512_setzero_si512();
        for (int c = 0; c < gs / 8; c++) {
            __m512i wv = _mm512_load_si512(vg + c * 64);
            __m512i lo = _mm512_and_si512(wv, low), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
            for (int u = 0; u < nt; u++) {
                const int8_t *xq = x->q + (size_t)(t0 + u) * n + g * gs + 8 * c;
                isum[u][0] = _mm512_dpbusd_epi32(isum[u][0], lo, _mm512_set1_epi32(four(xq)));
                isum[u][1] = _mm512_dpbusd_epi32(isum[u][1], hi, _mm512_set1_epi32(four(xq + 4)));
            }
        }
        const uint8_t *s = vg + (size_t)BLOCK4 * gs / 2;
        __m512 ws = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)s));
        __m512 wm = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(s + 2 * BLOCK4)));
        for (int u = 0; u < nt; u++) {
            size_t tg = (size_t)(t0 + u) * ng + g;
            __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(isum[u][0], isum[u][1]));
            acc[u] = _mm512_fmadd_ps(sum, _mm512_mul_ps(ws, _mm512_set1_ps(x->s[tg])), acc[u]);
            acc[u] = _mm512_fmadd_ps(wm, _mm512_set1_ps(x->s[tg] * (float)x->sum[tg]), acc[u]);
        }
    }
    for (int u = 0; u < nt; u++) _mm512_mask_storeu_ps(out + (size_t)(t0 + u) * d, keep, acc[u]);
}

AVX512_4 static void matmul_q4_avx512(float *out, const Q8Act *x, const Q4Mat *w, int T, int n,
                                      int d, int gs, int r0, int r1) {
    if (!w->packed) {
        matmul_q4_portable(out, x, w, T, n, d, gs, r0, r1);
        return;
    }
    size_t stride = block_bytes4(n, gs);
    for (int i = r0; i < r1; i += BLOCK4) {
        const uint8_t *v = (const uint8_t *)w->packed + (size_t)(i / BLOCK4) * stride;
        __mmask16 keep = r1 - i >= BLOCK4 ? 0xffff : (__mmask16)((1u << (r1 - i)) - 1);
        int t = 0; /* constant token counts (and group sizes) keep acc[] and isum[] in registers */
        for (; t + T_STEP <= T; t += T_STEP) block_q4_avx512(out + i, d, x, t, T_STEP, v, n, gs, keep);
        for (; t < T; t++) {
            if (gs == 32)
                block_q4_avx512(out + i, d, x, t, 1, v, n, 32, keep);
            else if (gs == 16)
                block_q4_avx512(out + i, d, x, t, 1, v, n, 16, keep);
            else
                block_q4_avx512(out + i, d, x, t, 1, v, n, gs, keep);
        }
    }
}

static const Q4Kernels AVX512_4_KERNELS = {"avx512", matmul_q4_avx512, packed_size_q4, pack_q4};

/* Every CPU with AVX2 has F16C too; the test is for the odd emulator that lacks it. (clang's
 * __builtin_cpu_supports does not know "f16c".) */
static int has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}

#endif /* L2_X86 */

const Q4Kernels *kernels4_select(const char *name) {
#ifdef L2_X86
    if (!strcmp(name, "avx2") && has_f16c()) return &AVX2_4_KERNELS;
    if (!strcmp(name, "avx512")) return &AVX512_4_KERNELS;
#endif
    return &PORTABLE4;
}
