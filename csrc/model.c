/* model.c - model.bin loading (mmap, validated) and the forward pass.
 *
 * The forward pass is llama2.c's, generalised to a batch of T tokens: runs of consecutive
 * positions of one or more sequences, each with its own KV cache (see Span). Decoding one
 * sequence runs T = 1: every weight is streamed from memory once per token, so it is
 * memory-bound, and int8 weights (version 2) are 4x less to stream. Prefill runs the prompt
 * in batches, and a batch step (L2Batch) one token of each of several sequences: each weight
 * is read once per batch and reused for every token, so they go towards compute-bound. Either
 * way the time goes in the matmuls (quant.c); everything else, attention aside, is small.
 */
#define _GNU_SOURCE /* sched_getaffinity */
#include "llama2.h"
#include "common.h"
#include "quant.h"
#include "quant4.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
static int omp_get_max_threads(void) { return 1; }
#endif

#define AK42_MAGIC 0x616b3432u /* "ak42" read as a little-endian uint32 */
#define V0_HEADER_BYTES 28     /* 7 int32 */
#define V1_HEADER_BYTES 256    /* also version 2's */
#define V2_GROUP_OFFSET 37     /* int32 group size, right after the shared_classifier byte */
#define V3_EMBEDDING_OFFSET 41 /* version 3: uint8 embedding bits, then int32 the int8 group size */
#define V3_INT8_LAYERS_OFFSET 46 /* version 3: then 128 bytes, a bit per layer: int8 layers */

#define PREFILL_CHUNK 128 /* tokens per batch: bounds the batch buffers (see batch_rows) */
#define KEY_BLOCK 32      /* positions a query is scored against per pass (see attend) */
#define QUERY_BLOCK 4     /* queries of one head scored together in prefill (see attend) */
#define VALUE_TILE 16     /* dimensions of the value sums kept in registers (see attend) */
#define SPLIT_TOKENS 16   /* batches with this many tokens per thread are shared by tokens (see Share) */
#define NORM_ROWS 8       /* rows normalised side by side (see rmsnorm) */
#define SOFTMAX_STEP 16   /* attention's softmax runs over multiples of this (see attend) */
_Static_assert(KEY_BLOCK % SOFTMAX_STEP == 0, "a score row's room is a multiple of SOFTMAX_STEP");

/* A weight matrix of d rows by n: float32; int8 with a float32 scale per group of gs
 * consecutive values (version 2, when gs divides n; the others, whose groups straddle rows,
 * are dequantized at load: see load_quantized); or 4-bit with an fp16 scale and min per
 * group (version 3, whose embedding and classifier may be int8). Its activations are
 * quantized in groups of gs (0: float32, not quantized). */
typedef struct {
    const float *f; /* (d, n), when float32 */
    Q8Mat q8;       /* when int8 (q8.q not NULL) */
    Q4Mat q4;       /* when 4-bit (q4.q not NULL) */
    int d, n, gs;
} Mat;

enum { WQ, WK, WV, WO, W1, W2, W3, N_KINDS }; /* the matrices of a layer, in file order */

typedef struct {
    const float *rms_att;   /* (layer, dim) */
    const float *rms_ffn;   /* (layer, dim) */
    const float *rms_final; /* (dim) */
    Mat token_embedding;    /* (vocab, dim) */
    Mat *layer[N_KINDS];    /* layer[WQ][l] is layer l's wq: (dim, dim); wk, wv (kv_dim, dim);
                               wo (dim, dim); w1, w3 (hidden, dim); w2 (dim, hidden) */
    Mat wcls;               /* (vocab, dim) */
} Weights;

/* A matmul's input (see prepare): normed (T, dim), and for quantized weights quantized
 * (T, max(dim, hidden_dim)). Each thread has its own, for decoding; a batch's is shared. */
typedef struct {
    float *xn;
    Q8Act xq;
} ThreadBuffers;

/* One sequence's keys and values: (layer, kv head, key_blocks, head_size, KEY_BLOCK) (see
 * attend) and (layer, seq_len, kv_dim). */
typedef struct {
    float *key_cache;
    float *value_cache;
} KVCache;

/* Buffers for a batch of up to batch_rows() tokens; row t belongs to token t. */
typedef struct {
    float *x;      /* the residual stream (T, dim) */
    float *xb;     /* the attention output (T, dim) */
    float *xb2;    /* a matmul's output, to add to x (T, dim) */
    float *hb;     /* SwiGLU hidden (T, hidden_dim) */
    float *hb2;    /* SwiGLU hidden (T, hidden_dim) */
    float *q;      /* queries (T, dim) */
    float *k;      /* the batch's keys (T, kv_dim), on their way into the caches */
    float *v;      /* the batch's values (T, kv_dim), likewise */
    float *rope;   /* cos, sin of each pair's angle at each token's position (T, head_size) */
    float *att;    /* attention scores (n_heads, QUERY_BLOCK, att_stride) */
    float *logits; /* (vocab_size) */
    ThreadBuffers *mine; /* one per thread */
    int n_mine;
} RunState;

struct L2Model {
    L2Config cfg;
    Weights w;
    RunState s;     /* shared by the model's own sequence and its batches' */
    KVCache kv;     /* the single-sequence API's cache */
    const Kernels *kernels;
    const Q4Kernels *kernels4; /* the 4-bit ones of the same set */
    int n_threads;
    Mat *mats;      /* the storage of w.layer */
    float *scales;  /* aligned copies of the int8 scales, when the file leaves them unaligned */
    float *dequantized; /* the int8 matrices whose groups straddle rows, in float32 */
    void *packed;   /* quantized weights in the kernels' own layout, when they have one */
    void *map;
    size_t map_size;
};


static int32_t read_i32(const unsigned char *p) {
    int32_t v;
    memcpy(&v, p, 4); /* the header is little-endian, as is every target */
    return v;
}

/* Whether version 3 keeps layer l's matrices int8. */
static int int8_layer(const L2Config *c, int l) {
    return c->version == 3 && l < 8 * (int)sizeof c->int8_layers && (c->int8_layers[l / 8] >> (l % 8) & 1);
}

