/* common.h - small helpers shared by the engine's files (not part of the public API). */
#ifndef L2_COMMON_H
#define L2_COMMON_H

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "llama2.h"

/* Writes a one-line message into err (L2_ERR_SIZE bytes), whatever a file name contains. */
static inline void set_err(char *err, const char *fmt, ...) {
    if (!err) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, L2_ERR_SIZE, fmt, ap);
    va_end(ap);
    for (char *p = err; *p; p++)
        if (*p == '\n' || *p == '\r') *p = ' ';
}

/* e^x within about 1 ulp, in multiply-adds that the compiler vectorises (libm's expf is a
 * call per value, which dominated softmax and SwiGLU). x = n ln2 + r, |r| <= ln2 / 2: e^r
 * by its Taylor series to r^7 (error < 1e-8), 2^n built in the exponent bits. x is
 * clamped to [-87.3, 88.3], where 2^n stays a normal float; NaN stays NaN. */
static inline float exp_fast(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    const float round = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x * 1.44269504f + round, n = t - round;
    float r = x - n * 0.693145752f - n * 1.42860677e-6f; /* ln 2 in two parts: n * hi is exact */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    uint32_t bits;
    memcpy(&bits, &t, sizeof(bits)); /* n sits in the low bits of t's mantissa */
    bits = (bits - 0x4B400000u + 127u) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof(two_n));
    return p * two_n;
}

/* In place; subtracting the max keeps the exponentials in range. */
static inline void softmax(float *x, int size) {
    float max_val = x[0];
#pragma omp simd reduction(max : max_val)
    for (int i = 0; i < size; i++) max_val = x[i] > max_val ? x[i] : max_val;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < size; i++) {
        x[i] = exp_fast(x[i] - max_val);
        sum += x[i];
    }
    float inv = 1.0f / sum;
#pragma omp simd
    for (int i = 0; i < size; i++) x[i] *= inv;
}

#endif
