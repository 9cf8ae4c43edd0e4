/* generate.c - the generation loop shared by run.c and the Python binding:
 * llama2.c's, with the stop tokens and the output as parameters, the ids fed as one batch
 * instead of token by token, and a start position so a conversation continues in the KV cache. */
#include "llama2.h"
#include "common.h"

static int is_stop(int token, const int *stop, int n_stop) {
    for (int i = 0; i < n_stop; i++)
        if (token == stop[i]) return 1;
    return 0;
}

int l2_generate(L2Model *m, L2Sampler *s, const int *ids, int n_ids, int pos, int max_pos,
                int max_new, const int *stop, int n_stop, int *out, int max_out,
                l2_token_fn on_token, void *ctx, int *end_pos, char *err) {
    if (!ids || n_ids < 1) {
        set_err(err, "generate needs at least one token to feed");
        return -1;
    }
    if (max_pos < 0 || max_new < 0 || n_stop < 0 || (n_stop > 0 && !stop)) {
        set_err(err, "generate: max_pos, max_new and the stop count must be >= 0");
        return -1;
    }
    int seq_len = l2_model_config(m)->seq_len;
    if (max_pos == 0 || max_pos > seq_len) max_pos = seq_len;
    if (pos < 0 || pos >= max_pos) {
        set_err(err, "generate: position %d is outside the context (0..%d)", pos, max_pos - 1);
        return -1;
    }

    /* the ids go through as a batch (those before max_pos when they do not all fit); the
     * logits at the last one give the first sampled token */
    int n_feed = n_ids < max_pos - pos ? n_ids : max_pos - pos;
    float *logits = l2_model_prefill(m, ids, n_feed, pos, NULL, err);
    if (!logits) return -1;
    pos += n_feed; /* from here on: the positions the KV cache holds */

    int n_out = 0;
    l2_sampler_reset(s); /* the penalties count this call's tokens */
    while (n_feed == n_ids) { /* the logits at pos - 1 give the token at pos */
        int token = l2_sample(s, logits);
        if (is_stop(token, stop, n_stop)) break;
        if (n_out < max_out && out) out[n_out] = token;
        n_out++;
        if ((on_token && on_token(ctx, token)) || n_out == max_new || pos == max_pos) break;
        logits = l2_model_forward(m, token, pos++, err);
        if (!logits) return -1;
    }
    if (end_pos) *end_pos = pos;
    return n_out;
}
