/* quant.c - int8 group quantization and the matmul kernels, one set per instruction set.
 *
 * Every set computes the same sums; they differ only in the order of float additions, so
 * their results agree to within float rounding. The x86 sets are compiled with target
 * attributes, so one binary carries all of them (even `make runportable`) and picks at run
 * time what the CPU supports.
 *
 * int8 dot products use llama2.c runq's Q8_0 scheme: weights and activations are both
 * int8 in groups of gs with a float scale each, so a group's dot product is an exact
 * integer sum, scaled once by w_scale * x_scale.
 */
#include "quant.h"
#include "common.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define L2_X86 1
#include <immintrin.h>
#endif

void quantize_q8(int8_t *q, float *s, int32_t *sum, const float *x, int n, int gs) {
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
        int8_t *qg = q + (size_t)g * gs;
        float amax = 0.0f;
#pragma omp simd reduction(max : amax)
        for (int i = 0; i < gs; i++) amax = fabsf(xg[i]) > amax ? fabsf(xg[i]) : amax;
        float scale = amax / 127.0f;
        float inv = scale > 0.0f ? 1.0f / scale : 0.0f; /* an all-zero group stays zero */
        int32_t total = 0;
        for (int i = 0; i < gs; i++) {
            float v = xg[i] * inv;
            /* in range already, unless inf or NaN came in (NaN fails both tests) */
            v = v >= -127.0f ? v : -127.0f;
            v = v <= 127.0f ? v : 127.0f;
            /* rounded half away from zero, as roundf (a call) does */
            qg[i] = (int8_t)(int32_t)(v + (v >= 0.0f ? 0.5f : -0.5f));
            total += qg[i];
        }
        s[g] = scale;
        sum[g] = total;
    }
}

/* ---- portable C: the reference the others must agree with ---- */

/* The simd reduction lets the compiler use vector lanes, which plain -O3 may not for floats. */
static inline float dot_f32(const float *restrict w, const float *restrict x, int n) {
    float val = 0.0f;
#pragma omp simd reduction(+ : val)
    for (int j = 0; j < n; j++) val += w[j] * x[j];
    return val;
}

static void matmul_f32_portable(float *out, const float *x, const float *w, int T, int n, int d,
                                int r0, int r1) {
    for (int i = r0; i < r1; i++)
        for (int t = 0; t < T; t++)
            out[(size_t)t * d + i] = dot_f32(w + (size_t)i * n, x + (size_t)t * n, n);
}

static float dot_q8(const int8_t *wq, const float *ws, const int8_t *xq, const float *xs, int n,
                    int gs) {
    float val = 0.0f;
    for (int g = 0; g < n / gs; g++) {
        int32_t sum = 0;
        for (int j = g * gs; j < (g + 1) * gs; j++) sum += (int32_t)wq[j] * xq[j];
        val += (float)sum * (ws[g] * xs[g]);
    }
    return val;
}

static void matmul_q8_portable(float *out, const Q8Act *x, const Q8Mat *w, int T, int n, int d,
                               int gs, int r0, int r1) {
    size_t ng = n / gs;
    for (int i = r0; i < r1; i++)
        for (int t = 0; t < T; t++)
            out[(size_t)t * d + i] = dot_q8(w->q + (size_t)i * n, w->s + i * ng,
                                            x->q + (size_t)t * n, x->s + t * ng, n, gs);
}

static const Kernels PORTABLE = {"portable", matmul_f32_portable, matmul_q8_portable, quantize_q8,
                                  NULL, NULL};

#ifdef L2_X86

/* ---- AVX2 + FMA ---- */

#define AVX2 __attribute__((target("avx2,fma")))
#define ROWS 4 /* rows per pass in prefill: each x vector loaded serves this many */

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Decoding streams each row once: one row at a time (several rows at once would be several
 * streams, which the hardware prefetcher serves worse), four accumulators to hide the FMA
 * latency. */