/* Reads the header into cfg and returns the header size in bytes, or -1. */
static long parse_header(const char *path, const unsigned char *p, size_t size,
                         L2Config *cfg, char *err) {
    if (size < 8) {
        set_err(err, "%s: %zu bytes, too small to be a model.bin", path, size);
        return -1;
    }
    long header;
    const unsigned char *params;
    if ((uint32_t)read_i32(p) == AK42_MAGIC) {
        int version = read_i32(p + 4);
        if (version < 1 || version > 3) {
            set_err(err, "%s: unsupported model.bin version %d", path, version);
            return -1;
        }
        if (size < V1_HEADER_BYTES) {
            set_err(err, "%s: %zu bytes, too small for a version %d header", path, size, version);
            return -1;
        }
        header = V1_HEADER_BYTES;
        params = p + 8;
        cfg->version = version;
        unsigned shared = p[36];
        if (shared > 1) {
            set_err(err, "%s: shared_classifier flag is %u, not 0 or 1", path, shared);
            return -1;
        }
        cfg->shared_classifier = (int)shared;
        if (version >= 2) cfg->group_size = read_i32(p + V2_GROUP_OFFSET);
        if (version == 3) {
            cfg->embedding_bits = p[V3_EMBEDDING_OFFSET];
            cfg->int8_group_size = read_i32(p + V3_EMBEDDING_OFFSET + 1);
            memcpy(cfg->int8_layers, p + V3_INT8_LAYERS_OFFSET, sizeof cfg->int8_layers);
        }
    } else {
        if (size < V0_HEADER_BYTES) {
            set_err(err, "%s: %zu bytes, too small to be a model.bin", path, size);
            return -1;
        }
        header = V0_HEADER_BYTES;
        params = p;
        cfg->version = 0;
    }
    /* the seven llama2.c parameters, range-checked in 64 bits */
    static const char *names[7] = {"dim", "hidden_dim", "n_layers", "n_heads",
                                   "n_kv_heads", "vocab_size", "seq_len"};
    static const long long maxima[7] = {1 << 16, 1 << 20, 1 << 10, 1 << 16,
                                        1 << 16, 1 << 24, 1 << 20};
    long long v[7];
    for (int i = 0; i < 7; i++) v[i] = read_i32(params + 4 * i);
    if (cfg->version == 0) {
        /* legacy files say "unshared classifier" with a negative vocab_size */
        cfg->shared_classifier = v[5] > 0;
        if (v[5] < 0) v[5] = -v[5];
    }
    for (int i = 0; i < 7; i++) {
        if (v[i] <= 0 || v[i] > maxima[i]) {
            set_err(err, "%s: header field %s = %lld is out of range (1..%lld): not a model.bin?",
                    path, names[i], v[i], maxima[i]);
            return -1;
        }
    }
    cfg->dim = (int)v[0];
    cfg->hidden_dim = (int)v[1];
    cfg->n_layers = (int)v[2];
    cfg->n_heads = (int)v[3];
    cfg->n_kv_heads = (int)v[4];
    cfg->vocab_size = (int)v[5];
    cfg->seq_len = (int)v[6];
    if (cfg->n_kv_heads > cfg->n_heads || cfg->n_heads % cfg->n_kv_heads) {
        set_err(err, "%s: n_heads %d is not a multiple of n_kv_heads %d", path,
                cfg->n_heads, cfg->n_kv_heads);
        return -1;
    }
    if (cfg->dim % cfg->n_heads || (cfg->dim / cfg->n_heads) % 2) {
        set_err(err, "%s: dim %d over n_heads %d does not give an even head size", path,
                cfg->dim, cfg->n_heads);
        return -1;
    }
    /* each matrix is a whole number of groups (llama2.c's export checks the same); a group
     * may straddle two rows */
    if (cfg->version == 2) {
        long long gs = cfg->group_size, kv_dim = v[0] / v[3] * v[4];
        long long sizes[4] = {v[5] * v[0], v[0] * v[0], kv_dim * v[0], v[1] * v[0]};
        if (gs <= 0) {
            set_err(err, "%s: group size %lld must be positive", path, gs);
            return -1;
        }
        for (int i = 0; i < 4; i++) {
            if (sizes[i] % gs) {
                set_err(err, "%s: group size %lld does not divide a weight matrix of %lld values "
                        "(dim %d, hidden_dim %d)", path, gs, sizes[i], cfg->dim, cfg->hidden_dim);
                return -1;
            }
        }
    }
    /* a 4-bit group never straddles rows (every row is dim or hidden_dim wide), and holds
     * whole bytes */
    if (cfg->version == 3) {
        int gs = cfg->group_size, bits = cfg->embedding_bits, egs = cfg->int8_group_size;
        if (gs <= 0 || gs % 2 || cfg->dim % gs || cfg->hidden_dim % gs) {
            set_err(err, "%s: group size %d must be even and divide dim %d and hidden_dim %d", path, gs,
                    cfg->dim, cfg->hidden_dim);
            return -1;
        }
        if (bits != 4 && bits != 8) {
            set_err(err, "%s: embedding_bits is %d, not 4 or 8", path, bits);
            return -1;
        }
        int int8_layers = 0, beyond = -1;
        for (int l = 0; l < 8 * (int)sizeof cfg->int8_layers; l++) {
            if (!int8_layer(cfg, l)) continue;
            if (l >= cfg->n_layers && beyond < 0) beyond = l;
            int8_layers++;
        }
        if (beyond >= 0) {
            set_err(err, "%s: layer %d is marked int8, but the model has %d layers", path, beyond,
                    cfg->n_layers);
            return -1;
        }
        if ((bits == 8 || int8_layers) && (egs <= 0 || cfg->dim % egs)) {
            set_err(err, "%s: int8 group size %d must be positive and divide dim %d", path, egs,
                    cfg->dim);
            return -1;
        }
        if (int8_layers && cfg->hidden_dim % egs) {
            set_err(err, "%s: int8 group size %d must divide hidden_dim %d (int8 layers)", path, egs,
                    cfg->hidden_dim);
            return -1;
        }
        if (bits == 4 && !int8_layers && egs) {
            set_err(err, "%s: int8 group size %d must be 0 with no int8 matrix", path, egs);
            return -1;
        }
    }
    return header;
}

/* Walks the tensors in file order. With base NULL it only counts bytes; with the mapping it
 * also points the weights into it. */
typedef struct {
    const unsigned char *base;
    uint64_t at; /* bytes so far */
    int bits;    /* of the matrices to come: 32, 8 or 4 */
    int gs;      /* their group size, when quantized */
} Cursor;

static const float *take_f32(Cursor *c, uint64_t count) {
    const float *p = c->base ? (const float *)(c->base + c->at) : NULL;
    c->at += count * sizeof(float);
    return p;
}

static void take_mat(Cursor *c, Mat *m, int d, int n) {
    uint64_t count = (uint64_t)d * n;
    m->d = d;
    m->n = n;
    m->gs = c->bits == 32 ? 0 : c->gs;
    if (c->bits == 32) {
        m->f = take_f32(c, count);
    } else if (c->bits == 8) {
        m->q8.q = c->base ? (const int8_t *)(c->base + c->at) : NULL;
        c->at += count;
        m->q8.s = take_f32(c, count / c->gs); /* possibly unaligned: load_quantized copies those */
    } else { /* the values, then the scales, then the mins (fp16, at any address) */
        const unsigned char *at = c->base ? c->base + c->at : NULL;
        m->q4 = (Q4Mat){at, at ? at + count / 2 : NULL, at ? at + count / 2 + count / c->gs * 2 : NULL, NULL};
        c->at += count / 2 + count / c->gs * 4;
    }
}

/* Version 3's layers are 4-bit in groups of group_size, except its int8 layers. */
static void take_layers(Cursor *c, const L2Config *cfg, Mat *mats, int d, int n) {
    for (int l = 0; l < cfg->n_layers; l++) {
        if (cfg->version == 3) {
            int eight = int8_layer(cfg, l);
            c->bits = eight ? 8 : 4;
            c->gs = eight ? cfg->int8_group_size : cfg->group_size;
        }
        take_mat(c, &mats[l], d, n);
    }
}

/* Version 3's embedding and unshared classifier: embedding_bits, in groups of int8_group_size
 * when int8, else of group_size. */
static void embedding_kind(Cursor *cur, const L2Config *c) {
    cur->bits = c->embedding_bits;
    cur->gs = c->embedding_bits == 8 ? c->int8_group_size : c->group_size;
}

/* Returns the bytes the tensors take. With the bounds parse_header enforces no count here
 * exceeds 2^48. */
static uint64_t map_weights(Weights *w, const L2Config *c, const unsigned char *base) {
    int dim = c->dim, hidden = c->hidden_dim, L = c->n_layers, vocab = c->vocab_size;
    int kv_dim = dim / c->n_heads * c->n_kv_heads, head_size = dim / c->n_heads;
    Cursor cur = {base, 0, c->version == 2 ? 8 : 32, c->group_size};
    if (c->version == 0) {
        take_mat(&cur, &w->token_embedding, vocab, dim);
        w->rms_att = take_f32(&cur, (uint64_t)L * dim);
    } else {
        w->rms_att = take_f32(&cur, (uint64_t)L * dim);
        w->rms_ffn = take_f32(&cur, (uint64_t)L * dim);
        w->rms_final = take_f32(&cur, dim);
        if (c->version == 3) embedding_kind(&cur, c);
        take_mat(&cur, &w->token_embedding, vocab, dim);
    }
    take_layers(&cur, c, w->layer[WQ], dim, dim);
    take_layers(&cur, c, w->layer[WK], kv_dim, dim);
    take_layers(&cur, c, w->layer[WV], kv_dim, dim);
    take_layers(&cur, c, w->layer[WO], dim, dim);
    if (c->version == 0) w->rms_ffn = take_f32(&cur, (uint64_t)L * dim);
    take_layers(&cur, c, w->layer[W1], hidden, dim);
    take_layers(&cur, c, w->layer[W2], dim, hidden);
    take_layers(&cur, c, w->layer[W3], hidden, dim);
    if (c->version == 0) {
        w->rms_final = take_f32(&cur, dim);
        /* freq_cis_real and _imag: skipped, RoPE is computed */
        take_f32(&cur, (uint64_t)c->seq_len * head_size);
    }
    if (c->shared_classifier) {
        w->wcls = w->token_embedding;
    } else {
        if (c->version == 3) embedding_kind(&cur, c);
        take_mat(&cur, &w->wcls, vocab, dim);
    }
    return cur.at;
}

