/* llama2.h - the public C API of the llama2zh engine.
 *
 * Used by run.c and, through cffi, by llama2zh/engine.py (which parses the
 * declarations below: keep them plain C, one per line group, no macros
 * other than integer #defines).
 *
 * Errors: no function here exits or prints. A function that can fail takes
 * `char *err` (L2_ERR_SIZE bytes) and on failure returns NULL or a negative
 * number and writes one line (no newline) saying what was wrong.
 */
#ifndef LLAMA2_H
#define LLAMA2_H

#include <stddef.h>

#define L2_ERR_SIZE 256

/* ---- model.c: model.bin loading (mmap, validated) and the forward pass ---- */

typedef struct {
    int dim;               /* transformer width */
    int hidden_dim;        /* SwiGLU hidden width */
    int n_layers;
    int n_heads;
    int n_kv_heads;        /* grouped-query attention: n_heads % n_kv_heads == 0 */
    int vocab_size;
    int seq_len;           /* longest context the model was built for */
    int shared_classifier; /* 1: the classifier is the token embedding */
    int version;           /* file format: 0 legacy, 1 ak42 fp32, 2 ak42 int8 (Q8_0), 3 ak42 4-bit */
    int group_size;        /* version 2: values per int8 group with one fp32 scale; version 3:
                              per 4-bit group with an fp16 scale and min; else 0 */
    int embedding_bits;    /* version 3: 4 or 8, the embedding's (and unshared classifier's); else 0 */
    int int8_group_size;   /* version 3: the group size of its int8 matrices (an int8 embedding,
                              int8 layers); 0 when it has none */
    unsigned char int8_layers[128]; /* version 3: bit l % 8 of byte l / 8 set when layer l's seven
                                       matrices are int8 (Q8_0, int8_group_size); else 0 */
} L2Config;

typedef struct L2Model L2Model;

/* The matmul kernels are the fastest set this CPU runs, unless the environment variable
 * LLAMA2ZH_KERNEL names one (portable, avx2 or avx512: opening fails when the CPU lacks
 * it). The threads are OMP_NUM_THREADS when set, else one per physical core. */
L2Model *l2_model_open(const char *path, char *err);
void l2_model_close(L2Model *m);
const L2Config *l2_model_config(const L2Model *m);
/* Runs `token` at position `pos` (the KV cache must already hold positions
 * 0..pos-1) and returns vocab_size logits, owned by the model and valid until
 * the next call; NULL with err set when token or pos is out of range. */
float *l2_model_forward(L2Model *m, int token, int pos, char *err);
/* Runs the n tokens at positions pos..pos+n-1 as batches (each weight read once per batch,
 * not once per token: prompts go much faster) and returns the last token's logits, as
 * l2_model_forward would after n calls. With all_logits not NULL it also writes every
 * token's logits there (n * vocab_size floats). NULL with err set on a bad token or range. */
float *l2_model_prefill(L2Model *m, const int *tokens, int n, int pos, float *all_logits,
                        char *err);
/* The name of the kernel set in use: "portable", "avx2" or "avx512". */
const char *l2_model_kernel(const L2Model *m);
/* Sets the threads the forward pass uses (n_threads <= 0: the default); returns the count,
 * or -1 (the setting unchanged) when out of memory for their buffers. */
int l2_model_set_threads(L2Model *m, int n_threads);

/* ---- model.c: a batch of independent sequences, for serving ---- */

/* Up to max_seqs sequences, each in a slot with its own KV cache, advanced together: a step
 * runs one token of each of several sequences, each at its own position, and reads each
 * weight once for all of them (as prefill does for a prompt's tokens). Each sequence's logits
 * are those it gets run alone by l2_model_prefill and l2_model_forward: the same bits, except
 * with float32 weights on the avx2 and avx512 kernels, whose one-token matmul adds in another
 * order than their many-token one (then within float rounding). A slot takes 2 * n_layers *
 * seq_len * kv_dim floats of cache (kv_dim = dim / n_heads * n_kv_heads; pages its positions
 * never reach stay untouched) and 2 * vocab_size floats of logits at most: 3.6 MiB for the
 * stories15M shape (seq_len 256, vocab 32000). A batch runs in its model's buffers, with its
 * threads: calls on a model and on its batches must not overlap, and the model must outlive
 * them. A slot's positions run in order: a call at position pos needs the slot's cache to
 * hold 0..pos-1 (pos 0 starts a new sequence; any pos below what it holds drops the positions
 * from pos on). Errors leave every slot as it was. */