AVX2 static float dot_f32_avx2(const float *w, const float *x, int n) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    int j = 0;
    for (; j + 32 <= n; j += 32)
        for (int u = 0; u < 4; u++)
            acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8 * u),
                                     _mm256_loadu_ps(x + j + 8 * u), acc[u]);
    for (; j + 8 <= n; j += 8)
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), acc[0]);
    float val = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; j < n; j++) val += w[j] * x[j];
    return val;
}

/* Prefill multiplies tiles of F2_TOKENS tokens by F_ROWS rows (see the avx512 kernel, whose
 * loop this one follows): 12 sums in registers, as many as 16 registers leave room for. */
#define F2_TOKENS 3
#define F_ROWS 4  /* = the 4 floats of a 128-bit lane, where the sums are gathered */
#define F_SPAN 512 /* rows longer than this are taken in pieces, for L1 to hold a tile */

/* Values j0..j1-1 of the rows w[0..F_ROWS) times those of the tokens x[0..nt) (rows n apart):
 * token u's sums go to out[u * d ..], its first nr rows, added to what is there unless j0 is 0.
 * Meanwhile values j0..j1-1 of the row `ahead` are fetched into the cache. Always inlined, so
 * that each constant nt gets a loop with acc[][] in registers. */
AVX2 __attribute__((always_inline)) static inline void
tile_f32_avx2(float *out, size_t d, const float *x, int nt, const float *const w[F_ROWS], int n,
              int j0, int j1, int nr, const float *ahead) {
    __m256 acc[F2_TOKENS][F_ROWS];
    for (int u = 0; u < nt; u++)
        for (int r = 0; r < F_ROWS; r++) acc[u][r] = _mm256_setzero_ps();
    int j = j0;
    for (; j + 8 <= j1; j += 8) {
        _mm_prefetch((const char *)(ahead + j), _MM_HINT_T0);
        /* Each vector loaded into a register, which the empty asm insists on: gcc's AMD
         * tunings would otherwise read it again from memory in each FMA that uses it (16
         * loads per 12 FMAs, which measured 1.6x slower). */
        __m256 xv[F2_TOKENS];
        for (int u = 0; u < nt; u++) {
            xv[u] = _mm256_loadu_ps(x + (size_t)u * n + j);
            __asm__("" : "+v"(xv[u]));
        }
        for (int r = 0; r < F_ROWS; r++) {
            __m256 wv = _mm256_loadu_ps(w[r] + j);
            __asm__("" : "+v"(wv));
            for (int u = 0; u < nt; u++) acc[u][r] = _mm256_fmadd_ps(wv, xv[u], acc[u][r]);
        }
    }
    for (int u = 0; u < nt; u++) {
        /* hadd twice: per 128-bit lane, the 4 rows' sums of that lane's values */
        __m256 s4 = _mm256_hadd_ps(_mm256_hadd_ps(acc[u][0], acc[u][1]), _mm256_hadd_ps(acc[u][2], acc[u][3]));
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(s4), _mm256_extractf128_ps(s4, 1));
        float *o = out + u * d, sum[F_ROWS];
        _mm_storeu_ps(sum, s);
        for (int r = 0; r < nr; r++) {
            for (int k = j; k < j1; k++) sum[r] += w[r][k] * x[(size_t)u * n + k]; /* the rest */
            o[r] = j0 ? o[r] + sum[r] : sum[r];
        }
    }
}

/* tile_f32_avx2 with nt (1..F2_TOKENS - 1: a batch's last tokens) as a constant. */
AVX2 static void tile_f32_avx2_nt(float *out, size_t d, const float *x, int nt,
                                  const float *const w[F_ROWS], int n, int j0, int j1, int nr,
                                  const float *ahead) {
    if (nt == 2)
        tile_f32_avx2(out, d, x, 2, w, n, j0, j1, nr, ahead);
    else
        tile_f32_avx2(out, d, x, 1, w, n, j0, j1, nr, ahead);
}
_Static_assert(F2_TOKENS == 3, "tile_f32_avx2_nt has a case for each smaller token count");

