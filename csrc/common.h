/* common.h - small helpers shared by the engine's files (not part of the public API). */
#ifndef L2_COMMON_H
#define L2_COMMON_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>

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

/* In place; subtracting the max keeps expf from overflowing. */
static inline void softmax(float *x, int size) {
    float max_val = x[0];
    for (int i = 1; i < size; i++)
        if (x[i] > max_val) max_val = x[i];
    float sum = 0.0f;
    for (int i = 0; i < size; i++) {
        x[i] = expf(x[i] - max_val);
        sum += x[i];
    }
    for (int i = 0; i < size; i++) x[i] /= sum;
}

#endif
