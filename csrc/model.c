/* model.c - model.bin loading (mmap, validated) and the fp32 forward pass.
 *
 * The forward pass is llama2.c's: one token at a time, a KV cache, every
 * weight read once per token. That makes it memory-bound, so the one thing
 * that matters for speed is streaming the weights through matmul on all
 * cores; everything else is small.
 */
#include "llama2.h"
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define AK42_MAGIC 0x616b3432u /* "ak42" read as a little-endian uint32 */
#define V0_HEADER_BYTES 28     /* 7 int32 */
#define V1_HEADER_BYTES 256

typedef struct {
    const float *token_embedding; /* (vocab, dim) */
    const float *rms_att;         /* (layer, dim) */
    const float *rms_ffn;         /* (layer, dim) */
    const float *wq;              /* (layer, dim, dim) */
    const float *wk;              /* (layer, kv_dim, dim) */
    const float *wv;              /* (layer, kv_dim, dim) */
    const float *wo;              /* (layer, dim, dim) */
    const float *w1;              /* (layer, hidden, dim) */
    const float *w2;              /* (layer, dim, hidden) */
    const float *w3;              /* (layer, hidden, dim) */
    const float *rms_final;       /* (dim) */
    const float *wcls;            /* (vocab, dim) */
} Weights;

typedef struct {
    float *x;      /* activation at the current position (dim) */
    float *xb;     /* scratch (dim) */
    float *xb2;    /* scratch (dim) */
    float *hb;     /* SwiGLU hidden (hidden_dim) */
    float *hb2;    /* SwiGLU hidden (hidden_dim) */
    float *q;      /* query (dim) */
    float *att;    /* attention scores (n_heads, seq_len) */
    float *logits; /* (vocab_size) */
    float *key_cache;   /* (layer, seq_len, kv_dim) */
    float *value_cache; /* (layer, seq_len, kv_dim) */
} RunState;

struct L2Model {
    L2Config cfg;
    Weights w;
    RunState s;
    void *map;
    size_t map_size;
};

static int32_t read_i32(const unsigned char *p) {
    int32_t v;
    memcpy(&v, p, 4); /* the header is little-endian, as is every target */
    return v;
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
        if (version != 1) {
            set_err(err, "%s: unsupported model.bin version %d", path, version);
            return -1;
        }
        if (size < V1_HEADER_BYTES) {
            set_err(err, "%s: %zu bytes, too small for a version 1 header", path, size);
            return -1;
        }
        header = V1_HEADER_BYTES;
        params = p + 8;
        cfg->version = 1;
        unsigned shared = p[36];
        if (shared > 1) {
            set_err(err, "%s: shared_classifier flag is %u, not 0 or 1", path, shared);
            return -1;
        }
        cfg->shared_classifier = (int)shared;
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
    return header;
}

/* Points the weights into the mapping; returns the bytes the file must hold.
 * With the bounds parse_header enforces no count here exceeds 2^48. */
static uint64_t map_weights(Weights *w, const L2Config *c, const float *f) {
    uint64_t dim = c->dim, hidden = c->hidden_dim, L = c->n_layers;
    uint64_t kv_dim = dim / c->n_heads * c->n_kv_heads;
    uint64_t vocab = c->vocab_size, head_size = dim / c->n_heads;
    uint64_t n = 0; /* floats consumed so far */
#define TAKE(field, count) (w->field = f ? f + n : NULL, n += (count))
    if (c->version == 0) {
        TAKE(token_embedding, vocab * dim);
        TAKE(rms_att, L * dim);
        TAKE(wq, L * dim * dim);
        TAKE(wk, L * kv_dim * dim);
        TAKE(wv, L * kv_dim * dim);
        TAKE(wo, L * dim * dim);
        TAKE(rms_ffn, L * dim);
        TAKE(w1, L * hidden * dim);
        TAKE(w2, L * dim * hidden);
        TAKE(w3, L * hidden * dim);
        TAKE(rms_final, dim);
        /* freq_cis_real and _imag: skipped, RoPE is computed */
        n += (uint64_t)c->seq_len * head_size;
    } else {
        TAKE(rms_att, L * dim);
        TAKE(rms_ffn, L * dim);
        TAKE(rms_final, dim);
        TAKE(token_embedding, vocab * dim);
        TAKE(wq, L * dim * dim);
        TAKE(wk, L * kv_dim * dim);
        TAKE(wv, L * kv_dim * dim);
        TAKE(wo, L * dim * dim);
        TAKE(w1, L * hidden * dim);
        TAKE(w2, L * dim * hidden);
        TAKE(w3, L * hidden * dim);
    }
    if (c->shared_classifier)
        w->wcls = w->token_embedding;
    else
        TAKE(wcls, vocab * dim);
#undef TAKE
    return n * sizeof(float);
}