AVX2 static void matmul_f32_avx2(float *out, const float *x, const float *w, int T, int n, int d,
                                 int r0, int r1) {
    if (T == 1) {
        for (int i = r0; i < r1; i++) out[i] = dot_f32_avx2(w + (size_t)i * n, x, n);
        return;
    }
    int pieces = (n + F_SPAN - 1) / F_SPAN, span = ((n + pieces - 1) / pieces + 7) / 8 * 8;
    for (int j0 = 0; j0 < n; j0 += span) {
        int j1 = j0 + span < n ? j0 + span : n;
        for (int i = r0; i < r1; i += F_ROWS) { /* rows outer: they stay in L1 */
            const float *rows[F_ROWS]; /* past r1, the last row again (computed, not stored) */
            for (int r = 0; r < F_ROWS; r++) rows[r] = w + (size_t)(i + r < r1 ? i + r : r1 - 1) * n;
            int nr = r1 - i < F_ROWS ? r1 - i : F_ROWS;
            for (int t = 0, k = 0; t < T; t += F2_TOKENS, k++) {
                /* tile k < F_ROWS also fetches row k of the next rows */
                const float *ahead = k < F_ROWS && i + F_ROWS + k < r1 ? rows[k] + (size_t)F_ROWS * n : rows[0];
                float *o = out + (size_t)t * d + i;
                if (T - t >= F2_TOKENS)
                    tile_f32_avx2(o, d, x + (size_t)t * n, F2_TOKENS, rows, n, j0, j1, nr, ahead);
                else
                    tile_f32_avx2_nt(o, d, x + (size_t)t * n, T - t, rows, n, j0, j1, nr, ahead);
            }
        }
    }
}

/* nr rows of int8 w times one token x, 32 values at a time (gs is a multiple of 32).
 * maddubs multiplies unsigned by signed bytes, so x's sign moves onto w (Q8_0 values are
 * never -128, so negating them is safe) and |x| is the unsigned side. */
AVX2 static inline void rows_q8_avx2(float *out, const int8_t *xq, const float *xs,
                                     const int8_t *wq, const float *ws, int n, int gs, int nr) {
    int ng = n / gs;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[ROWS];
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m256i isum[ROWS];
        for (int r = 0; r < nr; r++) isum[r] = _mm256_setzero_si256();
        for (int j = g * gs; j < (g + 1) * gs; j += 32) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + j));
            __m256i ax = _mm256_sign_epi8(xv, xv);
            for (int r = 0; r < nr; r++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(wq + (size_t)r * n + j));
                __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv));
                isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(pairs, ones));
            }
        }
        for (int r = 0; r < nr; r++) {
            __m256 scale = _mm256_set1_ps(ws[(size_t)r * ng + g] * xs[g]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), scale, acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r] = hsum8(acc[r]);
}

AVX2 static void matmul_q8_avx2(float *out, const Q8Act *x, const Q8Mat *w, int T, int n, int d,
                                int gs, int r0, int r1) {
    if (gs % 32) { /* groups narrower than a vector: the plain loop */
        matmul_q8_portable(out, x, w, T, n, d, gs, r0, r1);
        return;
    }
    size_t ng = n / gs;
    for (int i = r0; i < r1; i += ROWS) {
        int nr = r1 - i < ROWS ? r1 - i : ROWS;
        const int8_t *wq = w->q + (size_t)i * n;
        const float *ws = w->s + i * ng;
        for (int t = 0; t < T; t++) {
            float *o = out + (size_t)t * d + i;
            const int8_t *xq = x->q + (size_t)t * n;
            if (nr == ROWS)
                rows_q8_avx2(o, xq, x->s + t * ng, wq, ws, n, gs, ROWS);
            else
                rows_q8_avx2(o, xq, x->s + t * ng, wq, ws, n, gs, nr);
        }
    }
}

static const Kernels AVX2_KERNELS = {"avx2", matmul_f32_avx2, matmul_q8_avx2, quantize_q8, NULL, NULL};

