/* quant.h - int8 group quantization and the matmul kernels (private to the engine).
 *
 * A matmul here multiplies T token vectors at once: out (T, d) = x (T, n) @ W^T, with W
 * stored as d rows of n. Doing T tokens per pass reads each weight once for all of them,
 * which is what makes prefill fast; decoding is T = 1. A kernel computes the rows
 * r0..r1-1 only, so that threads can split the rows among themselves; out[t * d + i] is
 * row i's dot product with token t.
 */
#ifndef L2_QUANT_H
#define L2_QUANT_H

#include <stddef.h>
#include <stdint.h>

/* Activations of T tokens (rows n wide), quantized by quantize_q8. */
typedef struct {
    int8_t *q;    /* (T, n) */
    float *s;     /* (T, n / gs): scales */
    int32_t *sum; /* (T, n / gs): each group's sum of q */
} Q8Act;

/* An int8 matrix of d rows by n. */
typedef struct {
    const int8_t *q;    /* (d, n): values, in the file's layout */
    const float *s;     /* (d, n / gs): scales */
    const void *packed; /* the same rearranged by the kernel set's pack_q8, or NULL */
} Q8Mat;

typedef struct {
    const char *name; /* "portable", "avx2", "avx512" */
    /* W in float32. */
    void (*matmul_f32)(float *out, const float *x, const float *w, int T, int n, int d, int r0,
                       int r1);
    /* W in int8 with a float32 scale per group of gs consecutive values (gs divides n). */
    void (*matmul_q8)(float *out, const Q8Act *x, const Q8Mat *w, int T, int n, int d, int gs,
                      int r0, int r1);
    /* quantize_q8, or a faster equivalent giving the same bytes and scales. */
    void (*quantize)(int8_t *q, float *s, int32_t *sum, const float *x, int n, int gs);
    /* For a kernel set that reads int8 weights in a layout of its own: the bytes that
     * pack_q8 writes for a (d, n) matrix (0: not for this group size; then matmul_q8 reads
     * the file's layout), and pack_q8. NULL for the others. */
    size_t (*packed_size)(int d, int n, int gs);
    void (*pack_q8)(void *dst, const Q8Mat *w, int d, int n, int gs);
} Kernels;

/* Row ranges start at multiples of this (the avx512 layout keeps 16 rows together). */
#define KERNEL_ROWS 16
/* Tokens the int8 kernels take per pass in prefill: a thread's share of a batch starts at a
 * multiple of this. */
#define KERNEL_TOKENS 8

/* The kernels called `name`, or with name NULL the fastest this CPU runs; NULL with err set
 * when the name is unknown or this CPU lacks the instructions. */
const Kernels *kernels_select(const char *name, char *err);

/* Q8_0, as llama2.c's runq quantizes activations: per group of gs values (gs divides n),
 * scale = max|x| / 127 and q = x / scale rounded, so q lies in [-127, 127]. Also writes
 * each group's sum of q (which the avx512 kernels need). */
void quantize_q8(int8_t *q, float *s, int32_t *sum, const float *x, int n, int gs);

#endif
