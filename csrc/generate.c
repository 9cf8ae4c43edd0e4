/* generate.c - the generation loop shared by run.c and the Python binding:
 * llama2.c's, with the stop tokens and the output as parameters. */
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

    int n_out = 0;
    int token = prompt_ids[0];
    /* position pos computes the token at pos + 1: forced from the prompt
     * while there is one, sampled after */
    for (int pos = 0; pos < steps; pos++) {
        float *logits = l2_model_forward(m, token, pos, err);
        if (!logits) return -1;
        if (pos < n_prompt - 1) {
            token = prompt_ids[pos + 1];
            continue;
        }
        token = l2_sample(s, logits);
        if (token == stop_a || token == stop_b) break;
        if (n_out < max_out && out) out[n_out] = token;
        n_out++;
        if (on_token && on_token(ctx, token)) break;
    }
    return n_out;
}