/* ---- AVX-512 (F, BW, VL) with VNNI ---- */

#define AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))

AVX512 static float dot_f32_avx512(const float *w, const float *x, int n) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    int j = 0;
    for (; j + 64 <= n; j += 64)
        for (int u = 0; u < 4; u++)
            acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16 * u),
                                     _mm512_loadu_ps(x + j + 16 * u), acc[u]);
    for (; j < n; j += 16) { /* the rest, the last piece with masked loads */
        __mmask16 m = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
        acc[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + j), _mm512_maskz_loadu_ps(m, x + j),
                                 acc[0]);
    }
    return _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

/* Prefill multiplies a tile of F_TOKENS tokens by F_ROWS rows at a time, with a sum in a
 * register for each pair (24 independent FMA chains): each weight vector loaded serves
 * F_TOKENS FMAs and each x vector F_ROWS. Rows longer than F_SPAN values are taken in pieces,
 * so that a tile's rows and tokens fit in L1 together. (6 x 4 measured 10% faster than
 * 4 x 4, and 7 x 4 slower: out of registers.) */
#define F_TOKENS 6

/* Per 128-bit lane, [a b c d]: the sums of that lane's values of a, b, c and d. */
AVX512 static inline __m512 sum4_lanes(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    return _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
}

/* Lane u of the result: the sum of v[u]'s four lanes (pairs of lanes added, twice). */
AVX512 static inline __m512 sum_lanes(const __m512 v[4]) {
    enum { even = _MM_SHUFFLE(2, 0, 2, 0), odd = _MM_SHUFFLE(3, 1, 3, 1) }; /* immediates, even at -O0 */
    __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], even), _mm512_shuffle_f32x4(v[0], v[1], odd));
    __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], even), _mm512_shuffle_f32x4(v[2], v[3], odd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, even), _mm512_shuffle_f32x4(x, y, odd));
}

/* Values j0..j1-1 of the rows w[0..F_ROWS) times those of the tokens x[0..nt) (rows n apart):
 * token u's sums go to out[u * d ..], the rows `keep` selects, added to what is there unless
 * j0 is 0. Meanwhile values j0..j1-1 of the row `ahead` are fetched into the cache. Always
 * inlined, so that each constant nt gets a loop with acc[][] in registers. */
AVX512 __attribute__((always_inline)) static inline void
tile_f32_avx512(float *out, size_t d, const float *x, int nt, const float *const w[F_ROWS], int n,
                int j0, int j1, __mmask8 keep, const float *ahead) {
    __m512 acc[F_TOKENS][F_ROWS];
    for (int u = 0; u < nt; u++)
        for (int r = 0; r < F_ROWS; r++) acc[u][r] = _mm512_setzero_ps();
    /* The last piece with masked loads. (An unmasked main loop, with a masked one after it,
     * measured half as fast: gcc then spilled acc[][].) */
    for (int j = j0; j < j1; j += 16) {
        __mmask16 m = j1 - j >= 16 ? 0xffff : (__mmask16)((1u << (j1 - j)) - 1);
        _mm_prefetch((const char *)(ahead + j), _MM_HINT_T0);
        __m512 wv[F_ROWS];
        for (int r = 0; r < F_ROWS; r++) wv[r] = _mm512_maskz_loadu_ps(m, w[r] + j);
        for (int u = 0; u < nt; u++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x + (size_t)u * n + j);
            for (int r = 0; r < F_ROWS; r++) acc[u][r] = _mm512_fmadd_ps(wv[r], xv, acc[u][r]);
        }
    }
    __m512 lanes[8]; /* token u's F_ROWS sums, per lane; then 4 tokens' sums per vector */
    for (int u = 0; u < 8; u++) lanes[u] = _mm512_setzero_ps();
    for (int u = 0; u < nt; u++) lanes[u] = sum4_lanes(acc[u][0], acc[u][1], acc[u][2], acc[u][3]);
    float sums[8 * F_ROWS]; /* token u's at sums + u * F_ROWS (through memory: extracting lane
                             * u % 4 of a register needs u constant, which -O1 leaves it not) */
    _mm512_storeu_ps(sums, sum_lanes(lanes));
    _mm512_storeu_ps(sums + 16, sum_lanes(lanes + 4));
    for (int u = 0; u < nt; u++) {
        __m128 s = _mm_loadu_ps(sums + u * F_ROWS);
        if (j0) s = _mm_add_ps(s, _mm_maskz_loadu_ps(keep, out + u * d));
        _mm_mask_storeu_ps(out + u * d, keep, s);
    }
}

