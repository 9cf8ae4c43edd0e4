/* run.c - the `run` command line: arguments, loading, printing, timing, the chat loop.
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
#include <unistd.h>

#define USAGE                                                                             \
    "usage: run model.bin [-k tokenizer.bin] [-i prompt] [-t temperature] [-p topp] "     \
    "[-s seed] [-n steps] [-m generate|chat] [-y system] [-P presence] [-F frequency]"

static const char *HELP =
    USAGE "\n"
    "  -k, -z <path>  tokenizer.bin (default tokenizer.bin; -z is llama2.c's spelling)\n"
    "  -i <string>    prompt (default empty: start from BOS); chat: the first user message\n"
    "  -t <float>     temperature, >= 0 (default 1.0; 0 = greedy)\n"
    "  -p <float>     top-p in [0, 1] (default 0.9; 0 or 1 = off)\n"
    "  -s <int>       random seed (default: the time)\n"
    "  -n <int>       positions to run, prompt included (default 256; 0 = seq_len);\n"
    "                 chat: the most tokens of each reply (0 = as many as the context holds)\n"
    "  -m <mode>      generate (default), or chat: each line of standard input is a user\n"
    "                 message, each reply one line of standard output (needs a tokenizer.bin\n"
    "                 with a chat template: a chat-tuned model's)\n"
    "  -y <string>    chat: a system message before the first user message\n"
    "  -P <float>     presence penalty in [-2, 2] (default 0): lowers the logit of every token\n"
    "                 generated so far (in this reply) by this much\n"
    "  -F <float>     frequency penalty in [-2, 2] (default 0): lowers a token's logit by this\n"
    "                 much per time it was generated so far (in this reply)\n";

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
    int last;       /* the last token printed */
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
    p->last = token;
    return 0;
}

typedef struct {
    const char *model_path, *tokenizer_path, *prompt, *system;
    float temperature, topp, presence, frequency;
    unsigned long long seed;
    int steps, chat;
} Options;

/* 0 when the arguments are good, else the exit status (the message printed). */
static int parse_args(int argc, char **argv, Options *o) {
    if (argc < 2) {
        fputs(USAGE "\n", stderr);
        return 2;
    }
    if (argv[1][0] == '-') return fail(2, "the first argument must be the model path (%s)", USAGE);
    o->model_path = argv[1];
    for (int i = 2; i < argc; i += 2) {
        const char *flag = argv[i];
        if (flag[0] != '-' || !flag[1] || flag[2] || !strchr("kzitpsnmyPF", flag[1]))
            return fail(2, "unknown argument '%s' (%s)", flag, USAGE);
        if (i + 1 >= argc) return fail(2, "%s needs a value", flag);
        const char *val = argv[i + 1];
        switch (flag[1]) {
        case 'k':
        case 'z': o->tokenizer_path = val; break;
        case 'i': o->prompt = val; break;
        case 'y': o->system = val; break;
        case 't':
            if (!parse_float(val, &o->temperature) || o->temperature < 0.0f)
                return fail(2, "-t: temperature must be a number >= 0, got '%s'", val);
            break;
        case 'p':
            if (!parse_float(val, &o->topp) || o->topp < 0.0f || o->topp > 1.0f)
                return fail(2, "-p: topp must be a number in [0, 1], got '%s'", val);
            break;
        case 's':
            if (!parse_seed(val, &o->seed))
                return fail(2, "-s: seed must be a non-negative integer, got '%s'", val);
            break;
        case 'n':
            if (!parse_int(val, &o->steps) || o->steps < 0)
                return fail(2, "-n: steps must be an integer >= 0, got '%s'", val);
            break;
        case 'P':
        case 'F': {
            float *penalty = flag[1] == 'P' ? &o->presence : &o->frequency;
            if (!parse_float(val, penalty) || *penalty < -2.0f || *penalty > 2.0f)
                return fail(2, "%s: the %s penalty must be a number in [-2, 2], got '%s'", flag,
                            flag[1] == 'P' ? "presence" : "frequency", val);
            break;
        }
        case 'm':
            if (strcmp(val, "generate") && strcmp(val, "chat"))
                return fail(2, "-m: unknown mode '%s' (generate or chat)", val);
            o->chat = !strcmp(val, "chat");
            break;
        }
    }
    if (o->system && !o->chat) return fail(2, "-y: a system message needs -m chat");
    return 0;
}

