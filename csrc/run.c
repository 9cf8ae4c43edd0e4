/* run.c - the `run` command line: arguments, loading, printing, timing.
 * Everything else is in the engine (llama2.h).
 *
 * Exit status: 0 ok, 1 runtime failure (a bad file), 2 bad usage; a failure
 * always says what was wrong in one line on stderr. */
#include "llama2.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define USAGE                                                                             \
    "usage: run model.bin [-k tokenizer.bin] [-i prompt] [-t temperature] [-p topp] "     \
    "[-s seed] [-n steps] [-m generate]"

static const char *HELP =
    USAGE "\n"
    "  -k, -z <path>  tokenizer.bin (default tokenizer.bin; -z is llama2.c's spelling)\n"
    "  -i <string>    prompt (default empty: start from BOS)\n"
    "  -t <float>     temperature, >= 0 (default 1.0; 0 = greedy)\n"
    "  -p <float>     top-p in [0, 1] (default 0.9; 0 or 1 = off)\n"
    "  -s <int>       random seed (default: the time)\n"
    "  -n <int>       positions to run, prompt included (default 256; 0 = seq_len)\n"
    "  -m <mode>      generate (chat is not supported)\n";

static int fail(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("run: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return status;
}

static int parse_float(const char *s, float *out) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (end == s || *end || errno || !isfinite(v)) return 0;
    *out = v;
    return 1;
}

static int parse_int(const char *s, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < -2147483647L - 1 || v > 2147483647L) return 0;
    *out = (int)v;
    return 1;
}

static int parse_seed(const char *s, unsigned long long *out) {
    char *end;
    errno = 0;
    if (*s < '0' || *s > '9') return 0; /* strtoull would wrap "-1" around */
    unsigned long long v = strtoull(s, &end, 10);
    if (*end || errno) return 0;
    *out = v;
    return 1;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* What the per-token callback needs to print a token. */
typedef struct {
    const L2Tokenizer *tok;
    L2Decoder dec;
    char *buf;     /* l2_decode_bound bytes */
    char *err;
    int failed;    /* a token could not be decoded */
    double t_first; /* when the first token came out */
} Printer;

static int print_token(void *ctx, int token) {
    Printer *p = ctx;
    int n = l2_decode_step(p->tok, &p->dec, token, p->buf, p->err);
    if (n < 0) {
        p->failed = 1;
        return 1;
    }
    fwrite(p->buf, 1, n, stdout);
    fflush(stdout); /* tokens appear as they are made */
    if (p->t_first == 0.0) p->t_first = now_s();
    return 0;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *tokenizer_path = "tokenizer.bin", *prompt = "";
    float temperature = 1.0f, topp = 0.9f;
    unsigned long long seed = (unsigned long long)time(NULL);
    int steps = 256;

    if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        fputs(HELP, stdout);
        return 0;
    }
    if (argc < 2) {
        fputs(USAGE "\n", stderr);
        return 2;
    }
    if (argv[1][0] == '-') return fail(2, "the first argument must be the model path (%s)", USAGE);
    model_path = argv[1];
    for (int i = 2; i < argc; i += 2) {
        const char *flag = argv[i];
        if (flag[0] != '-' || !flag[1] || flag[2] || !strchr("kzitpsnm", flag[1]))
            return fail(2, "unknown argument '%s' (%s)", flag, USAGE);
        if (i + 1 >= argc) return fail(2, "%s needs a value", flag);
        const char *val = argv[i + 1];
        switch (flag[1]) {
        case 'k':
        case 'z': tokenizer_path = val; break;
        case 'i': prompt = val; break;
        case 't':
            if (!parse_float(val, &temperature) || temperature < 0.0f)
                return fail(2, "-t: temperature must be a number >= 0, got '%s'", val);
            break;
        case 'p':
            if (!parse_float(val, &topp) || topp < 0.0f || topp > 1.0f)
                return fail(2, "-p: topp must be a number in [0, 1], got '%s'", val);
            break;
        case 's':
            if (!parse_seed(val, &seed))
                return fail(2, "-s: seed must be a non-negative integer, got '%s'", val);
            break;
        case 'n':
            if (!parse_int(val, &steps) || steps < 0)
                return fail(2, "-n: steps must be an integer >= 0, got '%s'", val);
            break;
        case 'm':
            if (!strcmp(val, "chat")) return fail(2, "-m chat: chat mode is not supported");
            if (strcmp(val, "generate")) return fail(2, "-m: unknown mode '%s' (only generate)", val);
            break;
        }
    }

    char err[L2_ERR_SIZE];
    int status = 1;
    L2Model *model = NULL;
    L2Tokenizer *tok = NULL;
    L2Sampler *sampler = NULL;
    int *ids = NULL;
    Printer pr = {.err = err};

    model = l2_model_open(model_path, err);
    if (!model) {
        fail(1, "%s", err);
        goto done;
    }
    const L2Config *cfg = l2_model_config(model);
    tok = l2_tokenizer_open(tokenizer_path, cfg->vocab_size, err);
    if (!tok) {
        fail(1, "%s", err);
        goto done;
    }

    /* the prompt, with BOS; a first guess at its length, then the exact one
     * (an argument is at most 128 KiB, so an int holds it) */
    size_t len = strlen(prompt);
    int cap = (int)len + 3;
    int n_prompt;
    for (;;) {
        ids = malloc((size_t)cap * sizeof(int));
        if (!ids) {
            fail(1, "out of memory for the prompt");
            goto done;
        }
        n_prompt = l2_encode(tok, prompt, len, 1, 0, ids, cap, err);
        if (n_prompt < 0) {
            fail(1, "%s", err);
            goto done;
        }
        if (n_prompt <= cap) break;
        free(ids);
        cap = n_prompt;
    }
    if (n_prompt < 1) {
        fail(1, "the prompt encodes to no tokens (the tokenizer has no BOS)");
        goto done;
    }

    sampler = l2_sampler_new(cfg->vocab_size, temperature, topp, seed);
    pr.tok = tok;
    pr.buf = malloc(l2_decode_bound(tok));
    if (!sampler || !pr.buf) {
        fail(1, "out of memory");
        goto done;
    }
    l2_decoder_init(&pr.dec);

    for (int i = 0; i < n_prompt; i++) {
        int n = l2_decode_step(tok, &pr.dec, ids[i], pr.buf, err);
        if (n < 0) {
            fail(1, "%s", err);
            goto done;
        }
        fwrite(pr.buf, 1, n, stdout);
    }
    fflush(stdout);

    int n_gen = l2_generate(model, sampler, ids, n_prompt, steps, l2_tokenizer_bos_id(tok),
                            l2_tokenizer_eos_id(tok), NULL, 0, print_token, &pr, err);
    double t_end = now_s();
    if (n_gen < 0 || pr.failed) {
        fputc('\n', stdout);
        fail(1, "%s", err);
        goto done;
    }
    fwrite(pr.buf, 1, l2_decode_finish(tok, &pr.dec, pr.buf), stdout);
    fputc('\n', stdout);
    fflush(stdout);

    /* like llama2.c: the first token is left out, it pays for the prompt */
    double tok_s = n_gen > 1 && t_end > pr.t_first ? (n_gen - 1) / (t_end - pr.t_first) : 0.0;
    fprintf(stderr, "achieved tok/s: %f\n", tok_s);
    status = 0;
done:
    free(pr.buf);
    free(ids);
    l2_sampler_free(sampler);
    if (tok) l2_tokenizer_close(tok);
    l2_model_close(model);
    return status;
}