/* tile_f32_avx512 with nt (1..F_TOKENS - 1: a batch's last tokens) as a constant. */
AVX512 static void tile_f32_avx512_nt(float *out, size_t d, const float *x, int nt,
                                      const float *const w[F_ROWS], int n, int j0, int j1,
                                      __mmask8 keep, const float *ahead) {
    switch (nt) {
    case 5: tile_f32_avx512(out, d, x, 5, w, n, j0, j1, keep, ahead); break;
    case 4: tile_f32_avx512(out, d, x, 4, w, n, j0, j1, keep, ahead); break;
    case 3: tile_f32_avx512(out, d, x, 3, w, n, j0, j1, keep, ahead); break;
    case 2: tile_f32_avx512(out, d, x, 2, w, n, j0, j1, keep, ahead); break;
    case 1: tile_f32_avx512(out, d, x, 1, w, n, j0, j1, keep, ahead); break;
    }
}
_Static_assert(F_TOKENS == 6, "tile_f32_avx512_nt has a case for each smaller token count");

AVX512 static void matmul_f32_avx512(float *out, const float *x, const float *w, int T, int n,
                                     int d, int r0, int r1) {
    if (T == 1) {
        for (int i = r0; i < r1; i++) out[i] = dot_f32_avx512(w + (size_t)i * n, x, n);
        return;
    }
    int pieces = (n + F_SPAN - 1) / F_SPAN, span = ((n + pieces - 1) / pieces + 15) / 16 * 16;
    for (int j0 = 0; j0 < n; j0 += span) {
        int j1 = j0 + span < n ? j0 + span : n;
        /* Rows outer, tokens inner: F_ROWS rows stay in L1 while all the tokens pass by. */
        for (int i = r0; i < r1; i += F_ROWS) {
            const float *rows[F_ROWS]; /* past r1, the last row again (computed, not stored) */
            for (int r = 0; r < F_ROWS; r++) rows[r] = w + (size_t)(i + r < r1 ? i + r : r1 - 1) * n;
            __mmask8 keep = r1 - i >= F_ROWS ? 0xf : (__mmask8)((1u << (r1 - i)) - 1);
            for (int t = 0, k = 0; t < T; t += F_TOKENS, k++) {
                /* Tile k < F_ROWS also fetches row k of the next rows, which would otherwise
                 * come from memory at their first tile, with the FMA units waiting. */
                const float *ahead = k < F_ROWS && i + F_ROWS + k < r1 ? rows[k] + (size_t)F_ROWS * n : rows[0];
                float *o = out + (size_t)t * d + i;
                if (T - t >= F_TOKENS) /* (through tile_f32_avx512_nt's switch, 2.4x slower:
                                        * gcc then stored acc[][] to the stack at every step) */
                    tile_f32_avx512(o, d, x + (size_t)t * n, F_TOKENS, rows, n, j0, j1, keep, ahead);
                else
                    tile_f32_avx512_nt(o, d, x + (size_t)t * n, T - t, rows, n, j0, j1, keep, ahead);
            }
        }
    }
}

/* quantize_q8, 16 values at a time, with the same operations in the same order, so the
 * same bytes and scales (the compiler's own vectorisation of it, sized for 64 int8
 * lanes, leaves groups of 32 to its scalar tail). NaN is ignored by the max and clamped
 * to -127, as there: vmaxps returns its second operand when either is NaN. */