/* llama2.c's generation: the prompt and its continuation on one line of stdout. */
static int generate(L2Model *model, const L2Tokenizer *tok, L2Sampler *sampler, Printer *pr,
                    const Options *o, char *err) {
    /* the prompt, with BOS; a first guess at its length, then the exact one
     * (an argument is at most 128 KiB, so an int holds it) */
    size_t len = strlen(o->prompt);
    int cap = (int)len + 3, n_prompt, status = 1;
    int *ids = NULL;
    for (;;) {
        ids = malloc((size_t)cap * sizeof(int));
        if (!ids) {
            fail(1, "out of memory for the prompt");
            goto done;
        }
        n_prompt = l2_encode(tok, o->prompt, len, 1, 0, ids, cap, err);
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

    for (int i = 0; i < n_prompt; i++) {
        int n = l2_decode_step(tok, &pr->dec, ids[i], pr->buf, err);
        if (n < 0) {
            fail(1, "%s", err);
            goto done;
        }
        fwrite(pr->buf, 1, n, stdout);
    }
    fflush(stdout);

    int stop[2] = {l2_tokenizer_bos_id(tok), l2_tokenizer_eos_id(tok)};
    int n_gen = l2_generate(model, sampler, ids, n_prompt, 0, o->steps, 0, stop, 2, NULL, 0, print_token, pr,
                            NULL, err);
    double t_end = now_s();
    if (n_gen < 0 || pr->failed) {
        fputc('\n', stdout);
        fail(1, "%s", err);
        goto done;
    }
    fwrite(pr->buf, 1, l2_decode_finish(tok, &pr->dec, pr->buf), stdout);
    fputc('\n', stdout);
    fflush(stdout);

    /* like llama2.c: the first token is left out, it pays for the prompt */
    double tok_s = n_gen > 1 && t_end > pr->t_first ? (n_gen - 1) / (t_end - pr->t_first) : 0.0;
    fprintf(stderr, "achieved tok/s: %f\n", tok_s);
    status = 0;
done:
    free(ids);
    return status;
}

/* The next user message: a line of stdin without its "\n" (and "\r"), empty lines skipped;
 * NULL at the end of the input. */
static const char *read_user(char **line, size_t *cap, int tty) {
    for (;;) {
        if (tty) fputs("User: ", stderr);
        ssize_t n = getline(line, cap, stdin);
        if (n < 0) {
            if (tty) fputc('\n', stderr);
            return NULL;
        }
        if (n > 0 && (*line)[n - 1] == '\n') (*line)[--n] = '\0';
        if (n > 0 && (*line)[n - 1] == '\r') (*line)[--n] = '\0';
        if (n > 0) return *line;
    }
}

/* The ids a turn feeds (count, or -1 with err; written while they fit in cap): the previous
 * reply's last token when it is not in the KV cache yet (pending >= 0) and the reply's closing,
 * then the user's message (on the first turn BOS and the system's message before it) and the
 * generation prompt. */
static int turn_ids(const L2Tokenizer *tok, const char *system, const char *user, int first, int pending,
                    int *ids, int cap, char *err) {
    L2Message messages[2] = {{"system", system}, {"user", user}};
    int with_system = first && system, n = 0, k;
    if (pending >= 0) {
        if (cap > 0) ids[0] = pending;
        n = 1;
    }
    if (!first) {
        if ((k = l2_chat_close_reply(tok, n < cap ? ids + n : NULL, cap - n, err)) < 0) return -1;
        n += k;
    }
    k = l2_chat_render(tok, messages + !with_system, 1 + with_system, first, 1, n < cap ? ids + n : NULL,
                       cap - n, err);
    return k < 0 ? -1 : n + k;
}

/* The chat loop: each turn feeds only its new ids after what the KV cache holds. */
static int chat(L2Model *model, const L2Tokenizer *tok, L2Sampler *sampler, Printer *pr, const Options *o,
                char *err) {
    int im_end;
    if (!l2_tokenizer_chat_ids(tok, NULL, &im_end))
        return fail(1, "tokenizer.bin has no chat template (<|im_start|>, <|im_end|>): -m chat needs a "
                       "chat-tuned model's tokenizer.bin (llama2zh sft)");
    int stop[3] = {im_end, l2_tokenizer_eos_id(tok), l2_tokenizer_bos_id(tok)};
    int seq_len = l2_model_config(model)->seq_len, tty = isatty(STDIN_FILENO);
    int *ids = NULL, cap = 0, pos = 0, pending = -1, status = 1;
    char *line = NULL;
    size_t line_cap = 0;
    const char *user = *o->prompt ? o->prompt : NULL;
    for (int first = 1;; first = 0) {
        if (!user && !(user = read_user(&line, &line_cap, tty))) {
            status = 0;
            break;
        }
        int n = turn_ids(tok, o->system, user, first, pending, ids, cap, err);
        if (n > cap) {
            int *grown = realloc(ids, (size_t)n * sizeof(int));
            if (!grown) {
                fail(1, "out of memory for the conversation");
                break;
            }
            ids = grown;
            cap = n;
            n = turn_ids(tok, o->system, user, first, pending, ids, cap, err);
        }
        if (n < 0) {
            fail(1, "%s", err);
            break;
        }
        if (pos + n > seq_len) {
            status = fail(0, "the conversation no longer fits in the model's context (seq_len %d)", seq_len);
            break;
        }
        if (tty) fputs("Assistant: ", stderr);
        l2_decoder_init(&pr->dec); /* a reply's text starts afresh: its leading space dropped */
        int end_pos, n_gen = l2_generate(model, sampler, ids, n, pos, 0, o->steps, stop, 3, NULL, 0, print_token,
                                         pr, &end_pos, err);
        if (n_gen < 0 || pr->failed) {
            fputc('\n', stdout);
            fail(1, "%s", err);
            break;
        }
        fwrite(pr->buf, 1, l2_decode_finish(tok, &pr->dec, pr->buf), stdout);
        fputc('\n', stdout);
        fflush(stdout);
        pending = end_pos < pos + n + n_gen ? pr->last : -1;
        pos = end_pos;
        user = NULL;
        if (pos >= seq_len) { /* the reply filled the context: no room for another turn */
            status = fail(0, "the conversation no longer fits in the model's context (seq_len %d)", seq_len);
            break;
        }
    }
    free(line);
    free(ids);
    return status;
}

/* A llama2.c-format tokenizer.bin cannot say how text is normalized: when the tokenizer.model
 * beside it shows a normalizer, say once that this file encodes without it. */
static void warn_normalizer(const L2Tokenizer *tok, const char *tokenizer_path) {
    const char *slash = strrchr(tokenizer_path, '/');
    int dir_len = slash ? (int)(slash - tokenizer_path + 1) : 0;
    char model_path[4096], note[8192];
    if (snprintf(model_path, sizeof model_path, "%.*stokenizer.model", dir_len, tokenizer_path) >= (int)sizeof model_path)
        return;
    if (l2_tokenizer_normalizer_note(tok, model_path, note, sizeof note)) fprintf(stderr, "%s\n", note);
}

int main(int argc, char **argv) {
    if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        fputs(HELP, stdout);
        return 0;
    }
    Options o = {.tokenizer_path = "tokenizer.bin", .prompt = "", .temperature = 1.0f, .topp = 0.9f,
                 .seed = (unsigned long long)time(NULL), .steps = 256};
    int status = parse_args(argc, argv, &o);
    if (status) return status;

    char err[L2_ERR_SIZE];
    status = 1;
    L2Tokenizer *tok = NULL;
    L2Sampler *sampler = NULL;
    Printer pr = {.err = err};
    L2Model *model = l2_model_open(o.model_path, err);
    if (!model) {
        fail(1, "%s", err);
        goto done;
    }
    const L2Config *cfg = l2_model_config(model);
    tok = l2_tokenizer_open(o.tokenizer_path, cfg->vocab_size, err);
    if (!tok) {
        fail(1, "%s", err);
        goto done;
    }
    warn_normalizer(tok, o.tokenizer_path);
    sampler = l2_sampler_new(cfg->vocab_size, o.temperature, o.topp, o.seed);
    pr.tok = tok;
    pr.buf = malloc(l2_decode_bound(tok));
    if (!sampler || !pr.buf || l2_sampler_set_penalties(sampler, o.presence, o.frequency)) {
        fail(1, "out of memory");
        goto done;
    }
    l2_decoder_init(&pr.dec);
    status = o.chat ? chat(model, tok, sampler, &pr, &o, err) : generate(model, tok, sampler, &pr, &o, err);
done:
    free(pr.buf);
    l2_sampler_free(sampler);
    if (tok) l2_tokenizer_close(tok);
    l2_model_close(model);
    return status;
}
