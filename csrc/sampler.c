/* sampler.c - picks the next token from the logits: argmax, or a draw from
 * softmax(logits / temperature), optionally restricted to the top-p nucleus.
 * The algorithm and the RNG are llama2.c's, so a seed gives the same draws.
 * OpenAI's presence and frequency penalties, when set, lower the logits of the tokens
 * sampled since the last reset first. */
#include "llama2.h"
#include "common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float prob;
    int index;
} ProbIndex;

struct L2Sampler {
    int vocab_size;
    float temperature;
    float topp;
    unsigned long long rng_state;
    ProbIndex *probindex; /* scratch for top-p */
    float presence, frequency;
    int *counts; /* times each token was sampled since the reset; NULL without penalties */
};

L2Sampler *l2_sampler_new(int vocab_size, float temperature, float topp,
                          unsigned long long seed) {
    if (vocab_size <= 0) return NULL;
    L2Sampler *s = calloc(1, sizeof(L2Sampler));
    if (!s) return NULL;
    s->probindex = malloc((size_t)vocab_size * sizeof(ProbIndex));
    if (!s->probindex) {
        free(s);
        return NULL;
    }
    s->vocab_size = vocab_size;
    s->temperature = temperature;
    s->topp = topp;
    /* xorshift never leaves the all-zero state */
    s->rng_state = seed ? seed : 0x9E3779B97F4A7C15ull;
    return s;
}

void l2_sampler_free(L2Sampler *s) {
    if (!s) return;
    free(s->probindex);
    free(s->counts);
    free(s);
}

int l2_sampler_set_penalties(L2Sampler *s, float presence, float frequency) {
    s->presence = presence;
    s->frequency = frequency;
    if ((presence != 0.0f || frequency != 0.0f) && !s->counts) {
        s->counts = malloc((size_t)s->vocab_size * sizeof(int));
        if (!s->counts) return -1;
    }
    l2_sampler_reset(s);
    return 0;
}

void l2_sampler_reset(L2Sampler *s) {
    if (s->counts) memset(s->counts, 0, (size_t)s->vocab_size * sizeof(int));
}

/* In float32 and in this order, as llama2zh.model.penalize. */
static void penalize(const L2Sampler *s, float *logits) {
    for (int i = 0; i < s->vocab_size; i++)
        if (s->counts[i]) logits[i] -= (float)s->counts[i] * s->frequency + s->presence;
}

/* xorshift64* (https://en.wikipedia.org/wiki/Xorshift#xorshift*) */
static unsigned int random_u32(unsigned long long *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (unsigned int)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

/* uniform in [0, 1) */
static float random_f32(unsigned long long *state) {
    return (random_u32(state) >> 8) / 16777216.0f;
}

/* The first index of the largest value, as a plain scan (`p[i] > p[best]`) finds it, in
 * two passes that vectorise: the max, then where it first occurs. NaNs lose every
 * comparison, so the scan skips them, except at 0, where it keeps the first one. */
static int sample_argmax(const float *p, int n) {
    if (isnan(p[0])) return 0;
    float max_val = p[0];
#pragma omp simd reduction(max : max_val)
    for (int i = 1; i < n; i++) max_val = p[i] > max_val ? p[i] : max_val;
    for (int i = 0; i < n; i++)
        if (p[i] == max_val) return i;
    return 0;
}

/* index of the first bucket of the cumulative distribution past coin */
static int sample_mult(const float *probs, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += probs[i];
        if (coin < cdf) return i;
    }
    return n - 1; /* rounding */
}

static int compare_desc(const void *a, const void *b) {
    const ProbIndex *pa = a, *pb = b;
    if (pa->prob > pb->prob) return -1;
    if (pa->prob < pb->prob) return 1;
    return 0;
}

/* Samples among the most likely tokens whose probabilities add up to just
 * over topp. */
static int sample_topp(const float *probs, int n, float topp, ProbIndex *probindex,
                       float coin) {
    /* a token below this cannot be in the nucleus, so the sort can skip it */
    const float cutoff = n > 1 ? (1.0f - topp) / (n - 1) : 0.0f;
    int n0 = 0;
    for (int i = 0; i < n; i++) {
        if (probs[i] >= cutoff) {
            probindex[n0].index = i;
            probindex[n0].prob = probs[i];
            n0++;
        }
    }
    if (n0 == 0) return sample_mult(probs, n, coin); /* only NaNs: never crash */
    qsort(probindex, n0, sizeof(ProbIndex), compare_desc);
    float cumulative_prob = 0.0f;
    int last_idx = n0 - 1;
    for (int i = 0; i < n0; i++) {
        cumulative_prob += probindex[i].prob;
        if (cumulative_prob > topp) {
            last_idx = i;
            break;
        }
    }
    float r = coin * cumulative_prob;
    float cdf = 0.0f;
    for (int i = 0; i <= last_idx; i++) {
        cdf += probindex[i].prob;
        if (r < cdf) return probindex[i].index;
    }
    return probindex[last_idx].index; /* rounding */
}

static int pick(L2Sampler *s, float *logits) {
    int n = s->vocab_size;
    if (!(s->temperature > 0.0f)) return sample_argmax(logits, n);
    for (int i = 0; i < n; i++) logits[i] /= s->temperature;
    softmax(logits, n);
    float coin = random_f32(&s->rng_state);
    if (s->topp <= 0.0f || s->topp >= 1.0f) return sample_mult(logits, n, coin);
    return sample_topp(logits, n, s->topp, s->probindex, coin);
}

int l2_sample(L2Sampler *s, float *logits) {
    if (!s->counts) return pick(s, logits);
    penalize(s, logits);
    int token = pick(s, logits);
    s->counts[token]++;
    return token;
}