AVX512 static void quantize_q8_avx512(int8_t *q, float *s, int32_t *sum, const float *x, int n,
                                      int gs) {
    if (gs % 16) {
        quantize_q8(q, s, sum, x, n, gs);
        return;
    }
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
        int8_t *qg = q + (size_t)g * gs;
        __m512 amax = _mm512_setzero_ps();
        for (int i = 0; i < gs; i += 16)
            amax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xg + i)), amax);
        float scale = _mm512_reduce_max_ps(amax) / 127.0f;
        __m512 inv = _mm512_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
        __m512i total = _mm512_setzero_si512();
        for (int i = 0; i < gs; i += 16) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xg + i), inv);
            v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
            __mmask16 pos = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ);
            v = _mm512_add_ps(v, _mm512_mask_blend_ps(pos, _mm512_set1_ps(-0.5f), _mm512_set1_ps(0.5f)));
            __m512i vi = _mm512_cvttps_epi32(v);
            _mm_storeu_si128((__m128i *)(qg + i), _mm512_cvtepi32_epi8(vi));
            total = _mm512_add_epi32(total, vi);
        }
        s[g] = scale;
        sum[g] = _mm512_reduce_add_epi32(total);
    }
}

/* The avx512 int8 layout puts 16 rows side by side, one per 32-bit lane, so that a single
 * dpbusd computes 4 products for each of 16 rows and a group's sums end up one per lane,
 * with no horizontal additions. For each block of 16 rows (the last padded with zero
 * rows), for each group: its values, [gs / 4][16 rows][4], then its scales, [16 rows], so
 * that a block is read front to back in one stream.
 *
 * dpbusd multiplies unsigned by signed bytes: the weights are stored as w + 128 (0..255)
 * and x stays signed, so each group's sum is off by 128 * sum(x), which quantize_q8 has
 * computed. */
#define BLOCK 16 /* = KERNEL_ROWS */
#define T_STEP KERNEL_TOKENS /* tokens per pass in prefill: each weight vector loaded serves this many */

static size_t group_bytes(int gs) { return BLOCK * ((size_t)gs + sizeof(float)); }
static size_t block_bytes(int n, int gs) { return (size_t)(n / gs) * group_bytes(gs); }

static size_t packed_size_avx512(int d, int n, int gs) {
    if (gs % 4) return 0; /* dpbusd takes 4 values at a time */
    return (size_t)(d + BLOCK - 1) / BLOCK * block_bytes(n, gs);
}

static void pack_q8_avx512(void *dst, const Q8Mat *w, int d, int n, int gs) {
    size_t ng = n / gs;
    for (int b = 0; b < (d + BLOCK - 1) / BLOCK; b++) {
        for (size_t g = 0; g < ng; g++) {
            uint8_t *v = (uint8_t *)dst + b * block_bytes(n, gs) + g * group_bytes(gs);
            float *s = (float *)(v + (size_t)BLOCK * gs);
            for (int r = 0; r < BLOCK; r++) {
                int row = b * BLOCK + r;
                for (int j = 0; j < gs; j++) /* w + 128 as a byte is w ^ 0x80 */
                    v[(size_t)(j / 4) * 4 * BLOCK + r * 4 + j % 4] =
                        row < d ? (uint8_t)w->q[(size_t)row * n + g * gs + j] ^ 0x80 : 0x80;
                s[r] = row < d ? w->s[row * ng + g] : 0.0f;
            }
        }
    }
}

/* One block of 16 rows times nt tokens (nt <= T_STEP), writing the rows `keep` selects.
 * dpbusd takes a few cycles to produce its sum, so each group's sum is split among
 * T_STEP / nt accumulators: T_STEP independent chains in all. The block is read front to
 * back, one stream (decoding several blocks at once, several streams, measured slower:
 * 211 against 98 us for a 55296 x 288 classifier on 2 threads). */