typedef struct L2Batch L2Batch;

L2Batch *l2_batch_new(L2Model *m, int max_seqs, char *err);
void l2_batch_free(L2Batch *b);
/* Runs ids[0..n) at positions pos..pos+n-1 of the sequence in slot (slots count from 0): a new
 * prompt at pos 0, or a chunk of one anywhere after, between steps. The slot's logits become
 * the last id's. Returns 0, or -1 with err set (a bad slot, id or position). */
int l2_batch_prefill(L2Batch *b, int slot, const int *ids, int n, int pos, char *err);
/* Advances n sequences (distinct slots) by one token each: tokens[i] at positions[i] in
 * slots[i]; each slot's logits become its token's. Returns 0, or -1 with err set (a bad or
 * repeated slot, a bad token or position: then nothing runs). */
int l2_batch_step(L2Batch *b, const int *slots, const int *tokens, const int *positions, int n,
                  char *err);
/* The vocab_size logits of the slot's last token run, valid until the slot runs again; NULL
 * when the slot is out of range. */
const float *l2_batch_logits(const L2Batch *b, int slot);

/* ---- tokenizer.c: tokenizer.bin loading, encode, streaming decode, chat rendering ---- */

typedef struct L2Tokenizer L2Tokenizer;

/* vocab_size > 0: the file must hold exactly that many pieces (the model's
 * vocab); vocab_size == 0: accept the piece count the file holds. */
L2Tokenizer *l2_tokenizer_open(const char *path, int vocab_size, char *err);
void l2_tokenizer_close(L2Tokenizer *t);
int l2_tokenizer_vocab_size(const L2Tokenizer *t);
int l2_tokenizer_bos_id(const L2Tokenizer *t);
int l2_tokenizer_eos_id(const L2Tokenizer *t);
/* 1 and the ids of <|im_start|> and <|im_end|> when tokenizer.bin carries a chat template
 * (trailer version 2), else 0. */
int l2_tokenizer_chat_ids(const L2Tokenizer *t, int *im_start, int *im_end);
/* A tokenizer.bin without trailer (llama2.c's own files, llama2.c-zh's) cannot say how text is
 * normalized, and is read as normalizing nothing. 1 and a one-line note in `note` (size bytes)
 * when the SentencePiece tokenizer.model at model_path shows a normalizer that this reading
 * lacks (e.g. baichuan's NFKC); else 0 and "". */
int l2_tokenizer_normalizer_note(const L2Tokenizer *t, const char *model_path, char *note, size_t size);
/* Encodes `len` bytes of text as SentencePiece does. Writes at most max_ids
 * ids and returns how many the text encodes to (so a caller whose buffer was
 * too small can retry with a bigger one), or -1 with err set. */
int l2_encode(const L2Tokenizer *t, const char *text, size_t len, int bos, int eos,
              int *ids, int max_ids, char *err);

/* Streaming decoder state: bytes of a UTF-8 character still incomplete, and
 * whether any text has been produced yet (SentencePiece drops the leading
 * space of the first piece). Zero it (or call l2_decoder_init) to start. */
typedef struct {
    unsigned char pending[4];
    int n_pending;
    int started;
} L2Decoder;

void l2_decoder_init(L2Decoder *d);
/* Bytes an `out` buffer of l2_decode_step / l2_decode_finish must hold. */
size_t l2_decode_bound(const L2Tokenizer *t);
/* Appends the text of one id as whole UTF-8 characters (a character split
 * across byte pieces comes out when its last byte arrives; bytes that cannot
 * form a character come out as U+FFFD, as in SentencePiece). Returns the
 * number of bytes written to out, or -1 with err set for an invalid id. */