static int alloc_state(RunState *s, const L2Config *c) {
    size_t kv_dim = (size_t)c->dim / c->n_heads * c->n_kv_heads;
    size_t cache = (size_t)c->n_layers * c->seq_len * kv_dim;
    s->x = calloc(c->dim, sizeof(float));
    s->xb = calloc(c->dim, sizeof(float));
    s->xb2 = calloc(c->dim, sizeof(float));
    s->hb = calloc(c->hidden_dim, sizeof(float));
    s->hb2 = calloc(c->hidden_dim, sizeof(float));
    s->q = calloc(c->dim, sizeof(float));
    s->att = calloc((size_t)c->n_heads * c->seq_len, sizeof(float));
    s->logits = calloc(c->vocab_size, sizeof(float));
    s->key_cache = calloc(cache, sizeof(float));
    s->value_cache = calloc(cache, sizeof(float));
    return s->x && s->xb && s->xb2 && s->hb && s->hb2 && s->q && s->att && s->logits &&
           s->key_cache && s->value_cache;
}

static void free_state(RunState *s) {
    free(s->x);
    free(s->xb);
    free(s->xb2);
    free(s->hb);
    free(s->hb2);
    free(s->q);
    free(s->att);
    free(s->logits);
    free(s->key_cache);
    free(s->value_cache);
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
    uint64_t expected = (uint64_t)header + map_weights(&m->w, &m->cfg, NULL);
    if ((uint64_t)size != expected) {
        set_err(err, "%s: %zu bytes, the header implies %llu (truncated or not a model.bin)",
                path, size, (unsigned long long)expected);
        goto fail;
    }
    map_weights(&m->w, &m->cfg, (const float *)((const char *)map + header));
    /* the weights are streamed front to back on every token */
    madvise(map, size, MADV_WILLNEED);
    if (!alloc_state(&m->s, &m->cfg)) {
        set_err(err, "%s: out of memory for the run state and KV cache", path);
        goto fail;
    }
    return m;
fail:
    l2_model_close(m);
    return NULL;
}

void l2_model_close(L2Model *m) {
    if (!m) return;
    free_state(&m->s);
    munmap(m->map, m->map_size);
    free(m);
}

const L2Config *l2_model_config(const L2Model *m) { return &m->cfg; }

/* ---- the forward pass ---- */

static void rmsnorm(float *o, const float *x, const float *weight, int size) {
    float ss = 0.0f;
    for (int j = 0; j < size; j++) ss += x[j] * x[j];
    ss = 1.0f / sqrtf(ss / size + 1e-5f);
    for (int j = 0; j < size; j++) o[j] = weight[j] * (ss * x[j]);
}

/* One row of W times x; the simd reduction lets the compiler reorder the sum
 * into vector lanes, which plain -O3 may not do for floats. */
static inline float dot(const float *restrict w, const float *restrict x, int n) {
    float val = 0.0f;
#pragma omp simd reduction(+ : val)
    for (int j = 0; j < n; j++) val += w[j] * x[j];
    return val;
}

/* xout (d) = W (d, n) @ x (n). Called inside a parallel region: the rows
 * are split among the threads already running (starting a team per matmul
 * costs more than a small matmul), and with no barrier at the end, so that
 * independent matmuls run back to back; callers put the barrier. */
static void matmul(float *restrict xout, const float *restrict x, const float *restrict w,
                   int n, int d) {
#pragma omp for schedule(static) nowait
    for (int i = 0; i < d; i++) xout[i] = dot(w + (size_t)i * n, x, n);
}

/* Rotates the pairs (2i, 2i+1) of each head of vec by pos * 10000^(-2i/head_size). */
static void rope(float *vec, int size, int head_size, int pos) {
    for (int i = 0; i < size; i += 2) {
        int head_dim = i % head_size;
        float freq = 1.0f / powf(10000.0f, head_dim / (float)head_size);
        float val = pos * freq;
        float fcr = cosf(val), fci = sinf(val);
        float v0 = vec[i], v1 = vec[i + 1];
        vec[i] = v0 * fcr - v1 * fci;
        vec[i + 1] = v0 * fci + v1 * fcr;
    }
}

