/* fuzz_loaders.c - a libFuzzer harness for the two file loaders, model.bin and tokenizer.bin.
 *
 * The first byte of an input picks the loader (even: model, odd: tokenizer) and, for a
 * model, the kernels (bit 1 set: the portable ones, else the best this CPU runs, whose
 * 4-bit and int8 matrices are repacked at load); the rest is the file. A file that loads is then used a little (a forward pass; an encode and a
 * decode of every piece), so that a loader which accepts what it should not shows up under
 * AddressSanitizer and UBSan as a bad access. Built and run by `make fuzz`.
 */
#define _GNU_SOURCE /* memfd_create */
#include "llama2.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* The loaders take a path: an in-memory file keeps the disk out of it. */
static int memory_file(const uint8_t *data, size_t size, char *path, size_t cap) {
    int fd = memfd_create("l2fuzz", MFD_CLOEXEC);
    if (fd < 0) abort();
    for (size_t done = 0; done < size;) {
        ssize_t n = write(fd, data + done, size - done);
        if (n <= 0) abort();
        done += (size_t)n;
    }
    snprintf(path, cap, "/proc/self/fd/%d", fd);
    return fd;
}

static void use_model(L2Model *m, char *err) {
    const L2Config *c = l2_model_config(m);
    int tokens[3] = {0, c->vocab_size - 1, c->vocab_size / 2};
    int n = c->seq_len < 3 ? c->seq_len : 3;
    float *logits = l2_model_prefill(m, tokens, n, 0, NULL, err);
    if (!logits) abort(); /* in range by construction */
    if (c->seq_len > n && !l2_model_forward(m, tokens[0], n, err)) abort();
}

static void use_tokenizer(L2Tokenizer *t, char *err) {
    static const char text[] = "Once upon a time, 从前有一个小女孩 🌸 <0x41> \xff\xfe";
    int ids[256];
    int n = l2_encode(t, text, sizeof(text) - 1, 1, 1, ids, 256, err);
    if (n < 0) return;
    char *out = malloc(l2_decode_bound(t) * 2);
    if (!out) abort();
    L2Decoder d;
    l2_decoder_init(&d);
    int vocab = l2_tokenizer_vocab_size(t);
    for (int id = 0; id < vocab; id++) l2_decode_step(t, &d, id, out, err);
    l2_decode_finish(t, &d, out);
    l2_decode(t, ids, n < 256 ? n : 256, out, l2_decode_bound(t), err);
    free(out);
    if (l2_tokenizer_chat_ids(t, NULL, NULL)) {
        L2Message chat[2] = {{"system", "<|im_start|>"}, {"user", text}};
        if (l2_chat_render(t, chat, 2, 1, 1, ids, 256, err) < 0) abort(); /* valid by construction */
        if (l2_chat_close_reply(t, ids, 256, err) < 0) abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    char path[64], err[L2_ERR_SIZE];
    int fd = memory_file(data + 1, size - 1, path, sizeof(path));
    if (data[0] % 2 == 0) {
        setenv("LLAMA2ZH_KERNEL", data[0] & 2 ? "portable" : "", 1);
        L2Model *m = l2_model_open(path, err);
        if (m) {
            use_model(m, err);
            l2_model_close(m);
        }
    } else {
        L2Tokenizer *t = l2_tokenizer_open(path, 0, err);
        if (t) {
            use_tokenizer(t, err);
            l2_tokenizer_close(t);
        }
    }
    close(fd);
    return 0;
}
