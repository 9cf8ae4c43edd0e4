/* quant4.h - the 4-bit matmul kernels of model.bin version 3 (private to the engine).
 *
 * A 4-bit matrix of d rows by n holds per group of gs consecutive values of a row (gs even,
 * dividing n) an fp16 scale and an fp16 min: value = scale * q + min, q unsigned 0..15, two
 * to a byte (the even value in the low nibble). Activations are quantized by quantize_q8 in
 * groups of the same gs; a group's dot product is then
 *     s_x * (scale * sum(q * q_x) + min * sum(q_x)),
 * an exact integer sum and the activation group's own sum (Q8Act.sum). The calling
 * convention is quant.h's: T tokens, rows r0..r1-1.
 */
#ifndef L2_QUANT4_H
#define L2_QUANT4_H

#include <stddef.h>
#include <stdint.h>

#include "quant.h"

typedef struct {
    const uint8_t *q;   /* (d, n / 2): the file's packed values */
    const uint8_t *s;   /* (d, n / gs) fp16 scales, little-endian, maybe at odd addresses */
    const uint8_t *m;   /* (d, n / gs) fp16 mins, likewise */
    const void *packed; /* the same rearranged by the kernel set's pack_q4, or NULL */
} Q4Mat;

typedef struct {
    const char *name; /* that of the int8 set it goes with: "portable", "avx2", "avx512" */
    void (*matmul_q4)(float *out, const Q8Act *x, const Q4Mat *w, int T, int n, int d, int gs,
                      int r0, int r1);
    /* For a set that reads a layout of its own: the bytes pack_q4 writes for a (d, n) matrix
     * (0: not for this group size; then matmul_q4 reads the file's layout), and pack_q4. NULL
     * for the others. */
    size_t (*packed_size)(int d, int n, int gs);
    void (*pack_q4)(void *dst, const Q4Mat *w, int d, int n, int gs);
} Q4Kernels;

/* The 4-bit kernels of the int8 set called `name` (kernels_select's). */
const Q4Kernels *kernels4_select(const char *name);

/* IEEE half precision (the bits, as stored) to float, exactly. */
float f16_to_f32(uint16_t h);

/* Value i of an array of fp16 at any address. */
static inline uint16_t f16_at(const uint8_t *p, size_t i) {
    return (uint16_t)(p[2 * i] | p[2 * i + 1] << 8);
}

/* Row `row` of w (n wide) in float32. */
void dequantize_q4_row(float *x, const Q4Mat *w, size_t row, int n, int gs);

#endif
