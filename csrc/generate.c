/* generate.c - the generation loop shared by run.c and the Python binding:
 * llama2.c's, with the stop tokens and the output as parameters, and the prompt run as
 * one batch instead of token by token. */
#include "llama2.h"
#include "common.h"

int l2_generate(L2Model *m, L2Sampler *s, const int *prompt_ids, int n_prompt,
                int steps, int stop_a, int stop_b, int *out, int max_out,
                l2_token_fn on_token, void *ctx, char *err) {
    if (!prompt_ids || n_prompt < 1) {
        set_err(err, "generate needs at least one prompt token");
        return -1;
    }
    if (steps < 0) {
        set_err(err, "steps must be >= 0, got %d", steps);
        return -1;
    }
    int seq_len = l2_model_config(m)->seq_len;
    if (steps == 0 || steps > seq_len) steps = seq_len;

    /* the prompt goes through as a batch (with fewer steps than prompt tokens, only the
     * first `steps`); the logits at its last position give the first sampled token */
    int n_pre = n_prompt < steps ? n_prompt : steps;
    float *logits = l2_model_prefill(m, prompt_ids, n_pre, 0, NULL, err);
    if (!logits) return -1;
    if (n_pre < n_prompt) return 0;

    int n_out = 0;
    for (int pos = n_prompt - 1;;) { /* the logits at pos give the token at pos + 1 */
        int token = l2_sample(s, logits);
        if (token == stop_a || token == stop_b) break;
        if (n_out < max_out && out) out[n_out] = token;
        n_out++;
        if (on_token && on_token(ctx, token)) break;
        if (++pos >= steps) break;
        logits = l2_model_forward(m, token, pos, err);
        if (!logits) return -1;
    }
    return n_out;
}