/* Checks an int8 matrix: Q8_0 values lie in -127..127 (the kernels negate them) and scales
 * are finite and >= 0. Scales the file leaves unaligned (a group size that is not a multiple
 * of 4, or version 3's classifier after the 4-bit layers) are first copied to *spare. */
static int check_q8(Mat *m, float **spare, const char *path, char *err) {
    uint64_t count = (uint64_t)m->d * m->n, n_scales = count / m->gs;
    if (memchr(m->q8.q, 0x80, count)) {
        set_err(err, "%s: an int8 weight is -128: not Q8_0 (whose values lie in -127..127)", path);
        return 0;
    }
    if ((uintptr_t)m->q8.s % sizeof(float)) {
        memcpy(*spare, m->q8.s, n_scales * sizeof(float));
        m->q8.s = *spare;
        *spare += n_scales;
    }
    for (uint64_t i = 0; i < n_scales; i++) {
        if (!(m->q8.s[i] >= 0.0f && m->q8.s[i] <= 3.0e38f)) { /* also catches NaN */
            set_err(err, "%s: a quantization scale is %g, not a finite number >= 0", path,
                    (double)m->q8.s[i]);
            return 0;
        }
    }
    return 1;
}

/* Checks a 4-bit matrix: its fp16 scales and mins are finite (exponent bits not all ones). */
static int check_q4(const Mat *m, const char *path, char *err) {
    uint64_t n_groups = (uint64_t)m->d * m->n / m->gs;
    for (int k = 0; k < 2; k++) {
        const uint8_t *p = k ? m->q4.m : m->q4.s;
        for (uint64_t i = 0; i < n_groups; i++) {
            uint16_t h = f16_at(p, i);
            if ((h & 0x7c00) == 0x7c00) {
                set_err(err, "%s: a 4-bit quantization %s is %g, not a finite number", path,
                        k ? "min" : "scale", (double)f16_to_f32(h));
                return 0;
            }
        }
    }
    return 1;
}

/* The model's matrices, i < n_mats(m): the layers', the embedding, then the classifier
 * unless it is the embedding. */
static size_t n_mats(const L2Model *m) {
    return (size_t)m->cfg.n_layers * N_KINDS + 2 - m->cfg.shared_classifier;
}

static Mat *mat_at(L2Model *m, size_t i) {
    size_t n_layer_mats = (size_t)m->cfg.n_layers * N_KINDS;
    return i < n_layer_mats ? &m->mats[i] : i == n_layer_mats ? &m->w.token_embedding : &m->w.wcls;
}

/* Checks the quantized matrices (check_q8, check_q4). llama2.c's export groups each matrix
 * flattened, so a version 2 group size that does not divide a matrix's rows (its w2's 172
 * values in groups of 64) makes groups straddle rows. Activations are quantized per row, in
 * the weights' groups, so the int8 kernels cannot run such a matrix: it is dequantized to
 * float32 here, the values every reader gets (q * s, as export.read_model_bin), and runs as
 * a version 1 matrix does: exact, at 4 times the int8 size. */
static int load_quantized(L2Model *m, const char *path, char *err) {
    uint64_t n_scales = 0, n_float = 0;
    for (size_t i = 0; i < n_mats(m); i++) {
        const Mat *w = mat_at(m, i);
        if (!w->q8.q) continue;
        if ((uintptr_t)w->q8.s % sizeof(float)) n_scales += (uint64_t)w->d * w->n / w->gs;
        if (w->n % w->gs) n_float += (uint64_t)w->d * w->n;
    }
    float *spare = NULL, *f = NULL;
    if (n_scales) spare = m->scales = malloc(n_scales * sizeof(float));
    if (n_float) f = m->dequantized = malloc(n_float * sizeof(float));
    if ((n_scales && !spare) || (n_float && !f)) {
        set_err(err, "%s: out of memory for the int8 weights", path);
        return 0;
    }
    for (size_t i = 0; i < n_mats(m); i++) {
        Mat *w = mat_at(m, i);
        if (w->q4.q && !check_q4(w, path, err)) return 0;
        if (!w->q8.q) continue;
        if (!check_q8(w, &spare, path, err)) return 0;
        if (w->n % w->gs == 0) continue;
        uint64_t count = (uint64_t)w->d * w->n;
        for (uint64_t j = 0; j < count; j++) f[j] = w->q8.q[j] * w->q8.s[j / w->gs];
        w->f = f;
        w->q8 = (Q8Mat){0};
        w->gs = 0;
        f += count;
    }
    if (m->cfg.shared_classifier) m->w.wcls = m->w.token_embedding;
    return 1;
}

/* The bytes of w in its kernels' own layout; 0 when they read the file's. */
static size_t packed_bytes(const L2Model *m, const Mat *w) {
    if (w->q4.q && m->kernels4->packed_size) return m->kernels4->packed_size(w->d, w->n, w->gs);
    if (w->q8.q && m->kernels->packed_size) return m->kernels->packed_size(w->d, w->n, w->gs);
    return 0;
}

/* Copies the quantized matrices into the kernels' own layout, when they have one. The copy
 * is also the place to ask for huge pages: streamed weights then do not miss the TLB, nor
 * stop the hardware prefetcher, every 4 KiB. (The embedding keeps the file's layout: it is
 * read a row at a time.) */
static int pack_weights(L2Model *m, const char *path, char *err) {
    size_t n_layer_mats = (size_t)m->cfg.n_layers * N_KINDS, total = 0;
    for (size_t i = 0; i <= n_layer_mats; i++) { /* the layers' and the classifier */
        const Mat *w = i < n_layer_mats ? &m->mats[i] : &m->w.wcls;
        total += packed_bytes(m, w);
    }
    if (!total) return 1;
    if (posix_memalign(&m->packed, (size_t)1 << 21, total)) {
        m->packed = NULL;
        set_err(err, "%s: out of memory for the quantized weights", path);
        return 0;
    }
    madvise(m->packed, total, MADV_HUGEPAGE);
    char *at = m->packed;
    for (size_t i = 0; i <= n_layer_mats; i++) {
        Mat *w = i < n_layer_mats ? &m->mats[i] : &m->w.wcls;
        size_t size = packed_bytes(m, w);
        if (!size) continue;
        if (w->q4.q)
            w->q4.packed = at;
        else
            w->q8.packed = at;
        at += size;
    }
#pragma omp parallel for schedule(dynamic) num_threads(m->n_threads)
    for (size_t i = 0; i <= n_layer_mats; i++) {
        Mat *w = i < n_layer_mats ? &m->mats[i] : &m->w.wcls;
        if (w->q4.packed)
            m->kernels4->pack_q4((void *)w->q4.packed, &w->q4, w->d, w->n, w->gs);
        else if (w->q8.packed)
            m->kernels->pack_q8((void *)w->q8.packed, &w->q8, w->d, w->n, w->gs);
    }
    return 1;
}

/* The physical cores this process may run on. A matmul is bound by memory bandwidth or by
 * the vector units, and a core's second hyperthread adds neither. */