AVX512 __attribute__((always_inline)) static inline void
block_q8_avx512(float *out, size_t d, const Q8Act *x, int t0, int nt, const uint8_t *v, int n,
                int gs, __mmask16 keep) {
    int ng = n / gs, chains = T_STEP / nt;
    __m512 acc[T_STEP];
    for (int u = 0; u < nt; u++) acc[u] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m512i isum[T_STEP][T_STEP]; /* [token][chain] */
        for (int u = 0; u < nt; u++)
            for (int c = 0; c < chains; c++) isum[u][c] = _mm512_setzero_si512();
        const uint8_t *vg = v + g * group_bytes(gs);
        for (int j = 0; j < gs; j += 4 * chains) {
            for (int c = 0; c < chains && j + 4 * c < gs; c++) {
                __m512i wv = _mm512_load_si512(vg + (size_t)(j + 4 * c) * BLOCK);
                for (int u = 0; u < nt; u++) {
                    int32_t four; /* x[j..j+3] of token u, broadcast to every row */
                    memcpy(&four, x->q + (size_t)(t0 + u) * n + g * gs + j + 4 * c, 4);
                    isum[u][c] = _mm512_dpbusd_epi32(isum[u][c], wv, _mm512_set1_epi32(four));
                }
            }
        }
        __m512 ws = _mm512_load_ps((const float *)(vg + (size_t)BLOCK * gs));
        for (int u = 0; u < nt; u++) {
            size_t tg = (size_t)(t0 + u) * ng + g;
            __m512i sum = _mm512_set1_epi32(-128 * x->sum[tg]);
            for (int c = 0; c < chains; c++) sum = _mm512_add_epi32(sum, isum[u][c]);
            __m512 scale = _mm512_mul_ps(ws, _mm512_set1_ps(x->s[tg]));
            acc[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[u]);
        }
    }
    for (int u = 0; u < nt; u++) _mm512_mask_storeu_ps(out + (size_t)(t0 + u) * d, keep, acc[u]);
}

AVX512 static void matmul_q8_avx512(float *out, const Q8Act *x, const Q8Mat *w, int T, int n,
                                    int d, int gs, int r0, int r1) {
    if (!w->packed) { /* a group size the layout does not take */
        matmul_q8_avx2(out, x, w, T, n, d, gs, r0, r1);
        return;
    }
    size_t stride = block_bytes(n, gs);
    for (int i = r0; i < r1; i += BLOCK) {
        const uint8_t *v = (const uint8_t *)w->packed + (size_t)(i / BLOCK) * stride;
        __mmask16 keep = r1 - i >= BLOCK ? 0xffff : (__mmask16)((1u << (r1 - i)) - 1);
        int t = 0; /* constant token counts keep acc[] and isum[] in registers */
        for (; t + T_STEP <= T; t += T_STEP) block_q8_avx512(out + i, d, x, t, T_STEP, v, n, gs, keep);
        for (; t < T; t++) block_q8_avx512(out + i, d, x, t, 1, v, n, gs, keep);
    }
}

static const Kernels AVX512_KERNELS = {"avx512", matmul_f32_avx512, matmul_q8_avx512,
                                       quantize_q8_avx512,
                                       packed_size_avx512, pack_q8_avx512};

static int has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static int has_avx512(void) {
    return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

#endif /* L2_X86 */

const Kernels *kernels_select(const char *name, char *err) {
#ifdef L2_X86
    if (!name) return has_avx512() ? &AVX512_KERNELS : has_avx2() ? &AVX2_KERNELS : &PORTABLE;
    if (!strcmp(name, "avx512")) {
        if (has_avx512()) return &AVX512_KERNELS;
        set_err(err, "kernel avx512: this CPU lacks AVX-512 F/BW/VL/VNNI");
        return NULL;
    }
    if (!strcmp(name, "avx2")) {
        if (has_avx2()) return &AVX2_KERNELS;
        set_err(err, "kernel avx2: this CPU lacks AVX2/FMA");
        return NULL;
    }
#endif
    if (!name || !strcmp(name, "portable")) return &PORTABLE;
    set_err(err, "unknown kernel '%s' (portable, avx2 or avx512)", name);
    return NULL;
}