float *l2_model_forward(L2Model *m, int token, int pos, char *err) {
    const L2Config *p = &m->cfg;
    const Weights *w = &m->w;
    RunState *s = &m->s;
    if (token < 0 || token >= p->vocab_size) {
        set_err(err, "token %d is out of range (vocab_size %d)", token, p->vocab_size);
        return NULL;
    }
    if (pos < 0 || pos >= p->seq_len) {
        set_err(err, "position %d is out of range (seq_len %d)", pos, p->seq_len);
        return NULL;
    }
    int dim = p->dim, hidden_dim = p->hidden_dim;
    int head_size = dim / p->n_heads;
    int kv_dim = head_size * p->n_kv_heads;
    int kv_mul = p->n_heads / p->n_kv_heads; /* query heads sharing one kv head */
    float *x = s->x;

    memcpy(x, w->token_embedding + (size_t)token * dim, dim * sizeof(float));

#pragma omp parallel
    for (int l = 0; l < p->n_layers; l++) {
        size_t loff = (size_t)l * p->seq_len * kv_dim; /* this layer's KV cache */
        float *k = s->key_cache + loff + (size_t)pos * kv_dim;
        float *v = s->value_cache + loff + (size_t)pos * kv_dim;

#pragma omp single
        rmsnorm(s->xb, x, w->rms_att + (size_t)l * dim, dim);
        matmul(s->q, s->xb, w->wq + (size_t)l * dim * dim, dim, dim);
        matmul(k, s->xb, w->wk + (size_t)l * kv_dim * dim, dim, kv_dim);
        matmul(v, s->xb, w->wv + (size_t)l * kv_dim * dim, dim, kv_dim);
#pragma omp barrier
#pragma omp single
        {
            rope(s->q, dim, head_size, pos);
            rope(k, kv_dim, head_size, pos);
        }

        /* multi-head attention over positions 0..pos, one head per iteration */
#pragma omp for schedule(static)
        for (int h = 0; h < p->n_heads; h++) {
            const float *q = s->q + h * head_size;
            float *att = s->att + (size_t)h * p->seq_len;
            size_t hoff = loff + (size_t)(h / kv_mul) * head_size;
            float scale = 1.0f / sqrtf((float)head_size);
            for (int t = 0; t <= pos; t++)
                att[t] = dot(s->key_cache + hoff + (size_t)t * kv_dim, q, head_size) * scale;
            softmax(att, pos + 1);
            float *xb = s->xb + h * head_size;
            memset(xb, 0, head_size * sizeof(float));
            for (int t = 0; t <= pos; t++) {
                const float *vt = s->value_cache + hoff + (size_t)t * kv_dim;
                float a = att[t];
                for (int i = 0; i < head_size; i++) xb[i] += a * vt[i];
            }
        }

        matmul(s->xb2, s->xb, w->wo + (size_t)l * dim * dim, dim, dim);
#pragma omp barrier
#pragma omp single
        {
            for (int i = 0; i < dim; i++) x[i] += s->xb2[i]; /* residual */
            rmsnorm(s->xb, x, w->rms_ffn + (size_t)l * dim, dim);
        }

        /* SwiGLU: w2(silu(w1 x) * w3 x) */
        matmul(s->hb, s->xb, w->w1 + (size_t)l * hidden_dim * dim, dim, hidden_dim);
        matmul(s->hb2, s->xb, w->w3 + (size_t)l * hidden_dim * dim, dim, hidden_dim);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int i = 0; i < hidden_dim; i++) {
            float val = s->hb[i];
            s->hb[i] = val * (1.0f / (1.0f + expf(-val))) * s->hb2[i];
        }
        matmul(s->xb, s->hb, w->w2 + (size_t)l * dim * hidden_dim, hidden_dim, dim);
#pragma omp barrier
#pragma omp single
        for (int i = 0; i < dim; i++) x[i] += s->xb[i]; /* residual */
    }

    rmsnorm(x, x, w->rms_final, dim);
#pragma omp parallel
    matmul(s->logits, x, w->wcls, dim, p->vocab_size);
    return s->logits;
}