static int physical_cores(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
    int cores = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (!CPU_ISSET(cpu, &set)) continue;
        /* count a CPU unless a lower-numbered hyperthread sibling of it is in the set */
        char path[96], list[256];
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/thread_siblings_list",
                 cpu);
        FILE *f = fopen(path, "r");
        int counted = 1;
        if (f && fgets(list, sizeof(list), f)) {
            /* a list of ids and ranges: "0,64" or "0-1" */
            for (char *p = list; *p && counted;) {
                char *end;
                long lo = strtol(p, &end, 10), hi = lo;
                if (end == p) break;
                if (*end == '-') hi = strtol(end + 1, &end, 10);
                for (long sib = lo < 0 ? 0 : lo; sib <= hi && sib < cpu; sib++)
                    if (CPU_ISSET((int)sib, &set)) counted = 0;
                p = *end ? end + 1 : end;
            }
        }
        if (f) fclose(f);
        cores += counted;
    }
    return cores > 0 ? cores : 1;
}

static void free_thread_buffers(ThreadBuffers *mine, int n) {
    for (int i = 0; mine && i < n; i++) {
        free(mine[i].xn);
        free(mine[i].xq.q);
        free(mine[i].xq.s);
        free(mine[i].xq.sum);
    }
    free(mine);
}

/* The rows of the batch buffers: a prefill never runs more than seq_len tokens. */
static int batch_rows(const L2Config *c) { return c->seq_len < PREFILL_CHUNK ? c->seq_len : PREFILL_CHUNK; }

/* The smallest group in which activations are quantized (0: none are). */
static int min_group(const L2Config *c) {
    if (c->version == 3 && c->int8_group_size && c->int8_group_size < c->group_size)
        return c->int8_group_size;
    return c->version >= 2 ? c->group_size : 0;
}

/* Replaces the thread buffers with room for n_threads; on failure keeps the old ones. */
static int alloc_thread_buffers(RunState *s, const L2Config *c, int n_threads) {
    size_t B = batch_rows(c);
    size_t n = c->hidden_dim > c->dim ? c->hidden_dim : c->dim;
    ThreadBuffers *mine = calloc(n_threads, sizeof(ThreadBuffers));
    int ok = mine != NULL;
    for (int i = 0; ok && i < n_threads; i++) {
        ThreadBuffers *b = &mine[i];
        b->xn = malloc(B * c->dim * sizeof(float));
        ok = b->xn != NULL;
        size_t groups = min_group(c) ? n / min_group(c) : 0; /* 0: no input is quantized */
        if (ok && groups) {
            b->xq.q = malloc(B * n);
            b->xq.s = malloc(B * groups * sizeof(float));
            b->xq.sum = malloc(B * groups * sizeof(int32_t));
            ok = b->xq.q && b->xq.s && b->xq.sum;
        }
    }
    if (!ok) {
        free_thread_buffers(mine, n_threads);
        return 0;
    }
    free_thread_buffers(s->mine, s->n_mine);
    s->mine = mine;
    s->n_mine = n_threads;
    return 1;
}

int l2_model_set_threads(L2Model *m, int n_threads) {
    if (n_threads <= 0) {
        n_threads = omp_get_max_threads(); /* OMP_NUM_THREADS, when set, decides */
        if (!getenv("OMP_NUM_THREADS")) {
            int cores = physical_cores();
            if (cores < n_threads) n_threads = cores;
        }
    }
    if (n_threads > m->s.n_mine && !alloc_thread_buffers(&m->s, &m->cfg, n_threads)) return -1;
    m->n_threads = n_threads;
    return n_threads;
}

/* The key cache holds seq_len positions in blocks of KEY_BLOCK (see attend). */
static size_t key_blocks(const L2Config *c) {
    return ((size_t)c->seq_len + KEY_BLOCK - 1) / KEY_BLOCK;
}

/* A row of attention scores: room for every block of keys (see attend). */
static size_t att_stride(const L2Config *c) { return key_blocks(c) * KEY_BLOCK; }

static int alloc_state(RunState *s, const L2Config *c) {
    size_t B = batch_rows(c);
    size_t dim = c->dim, hidden = c->hidden_dim, head_size = dim / c->n_heads;
    size_t kv_dim = head_size * c->n_kv_heads;
    s->x = calloc(B * dim, sizeof(float));
    s->xb = calloc(B * dim, sizeof(float));
    s->xb2 = calloc(B * dim, sizeof(float));
    s->hb = calloc(B * hidden, sizeof(float));
    s->hb2 = calloc(B * hidden, sizeof(float));
    s->q = calloc(B * dim, sizeof(float));
    s->k = calloc(B * kv_dim, sizeof(float));
    s->v = calloc(B * kv_dim, sizeof(float));
    s->rope = calloc(B * head_size, sizeof(float));
    s->att = calloc((size_t)c->n_heads * QUERY_BLOCK * att_stride(c), sizeof(float));
    s->logits = calloc(c->vocab_size, sizeof(float));
    return s->x && s->xb && s->xb2 && s->hb && s->hb2 && s->q && s->k && s->v && s->rope && s->att &&
           s->logits;
}

/* calloc: the pages of positions a sequence never reaches are never touched. */
static int alloc_kv(KVCache *kv, const L2Config *c) {
    size_t layers = c->n_layers, kv_dim = (size_t)c->dim / c->n_heads * c->n_kv_heads;
    kv->key_cache = calloc(layers * kv_dim * att_stride(c), sizeof(float));
    kv->value_cache = calloc(layers * c->seq_len * kv_dim, sizeof(float));
    return kv->key_cache && kv->value_cache;
}

static void free_kv(KVCache *kv) {
    free(kv->key_cache);
    free(kv->value_cache);
}

static void free_state(RunState *s) {
    free(s->x);
    free(s->xb);
    free(s->xb2);
    free(s->hb);
    free(s->hb2);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->rope);
    free(s->att);
    free(s->logits);
    free_thread_buffers(s->mine, s->n_mine);
}

L2Model *l2_model_open(const char *path, char *err) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        set_err(err, "%s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        set_err(err, "%s: not a regular file", path);
        close(fd);
        return NULL;
    }
    size_t size = (size_t)st.st_size;
    if (size < V0_HEADER_BYTES) { /* also keeps mmap away from an empty file */
        set_err(err, "%s: %zu bytes, too small to be a model.bin", path, size);
        close(fd);
        return NULL;
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd); /* the mapping keeps the file */
    if (map == MAP_FAILED) {
        set_err(err, "%s: mmap failed: %s", path, strerror(errno));
        return NULL;
    }
    L2Model *m = calloc(1, sizeof(L2Model));
    if (!m) {
        set_err(err, "out of memory");
        munmap(map, size);
        return NULL;
    }
    m->map = map;
    m->map_size = size;
    long header = parse_header(path, map, size, &m->cfg, err);
    if (header < 0) goto fail;
    m->mats = calloc((size_t)m->cfg.n_layers * N_KINDS, sizeof(Mat));
    if (!m->mats) {
        set_err(err, "out of memory");
        goto fail;
    }
    for (int k = 0; k < N_KINDS; k++) m->w.layer[k] = m->mats + (size_t)k * m->cfg.n_layers;
    uint64_t expected = (uint64_t)header + map_weights(&m->w, &m->cfg, NULL);
    if ((uint64_t)size != expected) {
        set_err(err, "%s: %zu bytes, the header implies %llu (truncated or not a model.bin)",
                path, size, (unsigned long long)expected);
        goto fail;
    }
    map_weights(&m->w, &m->cfg, (const unsigned char *)map + header);
    /* the weights are streamed front to back on every token */
    madvise(map, size, MADV_WILLNEED);
    if (m->cfg.version >= 2 && !load_quantized(m, path, err)) goto fail;
    const char *kernel = getenv("LLAMA2ZH_KERNEL"); /* lets tests force each kernel set */
    m->kernels = kernels_select(kernel && *kernel ? kernel : NULL, err);
    if (!m->kernels) goto fail;
    m->kernels4 = kernels4_select(m->kernels->name);
    if (!alloc_state(&m->s, &m->cfg) || !alloc_kv(&m->kv, &m->cfg) || l2_model_set_threads(m, 0) < 0) {
        set_err(err, "%s: out of memory for the run state and KV cache", path);
        goto fail;
    }
    if (m->cfg.version >= 2 && !pack_weights(m, path, err)) goto fail;
    return m;