int l2_decode_step(const L2Tokenizer *t, L2Decoder *d, int id, char *out, char *err);
/* Flushes what is still pending (as U+FFFD); returns bytes written. */
int l2_decode_finish(const L2Tokenizer *t, L2Decoder *d, char *out);
/* Whole-sequence decode, equal to SentencePiece's decode(ids). Writes at most
 * cap bytes (no terminator) and returns the full length in bytes, or -1 with
 * err set. */
long l2_decode(const L2Tokenizer *t, const int *ids, int n_ids, char *out, size_t cap, char *err);

/* Chat (ChatML, the rule of llama2zh/chat.py): per message <|im_start|> encode(role "\n" content)
 * <|im_end|> encode("\n"), each stretch of text encoded on its own as plain text, so text never
 * becomes the two control pieces. Roles: system, user, assistant. */
typedef struct {
    const char *role;
    const char *content;
} L2Message;

/* The ids of a conversation: BOS when bos, each message, and with add_generation_prompt
 * <|im_start|> encode("assistant\n"). Writes at most max_ids ids and returns the count (as
 * l2_encode does), or -1 with err set: no chat template in tokenizer.bin, an unknown role, a
 * NULL content. */
int l2_chat_render(const L2Tokenizer *t, const L2Message *messages, int n_messages, int bos,
                   int add_generation_prompt, int *ids, int max_ids, char *err);
/* <|im_end|> encode("\n"): what closes a reply the model generated. Count or -1 as above. */
int l2_chat_close_reply(const L2Tokenizer *t, int *ids, int max_ids, char *err);

/* ---- sampler.c: argmax / temperature / top-p, seeded; presence and frequency penalties ---- */

typedef struct L2Sampler L2Sampler;

/* temperature 0 means greedy (argmax); topp outside (0, 1) means no top-p. */
L2Sampler *l2_sampler_new(int vocab_size, float temperature, float topp,
                          unsigned long long seed);
void l2_sampler_free(L2Sampler *s);
/* OpenAI's penalties: before each pick, a token's logit is lowered by frequency times the
 * times it was picked since the last reset, and by presence once if it was (negative values
 * encourage repeats). Resets the counts; -1 when out of memory. */
int l2_sampler_set_penalties(L2Sampler *s, float presence, float frequency);
/* Forgets the tokens picked so far (l2_generate does at each call: one reply, one count). */
void l2_sampler_reset(L2Sampler *s);
/* Picks the next token; may overwrite logits. */
int l2_sample(L2Sampler *s, float *logits);

/* ---- generate.c: the generation loop shared by run.c and the binding ---- */

/* Called for every generated token; return nonzero to stop early. */
typedef int (*l2_token_fn)(void *ctx, int token);

/* Feeds ids[0..n_ids) (n_ids >= 1) as one batch at positions pos.. (the KV cache must hold
 * 0..pos-1), then samples: up to max_new tokens (0: no limit), stopping before a token of
 * stop[0..n_stop) (not output), or once a generated token lands at position max_pos (0, or more
 * than seq_len, means seq_len; with pos 0 it is llama2.c's `steps`). When pos + n_ids exceeds
 * max_pos only the ids before max_pos are fed, and nothing is generated. Generated ids go to out
 * (at most max_out) and to on_token if not NULL (nonzero return: stop). *end_pos (if not NULL)
 * receives how many positions the KV cache now holds: every id fed and every token generated,
 * except the last one when generation ended on anything but a stop token. Returns how many
 * tokens were generated, or -1 with err set. */
int l2_generate(L2Model *m, L2Sampler *s, const int *ids, int n_ids, int pos, int max_pos,
                int max_new, const int *stop, int n_stop, int *out, int max_out,
                l2_token_fn on_token, void *ctx, int *end_pos, char *err);

#endif