fail:
    l2_model_close(m);
    return NULL;
}

void l2_model_close(L2Model *m) {
    if (!m) return;
    free_state(&m->s);
    free_kv(&m->kv);
    free(m->mats);
    free(m->scales);
    free(m->dequantized);
    free(m->packed);
    munmap(m->map, m->map_size);
    free(m);
}

const L2Config *l2_model_config(const L2Model *m) { return &m->cfg; }

const char *l2_model_kernel(const L2Model *m) { return m->kernels->name; }

/* ---- the forward pass ---- */

/* rmsnorm of rows rows of x (size apart) into o. Each row's sum of squares adds up in
 * order, one value after another; NORM_ROWS rows at a time, so that their sums proceed side by
 * side instead of each addition waiting for the one before. */
static void rmsnorm(float *o, const float *x, const float *weight, int size, int rows) {
    for (int r0 = 0; r0 < rows; r0 += NORM_ROWS) {
        int nr = rows - r0 < NORM_ROWS ? rows - r0 : NORM_ROWS;
        const float *xr = x + (size_t)r0 * size;
        float ss[NORM_ROWS] = {0};
        for (int j = 0; j < size; j++)
            for (int r = 0; r < nr; r++) ss[r] += xr[(size_t)r * size + j] * xr[(size_t)r * size + j];
        for (int r = 0; r < nr; r++) {
            float inv = 1.0f / sqrtf(ss[r] / size + 1e-5f);
            float *or = o + (size_t)(r0 + r) * size;
            for (int j = 0; j < size; j++) or[j] = weight[j] * (inv * xr[(size_t)r * size + j]);
        }
    }
}

/* Part of attend: the scores of nq queries against positions u0.. in passes of `blocks`
 * blocks of keys, while every block of a pass starts before n_pos (so it is in the cache);
 * returns where it stopped. acc's row j * blocks + b holds query j's scores against the
 * pass's block b: for a single query, QUERY_BLOCK blocks at a time, as many independent
 * sums (one alone would wait on each addition). */
static inline __attribute__((always_inline)) int
scores(float *att, size_t stride, const float *q, int nq, int blocks, const float *keys, int u0,
       int n_pos, int head_size, int dim, float scale) {
    for (; u0 + (blocks - 1) * KEY_BLOCK < n_pos; u0 += blocks * KEY_BLOCK) {
        float acc[QUERY_BLOCK][KEY_BLOCK] = {{0}};
        for (int i = 0; i < head_size; i++)
            for (int b = 0; b < blocks; b++) {
                const float *k = keys + ((size_t)(u0 + b * KEY_BLOCK) * head_size + (size_t)i * KEY_BLOCK);
                for (int j = 0; j < nq; j++) {
                    float qi = q[(size_t)j * dim + i];
#pragma omp simd
                    for (int u = 0; u < KEY_BLOCK; u++) acc[j * blocks + b][u] += qi * k[u];
                }
            }
        for (int j = 0; j < nq; j++)
            for (int b = 0; b < blocks; b++)
#pragma omp simd
                for (int u = 0; u < KEY_BLOCK; u++)
                    att[j * stride + u0 + b * KEY_BLOCK + u] = acc[j * blocks + b][u] * scale;
    }
    return u0;
}

/* Part of attend: the weighted sums of the values, dimensions i0.. of nq queries, in passes of
 * `tiles` tiles of VALUE_TILE dimensions, while whole passes fit in the head; returns where it
 * stopped. The sums stay in registers while the positions stream by, and each value vector
 * loaded serves every query; acc's row j * tiles + c is query j's tile c: for a single query,
 * QUERY_BLOCK tiles at a time, as many independent sums. */
static inline __attribute__((always_inline)) int
value_sums(float *out, const float *att, size_t stride, const float *values, size_t kv_dim,
           int n_pos, int nq, int tiles, int i0, int head_size, int dim) {
    for (; i0 + tiles * VALUE_TILE <= head_size; i0 += tiles * VALUE_TILE) {
        float acc[QUERY_BLOCK][VALUE_TILE] = {{0}};
        for (int u = 0; u < n_pos; u++) {
            const float *v = values + (size_t)u * kv_dim + i0;
            for (int j = 0; j < nq; j++) {
                float a = att[j * stride + u];
                for (int c = 0; c < tiles; c++)
#pragma omp simd
                    for (int i = 0; i < VALUE_TILE; i++) acc[j * tiles + c][i] += a * v[c * VALUE_TILE + i];
            }
        }
        for (int j = 0; j < nq; j++)
            memcpy(out + (size_t)j * dim + i0, acc[j * tiles], tiles * sizeof(acc[0]));
    }
    return i0;
}

/* Attention of nq queries (QUERY_BLOCK or 1) of one head, of consecutive tokens, the last of
 * which sees positions 0..n_pos-1 (causal: query j sees n_pos - nq + 1 + j of them): the
 * scores into att (row j at att + j * att_stride), softmax, and the weighted sums of the
 * values into out (row j at out + j * dim); queries are dim apart too. The keys are stored
 * transposed within blocks of KEY_BLOCK positions: dimension i of position u at
 * keys[((u / KEY_BLOCK) * head_size + i) * KEY_BLOCK + u % KEY_BLOCK], so that scores come
 * out KEY_BLOCK positions at a time in vector registers, with no horizontal sums, from
 * one contiguous stretch of memory per block, and each key vector loaded serves all nq
 * queries. Scores past a query's own positions are computed and ignored. Values of successive
 * positions are kv_dim apart. Always inlined: with nq a constant, the sums stay in registers. */
static inline __attribute__((always_inline)) void
attend(float *out, const float *q, int nq, const float *keys, const float *values, int n_pos,
       const L2Config *p, float *att) {
    int dim = p->dim, head_size = dim / p->n_heads;
    size_t kv_dim = (size_t)head_size * p->n_kv_heads, stride = att_stride(p);
    float scale = 1.0f / sqrtf((float)head_size);
    int u0 = scores(att, stride, q, nq, QUERY_BLOCK / nq, keys, 0, n_pos, head_size, dim, scale);
    if (nq < QUERY_BLOCK) scores(att, stride, q, nq, 1, keys, u0, n_pos, head_size, dim, scale);
    for (int j = 0; j < nq; j++) {
        /* softmax over a whole number of SOFTMAX_STEPs, the scores past the query's own
         * positions set to -inf (e^-inf, clamped, is 1e-38: nothing, next to the max's 1),
         * so that it runs in vector steps alone; then those weights are 0 */
        float *a = att + j * stride;
        int n = n_pos - nq + 1 + j, padded = (n + SOFTMAX_STEP - 1) / SOFTMAX_STEP * SOFTMAX_STEP;
        for (int u = n; u < padded; u++) a[u] = -INFINITY;
        softmax(a, padded);
        memset(a + n, 0, (size_t)(n_pos - n) * sizeof(float));
    }
    int i0 = value_sums(out, att, stride, values, kv_dim, n_pos, nq, QUERY_BLOCK / nq, 0, head_size, dim);
    if (nq < QUERY_BLOCK)
        i0 = value_sums(out, att, stride, values, kv_dim, n_pos, nq, 1, i0, head_size, dim);
    for (int j = 0; j < nq; j++) /* a head_size that is no multiple of VALUE_TILE: the rest */
        for (int i = i0; i < head_size; i++) {
            float sum = 0.0f;
            for (int u = 0; u < n_pos; u++) sum += att[j * stride + u] * values[(size_t)u * kv_dim + i];
            out[(size_t)j * dim + i] = sum;
        }
}

/* A thread's share of a batch: its tokens t0..t1-1, and of each matmul's rows those that
 * matmul() gives it. By rows (by_tokens 0), every thread takes all the tokens and its share
 * of each matmul's rows, and must wait for the others after each step whose output the next
 * reads whole: nine barriers per layer (five when decoding, a batch of one). By tokens, for
 * batches with SPLIT_TOKENS or more per thread, each takes its own tokens and all the rows:
 * it reads every weight (the batch reuses each many times anyway), but its tokens stay its
 * own from one matmul to the next, and it waits for the others only around attention,
 * which reads every token's keys and values: two barriers per layer. */
typedef struct {
    int t0, t1;
    int by_tokens;
} Share;

/* Where thread k's part of lo..hi-1 begins when the team splits it evenly, in whole units
 * (k = the team's size: hi, so the last part takes what the units leave over). */
static int part_start(int lo, int hi, int k, int unit) {
    int n_threads = omp_get_num_threads();
    return k >= n_threads ? hi : lo + (int)((long long)(hi - lo) * k / n_threads) / unit * unit;
}

/* This thread's share of tokens t0..t1-1. */
static Share share(int t0, int t1) {
    int n_threads = omp_get_num_threads(), id = omp_get_thread_num();
    if (n_threads == 1 || t1 - t0 < SPLIT_TOKENS * n_threads) return (Share){t0, t1, 0};
    return (Share){part_start(t0, t1, id, KERNEL_TOKENS), part_start(t0, t1, id + 1, KERNEL_TOKENS), 1};
}

/* A matmul's input: x for float32 weights, xq for quantized ones. */
typedef struct {
    const float *x;
    const Q8Act *xq;
} Input;

/* Makes a matmul's input from rows sh.t0..sh.t1-1 of src (row t at row t - sh.t0 of the
 * result): rmsnormed by weight unless it is NULL, then quantized in groups of gs for
 * quantized weights (gs 0: float32 ones; see Mat). Called by
 * every thread of a parallel region. By tokens, or a single row (decoding): each thread makes
 * its own, in its own buffer, with no barrier to wait at. Several rows shared by rows: the
 * threads share the rows out, into thread 0's buffer, and wait for each other; the caller
 * must have put a barrier between the last matmul that read that buffer and this call. */
static Input prepare(const L2Model *m, const float *src, const float *weight, Share sh, int n, int gs) {
    int id = omp_get_thread_num(), t0 = sh.t0;
    int shared = !sh.by_tokens && sh.t1 - t0 > 1 && omp_get_num_threads() > 1;
    ThreadBuffers *b = &m->s.mine[shared ? 0 : id];
    int a = shared ? part_start(t0, sh.t1, id, 1) : t0;
    int z = shared ? part_start(t0, sh.t1, id + 1, 1) : sh.t1;
    Input in = {src + (size_t)t0 * n, NULL};
    if (weight) {
        rmsnorm(b->xn + (size_t)(a - t0) * n, src + (size_t)a * n, weight, n, z - a);
        in.x = b->xn;
    }
    if (gs) {
        for (int t = a - t0; t < z - t0; t++)
            m->kernels->quantize(b->xq.q + (size_t)t * n, b->xq.s + (size_t)t * (n / gs),
                                 b->xq.sum + (size_t)t * (n / gs), in.x + (size_t)t * n, n, gs);
        in.xq = &b->xq;
    }
    if (shared && (weight || in.xq)) {
#pragma omp barrier
    }
    return in;
}

/* x += add, the thread's tokens, rows r0..r1-1: a matmul's output, where this thread
 * computed it. */
static void residual(float *x, const float *add, Share sh, int dim, int r0, int r1) {
    for (int t = sh.t0; t < sh.t1; t++)
        for (int i = r0; i < r1; i++) x[(size_t)t * dim + i] += add[(size_t)t * dim + i];
}

/* out = x @ W^T for this thread's tokens (out's row 0 is token `first`'s, x's row 0 token
 * sh.t0's) and its rows of W, which it returns in r0..r1-1 (contiguous, starting at a
 * multiple of KERNEL_ROWS, so also even). Called inside a parallel region: the threads
 * already running split the work (starting a team per matmul costs more than a small
 * matmul), with no barrier at the end, so that what follows on the same rows needs none
 * either; callers put the barriers. */
static void matmul(const L2Model *m, float *out, int first, Input in, Share sh, const Mat *w,
                   int *r0, int *r1) {
    int id = omp_get_thread_num(), T = sh.t1 - sh.t0;
    *r0 = sh.by_tokens ? 0 : part_start(0, w->d, id, KERNEL_ROWS);
    *r1 = sh.by_tokens ? w->d : part_start(0, w->d, id + 1, KERNEL_ROWS);
    if (*r0 >= *r1 || T <= 0) return;
    out += (size_t)(sh.t0 - first) * w->d;
    if (w->q4.q)
        m->kernels4->matmul_q4(out, in.xq, &w->q4, T, w->n, w->d, w->gs, *r0, *r1);
    else if (w->q8.q)
        m->kernels->matmul_q8(out, in.xq, &w->q8, T, w->n, w->d, w->gs, *r0, *r1);
    else
        m->kernels->matmul_f32(out, in.x, w->f, T, w->n, w->d, *r0, *r1);
}

/* Rotates the pairs (2i, 2i+1), r0 <= 2i < r1, of vec (heads of head_size) by the angles
 * whose cos and sin are the pairs of cs (head_size values). Head by head, so that no
 * value needs a division to find its place in its head. */
static void rope(float *vec, int r0, int r1, int head_size, const float *cs) {
    for (int h0 = r0 / head_size * head_size; h0 < r1; h0 += head_size) {
        int i1 = h0 + head_size < r1 ? h0 + head_size : r1;
        for (int i = h0 > r0 ? h0 : r0; i < i1; i += 2) {
            const float *c = cs + (i - h0);
            float v0 = vec[i], v1 = vec[i + 1];
            vec[i] = v0 * c[0] - v1 * c[1];
            vec[i + 1] = v0 * c[1] + v1 * c[0];
        }
    }
}

/* A sequence's part of a batch: rows t0..t1-1 are its tokens, row t at position
 * pos + t - t0, whose keys and values go to kv, and whose queries read it. A prefill is one
 * span of many rows; a batch step, one span of one row per sequence. */
typedef struct {
    KVCache *kv;
    int pos, t0, t1;
} Span;

/* Layer l's keys and values in a cache. */
static float *layer_keys(const KVCache *kv, const L2Config *p, int l) {
    return kv->key_cache + (size_t)l * (p->dim / p->n_heads * p->n_kv_heads) * att_stride(p);
}

static float *layer_values(const KVCache *kv, const L2Config *p, int l) {
    return kv->value_cache + (size_t)l * p->seq_len * (p->dim / p->n_heads * p->n_kv_heads);
}

/* Stores values r0..r1-1 of the keys of tokens t0..t1-1 (rows of k, kv_dim apart; token t
 * at position pos + t) in one layer's key cache (see attend for its layout). A run of
 * positions within one block of the cache lies side by side there: run by run, value by
 * value, each run written in order. */
static void store_keys(float *keys, const float *k, int t0, int t1, int pos, int r0, int r1,
                       const L2Config *p, size_t head_keys) {
    int head_size = p->dim / p->n_heads, kv_dim = head_size * p->n_kv_heads;
    for (int t = t0; t < t1;) {
        size_t u = (size_t)(pos + t), at = u / KEY_BLOCK * head_size * KEY_BLOCK + u % KEY_BLOCK;
        int run = KEY_BLOCK - (int)(u % KEY_BLOCK) < t1 - t ? KEY_BLOCK - (int)(u % KEY_BLOCK) : t1 - t;
        for (int h0 = r0 / head_size * head_size; h0 < r1; h0 += head_size) {
            float *head = keys + (size_t)(h0 / head_size) * head_keys + at;
            int i1 = h0 + head_size < r1 ? h0 + head_size : r1;
            for (int i = h0 > r0 ? h0 : r0; i < i1; i++) {
                float *dst = head + (size_t)(i - h0) * KEY_BLOCK;
                const float *src = k + (size_t)t * kv_dim + i;
                for (int j = 0; j < run; j++) dst[j] = src[(size_t)j * kv_dim];
            }
        }
        t += run;
    }
}

/* Stores values r0..r1-1 of the keys (s.k) and values (s.v) of rows t0..t1-1 in layer l of
 * their sequences' caches. */
static void store_kv(const L2Model *m, const Span *spans, int n_spans, int l, int t0, int t1, int r0,
                     int r1) {
    const L2Config *p = &m->cfg;
    int head_size = p->dim / p->n_heads, kv_dim = head_size * p->n_kv_heads;
    size_t head_keys = key_blocks(p) * head_size * KEY_BLOCK;
    for (const Span *sp = spans; sp < spans + n_spans; sp++) {
        int a = sp->t0 > t0 ? sp->t0 : t0, z = sp->t1 < t1 ? sp->t1 : t1, pos = sp->pos - sp->t0;
        store_keys(layer_keys(sp->kv, p, l), m->s.k, a, z, pos, r0, r1, p, head_keys);
        float *values = layer_values(sp->kv, p, l);
        for (int t = a; t < z; t++)
            memcpy(values + (size_t)(pos + t) * kv_dim + r0, m->s.v + (size_t)t * kv_dim + r0,
                   (size_t)(r1 - r0) * sizeof(float));
    }
}

static void embed(const L2Model *m, float *x, int token) {
    const Mat *e = &m->w.token_embedding;
    size_t row = (size_t)token * e->n;
    if (e->f)
        memcpy(x, e->f + row, e->n * sizeof(float));
    else if (e->q4.q)
        dequantize_q4_row(x, &e->q4, token, e->n, e->gs);
    else
        for (int j = 0; j < e->n; j++) x[j] = e->q8.q[row + j] * e->q8.s[(row + j) / e->gs];
}

/* The embeddings of rows t0..t1-1 of the batch, into x, and the cos and sin of their RoPE
 * angles (the same for every head and layer). */
static void begin(L2Model *m, const int *tokens, const Span *spans, int n_spans, int t0, int t1) {
    int dim = m->cfg.dim, head_size = dim / m->cfg.n_heads;
    for (const Span *sp = spans; sp < spans + n_spans; sp++) {
        int a = sp->t0 > t0 ? sp->t0 : t0, z = sp->t1 < t1 ? sp->t1 : t1;
        for (int t = a; t < z; t++) {
            embed(m, m->s.x + (size_t)t * dim, tokens[t]);
            for (int i = 0; i < head_size; i += 2) {
                float freq = 1.0f / powf(10000.0f, i / (float)head_size);
                float val = (sp->pos + t - sp->t0) * freq;
                m->s.rope[(size_t)t * head_size + i] = cosf(val);
                m->s.rope[(size_t)t * head_size + i + 1] = sinf(val);
            }
        }
    }
}

/* Runs the batch tokens[0..T) (T <= batch_rows), made of spans[0..n_spans), and writes the
 * logits of rows first..T-1 to out ((T - first) rows of vocab_size). */
static void forward_batch(L2Model *m, const int *tokens, int T, const Span *spans, int n_spans,
                          int first, float *out) {
    const L2Config *p = &m->cfg;
    const Weights *w = &m->w;
    RunState *s = &m->s;
    int dim = p->dim, hidden_dim = p->hidden_dim;
    int head_size = dim / p->n_heads;
    int kv_dim = head_size * p->n_kv_heads;
    int kv_mul = p->n_heads / p->n_kv_heads; /* query heads sharing one kv head */
    size_t head_keys = key_blocks(p) * head_size * KEY_BLOCK; /* the key cache of one kv head */

    /* Each thread computes its share of the work (see Share), and whatever follows on the
     * same tokens and rows alone (RoPE, storing keys and values, SwiGLU, the residual). */
#pragma omp parallel num_threads(m->n_threads)
    {
        Share sh = share(0, T);
        int r0, r1;
        Input in;
        if (sh.by_tokens) {
            begin(m, tokens, spans, n_spans, sh.t0, sh.t1);
        } else { /* every thread needs every token's */
#pragma omp single
            begin(m, tokens, spans, n_spans, 0, T);
        }
        for (int l = 0; l < p->n_layers; l++) {
            /* q, k (both rotated) and v; k and v into the caches */
            in = prepare(m, s->x, w->rms_att + (size_t)l * dim, sh, dim, w->layer[WQ][l].gs);
            matmul(m, s->q, 0, in, sh, &w->layer[WQ][l], &r0, &r1);
            for (int t = sh.t0; t < sh.t1; t++)
                rope(s->q + (size_t)t * dim, r0, r1, head_size, s->rope + (size_t)t * head_size);
            matmul(m, s->k, 0, in, sh, &w->layer[WK][l], &r0, &r1);
            for (int t = sh.t0; t < sh.t1; t++)
                rope(s->k + (size_t)t * kv_dim, r0, r1, head_size, s->rope + (size_t)t * head_size);
            matmul(m, s->v, 0, in, sh, &w->layer[WV][l], &r0, &r1); /* the same rows as k's */
            store_kv(m, spans, n_spans, l, sh.t0, sh.t1, r0, r1);
#pragma omp barrier

            /* causal multi-head attention, one head per iteration: a sequence's token at
             * position u sees positions 0..u of its own cache */
#pragma omp for schedule(static)
            for (int h = 0; h < p->n_heads; h++) {
                size_t kv_head = h / kv_mul, off = (size_t)h * head_size;
                float *att = s->att + (size_t)h * QUERY_BLOCK * att_stride(p);
                for (const Span *sp = spans; sp < spans + n_spans; sp++) {
                    const float *hk = layer_keys(sp->kv, p, l) + kv_head * head_keys;
                    const float *hv = layer_values(sp->kv, p, l) + kv_head * head_size;
                    int seen = sp->pos - sp->t0 + 1, t = sp->t0; /* row t sees seen + t positions */
                    for (; t + QUERY_BLOCK <= sp->t1; t += QUERY_BLOCK)
                        attend(s->xb + (size_t)t * dim + off, s->q + (size_t)t * dim + off, QUERY_BLOCK,
                               hk, hv, seen + t + QUERY_BLOCK - 1, p, att);
                    for (; t < sp->t1; t++)
                        attend(s->xb + (size_t)t * dim + off, s->q + (size_t)t * dim + off, 1, hk, hv,
                               seen + t, p, att);
                }
            }
            in = prepare(m, s->xb, NULL, sh, dim, w->layer[WO][l].gs);
            matmul(m, s->xb2, 0, in, sh, &w->layer[WO][l], &r0, &r1);
            residual(s->x, s->xb2, sh, dim, r0, r1);
            if (!sh.by_tokens) {
#pragma omp barrier
            }

            /* SwiGLU: w2(silu(w1 x) * w3 x) */
            in = prepare(m, s->x, w->rms_ffn + (size_t)l * dim, sh, dim, w->layer[W1][l].gs);
            matmul(m, s->hb, 0, in, sh, &w->layer[W1][l], &r0, &r1);
            matmul(m, s->hb2, 0, in, sh, &w->layer[W3][l], &r0, &r1);
            for (int t = sh.t0; t < sh.t1; t++) {
                float *hb = s->hb + (size_t)t * hidden_dim, *hb2 = s->hb2 + (size_t)t * hidden_dim;
#pragma omp simd
                for (int i = r0; i < r1; i++) hb[i] = hb[i] / (1.0f + exp_fast(-hb[i])) * hb2[i];
            }
            if (!sh.by_tokens) {
#pragma omp barrier
            }
            in = prepare(m, s->hb, NULL, sh, hidden_dim, w->layer[W2][l].gs);
            matmul(m, s->xb2, 0, in, sh, &w->layer[W2][l], &r0, &r1);
            residual(s->x, s->xb2, sh, dim, r0, r1);
            if (!sh.by_tokens) {
#pragma omp barrier
            }
        }

        /* the logits of tokens first..T-1 */
        Share last = share(first, T);
        if (sh.by_tokens && !last.by_tokens) { /* then they need rows of x other threads made */
#pragma omp barrier
        }
        in = prepare(m, s->x, w->rms_final, last, dim, w->wcls.gs);
        matmul(m, out, first, in, last, &w->wcls, &r0, &r1);
    }
}

static int check_range(const L2Model *m, const int *tokens, int n, int pos, char *err) {
    const L2Config *p = &m->cfg;
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= p->vocab_size) {
            set_err(err, "token %d is out of range (vocab_size %d)", tokens[i], p->vocab_size);
            return 0;
        }
    }
    if (pos < 0 || pos >= p->seq_len) {
        set_err(err, "position %d is out of range (seq_len %d)", pos, p->seq_len);
        return 0;
    }
    if (n > p->seq_len - pos) {
        set_err(err, "positions %d..%lld are out of range (seq_len %d)", pos,
                (long long)pos + n - 1, p->seq_len);
        return 0;
    }
    return 1;
}

/* Runs tokens[0..n) (checked) at positions pos.. of the sequence in kv, in batches, and
 * writes every token's logits to all_logits when it is not NULL (n rows), and the last
 * token's to logits. */
static void prefill(L2Model *m, KVCache *kv, const int *tokens, int n, int pos, float *all_logits,
                    float *logits) {
    size_t vocab = m->cfg.vocab_size;
    for (int done = 0; done < n;) {
        int T = n - done < PREFILL_CHUNK ? n - done : PREFILL_CHUNK;
        Span span = {kv, pos + done, 0, T};
        if (all_logits)
            forward_batch(m, tokens + done, T, &span, 1, 0, all_logits + done * vocab);
        else /* only the last token's logits: the classifier is the biggest matmul */
            forward_batch(m, tokens + done, T, &span, 1, done + T == n ? T - 1 : T, logits);
        done += T;
    }
    if (all_logits) memcpy(logits, all_logits + (n - 1) * vocab, vocab * sizeof(float));
}

float *l2_model_forward(L2Model *m, int token, int pos, char *err) {
    if (!check_range(m, &token, 1, pos, err)) return NULL;
    Span span = {&m->kv, pos, 0, 1};
    forward_batch(m, &token, 1, &span, 1, 0, m->s.logits);
    return m->s.logits;
}

float *l2_model_prefill(L2Model *m, const int *tokens, int n, int pos, float *all_logits,
                        char *err) {
    if (!tokens || n < 1) {
        set_err(err, "prefill needs at least one token");
        return NULL;
    }
    if (!check_range(m, tokens, n, pos, err)) return NULL;
    prefill(m, &m->kv, tokens, n, pos, all_logits, m->s.logits);
    return m->s.logits;
}

/* ---- batches of sequences ---- */

struct L2Batch {
    L2Model *m;
    int n_slots;
    KVCache *kv;   /* each slot's cache */
    int *held;     /* the positions each slot's cache holds */
    float *logits; /* each slot's latest logits (n_slots, vocab_size) */
    float *out;    /* a step's logits, by row, on their way to their slots (rows, vocab_size) */
};

L2Batch *l2_batch_new(L2Model *m, int max_seqs, char *err) {
    if (max_seqs < 1) {
        set_err(err, "a batch needs at least one slot, not %d", max_seqs);
        return NULL;
    }
    L2Batch *b = calloc(1, sizeof(L2Batch));
    if (!b) {
        set_err(err, "out of memory");
        return NULL;
    }
    const L2Config *c = &m->cfg;
    size_t vocab = c->vocab_size, rows = max_seqs < batch_rows(c) ? max_seqs : batch_rows(c);
    b->m = m;
    b->n_slots = max_seqs;
    b->kv = calloc(max_seqs, sizeof(KVCache));
    b->held = calloc(max_seqs, sizeof(int));
    b->logits = calloc(max_seqs * vocab, sizeof(float));
    b->out = malloc(rows * vocab * sizeof(float));
    int ok = b->kv && b->held && b->logits && b->out;
    for (int i = 0; ok && i < max_seqs; i++) ok = alloc_kv(&b->kv[i], c);
    if (!ok) {
        set_err(err, "out of memory for %d sequences' KV caches", max_seqs);
        l2_batch_free(b);
        return NULL;
    }
    return b;
}

void l2_batch_free(L2Batch *b) {
    if (!b) return;
    for (int i = 0; b->kv && i < b->n_slots; i++) free_kv(&b->kv[i]);
    free(b->kv);
    free(b->held);
    free(b->logits);
    free(b->out);
    free(b);
}

/* Whether slot exists and its cache holds positions 0..pos-1 (pos >= 0: check_range's). */
static int check_slot(const L2Batch *b, int slot, int pos, char *err) {
    if (slot < 0 || slot >= b->n_slots) {
        set_err(err, "slot %d is out of range (%d slots)", slot, b->n_slots);
        return 0;
    }
    if (pos > b->held[slot]) {
        set_err(err, "slot %d holds %d positions: position %d would leave a gap", slot, b->held[slot], pos);
        return 0;
    }
    return 1;
}

int l2_batch_prefill(L2Batch *b, int slot, const int *ids, int n, int pos, char *err) {
    if (!ids || n < 1) {
        set_err(err, "prefill needs at least one token");
        return -1;
    }
    if (!check_range(b->m, ids, n, pos, err) || !check_slot(b, slot, pos, err)) return -1;
    prefill(b->m, &b->kv[slot], ids, n, pos, NULL, b->logits + (size_t)slot * b->m->cfg.vocab_size);
    b->held[slot] = pos + n;
    return 0;
}

int l2_batch_step(L2Batch *b, const int *slots, const int *tokens, const int *positions, int n,
                  char *err) {
    if (!slots || !tokens || !positions || n < 1) {
        set_err(err, "a step needs at least one sequence");
        return -1;
    }
    for (int i = 0; i < n; i++) { /* all of them before any runs */
        if (!check_range(b->m, &tokens[i], 1, positions[i], err) || !check_slot(b, slots[i], positions[i], err))
            return -1;
        for (int j = 0; j < i; j++) {
            if (slots[j] == slots[i]) {
                set_err(err, "slot %d is in the step twice", slots[i]);
                return -1;
            }
        }
    }
    L2Model *m = b->m;
    size_t vocab = m->cfg.vocab_size;
    Span spans[PREFILL_CHUNK];
    for (int done = 0; done < n;) {
        int T = n - done < batch_rows(&m->cfg) ? n - done : batch_rows(&m->cfg);
        for (int t = 0; t < T; t++)
            spans[t] = (Span){&b->kv[slots[done + t]], positions[done + t], t, t + 1};
        forward_batch(m, tokens + done, T, spans, T, 0, b->out);
        for (int t = 0; t < T; t++) {
            int slot = slots[done + t];
            memcpy(b->logits + slot * vocab, b->out + t * vocab, vocab * sizeof(float));
            b->held[slot] = positions[done + t] + 1;
        }
        done += T;
    }
    return 0;
}

const float *l2_batch_logits(const L2Batch *b, int slot) {
    return slot >= 0 && slot < b->n_slots ? b->logits + (size_t)slot * b->m->cfg.vocab_size : NULL;
}
