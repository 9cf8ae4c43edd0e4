/* tokenizer.c - tokenizer.bin loading, SentencePiece-exact BPE and unigram
 * encode, UTF-8-safe streaming decode, ChatML rendering.
 *
 * tokenizer.bin (little-endian; llama2zh/vocab/export.py writes it):
 *   uint32 max_token_length, then per piece: float32 score, uint32 length,
 *   bytes (SentencePiece's piece with U+2581 written as ' ', byte pieces as
 *   <0xXX>). Upstream llama2.c stops there. Then an optional trailer running
 *   exactly to the end of the file: uint32 magic "L2ZT", uint32 version (1 or 2),
 *   uint32 payload length, payload:
 *     uint32 piece count; int32 unk, bos, eos, pad ids (-1: none);
 *     uint32 flags (1 add_dummy_prefix, 2 remove_extra_whitespaces,
 *       4 escape_whitespaces (required), 8 treat_whitespace_as_suffix,
 *       16 byte_fallback, 32 unigram model (else BPE));
 *     int32 byte_ids[256]; uint8 types[n] (SentencePiece's: 1 normal,
 *     2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte);
 *     uint32 length + bytes of the unk surface;
 *     uint32 rule count, then per rule uint16 key length, uint16 value length,
 *     key, value: the normalizer (longest key at each position is replaced);
 *     version 2 only (chat-tuned models): int32 im_start, im_end ids (two distinct
 *     control pieces), uint32 length + bytes of the template's name ("chatml").
 *   A trailer is recognised by its magic AND its length field matching the
 *   bytes left. Without one (upstream files): unk 0, bos 1, eos 2,
 *   add_dummy_prefix on, byte pieces found by their text <0xXX>, byte
 *   fallback on when there are any, types inferred.
 *
 * Encode follows SentencePiece (normalizer.cc, bpe_model.cc, unigram_model.cc,
 * sentencepiece_processor.cc): normalize, then
 *   BPE: split into characters and user-defined symbols, merge the
 *   best-scoring adjacent pair (leftmost on ties) with a heap (a word at a
 *   time when no piece can cross into a word), resegment merges into unused
 *   pieces;
 *   unigram: Viterbi over every piece that matches at each character
 *   (EncodeOptimized: the best path ending at each byte position);
 * then byte fallback for unknown symbols (or one <unk> per run of them).
 * Input bytes that are not UTF-8 become U+FFFD, one per byte, as
 * SentencePiece's normalizer does.
 * Internally the normalized text holds ' ' where SentencePiece holds U+2581,
 * matching the piece texts in the file. */
#include "llama2.h"
#include "common.h"

#include <errno.h>
#include <float.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { T_NORMAL = 1, T_UNKNOWN = 2, T_CONTROL = 3, T_USER = 4, T_UNUSED = 5, T_BYTE = 6 };
enum { F_DUMMY_PREFIX = 1, F_REMOVE_EXTRA = 2, F_ESCAPE = 4, F_SUFFIX = 8, F_BYTE_FALLBACK = 16, F_UNIGRAM = 32 };
#define ALL_FLAGS 63u

#define TRAILER_MAGIC 0x545A324Cu  /* the bytes "L2ZT" */
#define MAX_TOKEN_LENGTH 65536u    /* longer pieces mean this is not a tokenizer.bin */
#define CHAT_TEMPLATE "chatml"     /* the only template l2_chat_render knows */

static const unsigned char SPACE_SYMBOL[3] = {0xE2, 0x96, 0x81};    /* U+2581 */
static const unsigned char REPLACEMENT[3] = {0xEF, 0xBF, 0xBD};     /* U+FFFD */
static const char DEFAULT_UNK_SURFACE[] = " \xE2\x81\x87 ";         /* " ⁇ " */

/* Open-addressing hash set of byte strings given by index into key/len. */
typedef struct {
    const unsigned char *const *key;
    const int *len;
    int *slot; /* index + 1; 0 = empty */
    uint32_t mask;
} Table;

/* A trie over byte strings, its edges (node, byte) -> child in one hash table, so that the
 * longest key prefixing a text is found in one walk over the text instead of a hashed probe
 * per possible length (baichuan's NFKC normalizer has 224k keys, up to 10 bytes). */
typedef struct {
    uint32_t edge; /* parent node << 8 | byte */
    int child;     /* 0: an empty slot (the root is no node's child) */
} Edge;

#define TRIE_MAX_NODES (1 << 24) /* an edge holds its parent node in 24 bits */
#define TRIE_PATH 16               /* bytes of the last key added whose walk is kept */

typedef struct {
    int root[256]; /* the root's children, the step taken at every position, without hashing */
    Edge *slot;    /* every other edge; at most half the slots are used */
    uint32_t mask;
    int n_nodes;   /* node 0 is the root */
    int *value;    /* per node: the value of the key that ends there, or -1 */
    /* The last key added, its first bytes and the nodes they lead to: the next key walks on from
     * their common prefix (the normalizer's keys come sorted: a third of baichuan's load time). */
    unsigned char last[TRIE_PATH];
    int last_node[TRIE_PATH];
    size_t last_len;
} Trie;

struct L2Tokenizer {
    unsigned char *file; /* the whole file: piece texts and rules point into it */
    int n;
    const unsigned char **piece;
    int *piece_len;
    float *score;
    unsigned char *type;
    short *byte_of; /* byte value of a byte piece, -1 for other pieces */
    int byte_id[256];
    int unk_id, bos_id, eos_id;
    unsigned flags;
    const unsigned char *unk_surface;
    int unk_surface_len;
    int has_unused;
    int words_apart; /* BPE: no merge crosses into a word, a space after a non-space (see bpe) */
    Table pieces; /* mergeable pieces (normal, user-defined, unused) by text */
    int max_merge_len;
    float min_score; /* over normal pieces: an unknown character scores 10 less */
    /* user-defined symbols (to piece ids), as found in normalized text (' ') and in raw input (U+2581) */
    Trie user, user_raw;
    /* normalizer rules: their keys (to rule indexes) and replacements */
    Trie rules;
    const unsigned char **rule_val;
    int *rule_val_len;
    size_t decode_bound;
    int im_start, im_end; /* the chat template's special ids (trailer v2); -1 without one */
    int has_trailer;      /* 0: a llama2.c file, which cannot say how text is normalized */
};

static uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ---- hash table ---- */

/* FNV-1a, one byte at a time so a growing key can be hashed as it grows. */
#define HASH_INIT 2166136261u
static uint32_t hash_step(uint32_t h, unsigned char c) { return (h ^ c) * 16777619u; }

static uint32_t hash_bytes(const unsigned char *s, size_t n) {
    uint32_t h = HASH_INIT;
    for (size_t i = 0; i < n; i++) h = hash_step(h, s[i]);
    return h;
}

static int table_init(Table *tb, const unsigned char *const *key, const int *len, int n) {
    uint32_t size = 16;
    while (size < 2u * (uint32_t)n) size <<= 1;
    tb->key = key;
    tb->len = len;
    tb->mask = size - 1;
    tb->slot = calloc(size, sizeof(int));
    return tb->slot != NULL;
}

/* Index of the key s (n bytes, whose hash_bytes is hash), or -1. */
static int table_find_hashed(const Table *tb, const unsigned char *s, size_t n, uint32_t hash) {
    for (uint32_t h = hash & tb->mask;; h = (h + 1) & tb->mask) {
        int i = tb->slot[h] - 1;
        if (i < 0) return -1;
        if ((size_t)tb->len[i] == n && memcmp(tb->key[i], s, n) == 0) return i;
    }
}

static int table_find(const Table *tb, const unsigned char *s, size_t n) {
    return table_find_hashed(tb, s, n, hash_bytes(s, n));
}

/* Adds entry i unless its key is already there (the first id wins). */
static void table_add(Table *tb, int i) {
    uint32_t h = hash_bytes(tb->key[i], tb->len[i]) & tb->mask;
    for (; tb->slot[h]; h = (h + 1) & tb->mask) {
        int j = tb->slot[h] - 1;
        if (tb->len[j] == tb->len[i] && memcmp(tb->key[j], tb->key[i], tb->len[i]) == 0) return;
    }
    tb->slot[h] = i + 1;
}

/* ---- trie ---- */

static int trie_init(Trie *tr) {
    memset(tr, 0, sizeof *tr);
    tr->mask = 15;
    tr->n_nodes = 1;
    tr->slot = calloc(tr->mask + 1, sizeof *tr->slot);
    tr->value = malloc((tr->mask + 1) / 2 * sizeof(int));
    if (!tr->slot || !tr->value) return 0;
    tr->value[0] = -1;
    return 1;
}

static void trie_free(Trie *tr) {
    free(tr->slot);
    free(tr->value);
}

static uint32_t edge_slot(const Trie *tr, uint32_t edge) {
    uint32_t h = edge * 2654435761u;
    return (h ^ h >> 16) & tr->mask;
}

/* The slot holding edge, or the empty one where it would go. */
static uint32_t edge_find(const Trie *tr, uint32_t edge) {
    uint32_t h = edge_slot(tr, edge);
    while (tr->slot[h].child && tr->slot[h].edge != edge) h = (h + 1) & tr->mask;
    return h;
}

/* The child of node by byte c, or 0 when there is none. */
static int trie_child(const Trie *tr, int node, unsigned char c) {
    return node == 0 ? tr->root[c] : tr->slot[edge_find(tr, (uint32_t)node << 8 | c)].child;
}

/* Doubles the table and the room for nodes; 0 when out of memory or past TRIE_MAX_NODES. */
static int trie_grow(Trie *tr) {
    uint32_t size = 2 * (tr->mask + 1), old_size = tr->mask + 1;
    if (size / 2 > TRIE_MAX_NODES) return 0;
    int *value = realloc(tr->value, size / 2 * sizeof(int));
    if (!value) return 0;
    tr->value = value;
    Edge *old = tr->slot;
    tr->slot = calloc(size, sizeof *tr->slot);
    if (!tr->slot) {
        tr->slot = old;
        return 0;
    }
    tr->mask = size - 1;
    for (uint32_t i = 0; i < old_size; i++)
        if (old[i].child) tr->slot[edge_find(tr, old[i].edge)] = old[i];
    free(old);
    return 1;
}

/* Adds key s (n > 0 bytes) with value v unless the key is there (the first value wins); 0 when
 * out of memory or past TRIE_MAX_NODES. */
static int trie_add(Trie *tr, const unsigned char *s, size_t n, int v) {
    int node = 0;
    size_t i = 0;
    for (; i < n && i < tr->last_len && tr->last[i] == s[i]; i++) node = tr->last_node[i];
    for (; i < n; i++) {
        int next = trie_child(tr, node, s[i]);
        if (next == 0) {
            if (tr->n_nodes == (int)(tr->mask + 1) / 2 && !trie_grow(tr)) return 0;
            next = tr->n_nodes++;
            tr->value[next] = -1;
            if (node == 0)
                tr->root[s[i]] = next;
            else
                tr->slot[edge_find(tr, (uint32_t)node << 8 | s[i])] = (Edge){(uint32_t)node << 8 | s[i], next};
        }
        node = next;
        if (i < TRIE_PATH) {
            tr->last[i] = s[i];
            tr->last_node[i] = node;
        }
    }
    tr->last_len = n < TRIE_PATH ? n : TRIE_PATH;
    if (tr->value[node] < 0) tr->value[node] = v;
    return 1;
}

/* The value of the longest key that prefixes s (n bytes), its length in *len; -1 when none. */
static int trie_longest(const Trie *tr, const unsigned char *s, size_t n, size_t *len) {
    int found = -1, node = 0;
    for (size_t i = 0; i < n; i++) {
        node = trie_child(tr, node, s[i]);
        if (node == 0) break;
        if (tr->value[node] >= 0) {
            found = tr->value[node];
            *len = i + 1;
        }
    }
    return found;
}

/* ---- UTF-8, as SentencePiece's DecodeUTF8 judges it (well-formed UTF-8) ---- */

static int is_trail(unsigned char c) { return (c & 0xC0) == 0x80; }

/* Bytes in the character a lead byte starts; 0 when it cannot start one. */
static int utf8_need(unsigned char c) {
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) return 2;
    if (c >= 0xE0 && c <= 0xEF) return 3;
    if (c >= 0xF0 && c <= 0xF4) return 4;
    return 0;
}

/* Whether the first k bytes of s can begin a well-formed character (the
 * second byte's range rules out overlong forms, surrogates, > U+10FFFF). */
static int utf8_prefix_ok(const unsigned char *s, int k) {
    if (utf8_need(s[0]) == 0) return 0;
    if (k >= 2) {
        unsigned char c = s[0], b = s[1];
        if (!is_trail(b) || (c == 0xE0 && b < 0xA0) || (c == 0xED && b > 0x9F) ||
            (c == 0xF0 && b < 0x90) || (c == 0xF4 && b > 0x8F))
            return 0;
    }
    for (int j = 2; j < k; j++)
        if (!is_trail(s[j])) return 0;
    return 1;
}

/* Length of the well-formed character at s (n bytes available), 0 if none. */
static int utf8_char_len(const unsigned char *s, size_t n) {
    int need = utf8_need(s[0]);
    if (need == 0 || (size_t)need > n || !utf8_prefix_ok(s, need)) return 0;
    return need;
}

/* ---- loading ---- */

static void free_tokenizer(L2Tokenizer *t) {
    if (!t) return;
    free(t->file);
    free(t->piece);
    free(t->piece_len);
    free(t->score);
    free(t->type);
    free(t->byte_of);
    free(t->pieces.slot);
    trie_free(&t->user);
    trie_free(&t->user_raw);
    trie_free(&t->rules);
    free(t->rule_val);
    free(t->rule_val_len);
    free(t);
}

void l2_tokenizer_close(L2Tokenizer *t) { free_tokenizer(t); }

static unsigned char *read_file(const char *path, size_t *size, const char *name, char *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        set_err(err, "%s: cannot open (%s)", name, strerror(errno));
        return NULL;
    }
    unsigned char *data = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            if (cap >= (size_t)1 << 31) {
                set_err(err, "%s: too large to be a tokenizer.bin", name);
                break;
            }
            cap = cap ? 2 * cap : (size_t)1 << 20;
            unsigned char *grown = realloc(data, cap);
            if (!grown) {
                set_err(err, "%s: out of memory", name);
                break;
            }
            data = grown;
        }
        size_t got = fread(data + n, 1, cap - n, f);
        n += got;
        if (got == 0) {
            if (ferror(f)) {
                set_err(err, "%s: read error (%s)", name, strerror(errno));
                break;
            }
            fclose(f);
            *size = n;
            return data;
        }
    }
    fclose(f);
    free(data);
    return NULL;
}

static int at_trailer(const unsigned char *p, size_t left) {
    return left >= 12 && rd32(p) == TRAILER_MAGIC && rd32(p + 8) == left - 12;
}

/* Bounds-checked reader over the trailer payload. */
typedef struct {
    const unsigned char *p, *end;
    int short_read;
} Cursor;

static const unsigned char *take(Cursor *c, size_t n) {
    if ((size_t)(c->end - c->p) < n) {
        c->short_read = 1;
        c->p = c->end;
        return NULL;
    }
    const unsigned char *at = c->p;
    c->p += n;
    return at;
}

static uint32_t take32(Cursor *c) {
    const unsigned char *p = take(c, 4);
    return p ? rd32(p) : 0;
}

static int valid_id(int32_t id, int n, int allow_none) { return (allow_none && id == -1) || (id >= 0 && id < n); }

/* Version 2's chat section, read once the piece types are known. */
static int parse_chat(L2Tokenizer *t, Cursor *c, const char *name, char *err) {
    int32_t ids[2] = {(int32_t)take32(c), (int32_t)take32(c)};
    uint32_t template_len = take32(c);
    const unsigned char *template = take(c, template_len);
    if (c->short_read) {
        set_err(err, "%s: trailer's chat section is truncated", name);
        return 0;
    }
    for (int k = 0; k < 2; k++) {
        if (!valid_id(ids[k], t->n, 0)) {
            set_err(err, "%s: chat id %d is out of range (%d pieces)", name, ids[k], t->n);
            return 0;
        }
        if (t->type[ids[k]] != T_CONTROL) { /* else text could encode to it and forge a turn */
            set_err(err, "%s: chat id %d is not a control piece", name, ids[k]);
            return 0;
        }
    }
    if (ids[0] == ids[1]) {
        set_err(err, "%s: chat ids <|im_start|> and <|im_end|> are the same piece %d", name, ids[0]);
        return 0;
    }
    if (template_len != strlen(CHAT_TEMPLATE) || memcmp(template, CHAT_TEMPLATE, template_len) != 0) {
        set_err(err, "%s: unknown chat template '%.*s'", name, template_len > 32 ? 32 : (int)template_len,
                (const char *)template);
        return 0;
    }
    t->im_start = ids[0];
    t->im_end = ids[1];
    return 1;
}

static int parse_trailer(L2Tokenizer *t, const unsigned char *p, size_t left, const char *name, char *err) {
    uint32_t version = rd32(p + 4);
    if (version != 1 && version != 2) {
        set_err(err, "%s: trailer version %u is not supported (written by a newer llama2zh?)", name, version);
        return 0;
    }
    Cursor c = {p + 12, p + left, 0};
    uint32_t count = take32(&c);
    int32_t unk = (int32_t)take32(&c), bos = (int32_t)take32(&c), eos = (int32_t)take32(&c);
    take32(&c); /* pad id: nothing to do with it here */
    uint32_t flags = take32(&c);
    int32_t byte_ids[256];
    for (int b = 0; b < 256; b++) byte_ids[b] = (int32_t)take32(&c);
    const unsigned char *types = take(&c, (size_t)t->n);
    uint32_t surface_len = take32(&c);
    const unsigned char *surface = take(&c, surface_len);
    uint32_t n_rules = take32(&c);
    if (c.short_read) {
        set_err(err, "%s: trailer is truncated", name);
        return 0;
    }
    if (count != (uint32_t)t->n) {
        set_err(err, "%s: trailer says %u pieces, the file has %d", name, count, t->n);
        return 0;
    }
    if (!valid_id(unk, t->n, 0) || !valid_id(bos, t->n, 1) || !valid_id(eos, t->n, 1) || (flags & ~ALL_FLAGS)) {
        set_err(err, "%s: trailer has invalid ids or flags", name);
        return 0;
    }
    if (!(flags & F_ESCAPE)) { /* pieces write U+2581 as ' ', so spaces must be escaped */
        set_err(err, "%s: escape_whitespaces off is not supported", name);
        return 0;
    }
    for (int i = 0; i < t->n; i++) {
        if (types[i] < T_NORMAL || types[i] > T_BYTE) {
            set_err(err, "%s: piece %d has invalid type %d", name, i, types[i]);
            return 0;
        }
        t->type[i] = types[i];
    }
    for (int b = 0; b < 256; b++) {
        int32_t id = byte_ids[b];
        if (!valid_id(id, t->n, 1) || (id >= 0 && (t->type[id] != T_BYTE || t->byte_of[id] >= 0))) {
            set_err(err, "%s: trailer's byte piece for 0x%02X is invalid", name, b);
            return 0;
        }
        t->byte_id[b] = id;
        if (id >= 0) t->byte_of[id] = (short)b;
    }
    for (int i = 0; i < t->n; i++) {
        if (t->type[i] == T_BYTE && t->byte_of[i] < 0) {
            set_err(err, "%s: piece %d is a byte piece missing from the byte table", name, i);
            return 0;
        }
    }
    if (t->type[unk] != T_UNKNOWN) {
        set_err(err, "%s: unk id %d is not the unknown piece", name, unk);
        return 0;
    }
    if (n_rules > (size_t)(c.end - c.p) / 5) { /* each rule takes at least 5 bytes */
        set_err(err, "%s: trailer is truncated", name);
        return 0;
    }
    t->unk_id = unk;
    t->bos_id = bos;
    t->eos_id = eos;
    t->flags = flags;
    t->unk_surface = surface;
    t->unk_surface_len = (int)surface_len;
    t->rule_val = malloc((n_rules + 1) * sizeof *t->rule_val);
    t->rule_val_len = malloc((n_rules + 1) * sizeof(int));
    if (!t->rule_val || !t->rule_val_len) {
        set_err(err, "%s: out of memory", name);
        return 0;
    }
    for (uint32_t r = 0; r < n_rules; r++) {
        const unsigned char *lens = take(&c, 4);
        int key_len = lens ? lens[0] | lens[1] << 8 : 0, val_len = lens ? lens[2] | lens[3] << 8 : 0;
        const unsigned char *key = take(&c, (size_t)key_len);
        t->rule_val[r] = take(&c, (size_t)val_len);
        t->rule_val_len[r] = val_len;
        if (c.short_read || key_len == 0) {
            set_err(err, "%s: normalizer rule %u is malformed", name, r);
            return 0;
        }
        if (!trie_add(&t->rules, key, (size_t)key_len, (int)r)) {
            set_err(err, "%s: out of memory for the normalizer (or over %d of its key prefixes)", name,
                    TRIE_MAX_NODES);
            return 0;
        }
    }
    if (version == 2 && !parse_chat(t, &c, name, err)) return 0;
    if (c.p != c.end) {
        set_err(err, "%s: trailer has %zu unexpected bytes at its end", name, (size_t)(c.end - c.p));
        return 0;
    }
    return 1;
}

static int hex_digit(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The byte a piece text <0xXX> stands for (upper-case hex, as SentencePiece
 * writes it), or -1. */
static int byte_piece_value(const unsigned char *s, int len) {
    if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int hi = hex_digit(s[3]), lo = hex_digit(s[4]);
    return hi < 0 || lo < 0 ? -1 : hi << 4 | lo;
}

/* Where llama2.c from July 2023 (3bfa566 to c02865d) and llama2.c-zh put the byte pieces: each
 * written as the byte itself, as a UTF-8 character (0x41 "A", 0x80 C2 80): the start of a run of
 * 256 such pieces in byte order, or -1. */
static int raw_byte_run(const L2Tokenizer *t) {
    for (int start = 0; start + 256 <= t->n; start++) {
        int b = 0;
        for (; b < 256; b++) {
            unsigned char utf8[2] = {(unsigned char)(b < 0x80 ? b : 0xC0 | b >> 6), (unsigned char)(0x80 | (b & 0x3F))};
            int len = b < 0x80 ? 1 : 2;
            if (t->piece_len[start + b] != len || memcmp(t->piece[start + b], utf8, (size_t)len)) break;
        }
        if (b == 256) return start;
    }
    return -1;
}

static void set_byte_piece(L2Tokenizer *t, int id, int b) {
    t->byte_id[b] = id;
    t->byte_of[id] = (short)b;
    t->type[id] = T_BYTE;
    t->flags |= F_BYTE_FALLBACK;
}

/* The defaults for an upstream llama2.c file, which has no trailer; 0 with err when its scores
 * are a unigram model's (log probabilities), which such a file cannot say and BPE would misread. */
static int infer_defaults(L2Tokenizer *t, const char *name, char *err) {
    t->unk_id = 0;
    t->bos_id = t->n > 1 ? 1 : -1;
    t->eos_id = t->n > 2 ? 2 : -1;
    t->flags = F_DUMMY_PREFIX | F_ESCAPE;
    t->unk_surface = (const unsigned char *)DEFAULT_UNK_SURFACE;
    t->unk_surface_len = (int)strlen(DEFAULT_UNK_SURFACE);
    for (int i = 0; i < t->n; i++) {
        int b = byte_piece_value(t->piece[i], t->piece_len[i]);
        t->type[i] = T_NORMAL;
        if (i == t->unk_id) {
            t->type[i] = T_UNKNOWN;
        } else if (i == t->bos_id || i == t->eos_id) {
            t->type[i] = T_CONTROL;
        } else if (b >= 0 && t->byte_id[b] < 0) {
            set_byte_piece(t, i, b);
        } else if (t->score[i] != floorf(t->score[i])) { /* BPE scores are minus the merge rank */
            set_err(err, "%s: has no trailer and piece %d's score %g is not a BPE rank: a unigram model? "
                         "(write its tokenizer.bin with `llama2zh vocab export tokenizer.model`)",
                    name, i, (double)t->score[i]);
            return 0;
        }
    }
    int run = t->flags & F_BYTE_FALLBACK ? -1 : raw_byte_run(t);
    for (int b = 0; run >= 0 && b < 256; b++)
        if (run + b != t->unk_id && run + b != t->bos_id && run + b != t->eos_id) set_byte_piece(t, run + b, b);
    return 1;
}

/* Lookup structures shared by both kinds of file. */
static int build_index(L2Tokenizer *t, const char *name, char *err) {
    size_t max_len = 0;
    int crossing = 0;
    if (!table_init(&t->pieces, t->piece, t->piece_len, t->n)) goto oom;
    t->min_score = FLT_MAX;
    for (int i = 0; i < t->n; i++) {
        int ty = t->type[i], len = t->piece_len[i];
        if ((size_t)len > max_len) max_len = (size_t)len;
        if (ty == T_NORMAL && t->score[i] < t->min_score) t->min_score = t->score[i];
        if (ty != T_NORMAL && ty != T_USER && ty != T_UNUSED) continue;
        table_add(&t->pieces, i);
        if (len > t->max_merge_len) t->max_merge_len = len;
        if (ty == T_UNUSED) t->has_unused = 1;
        for (int k = 1; k < len; k++)
            if (t->piece[i][k] == ' ' && t->piece[i][k - 1] != ' ') crossing = 1;
    }
    /* A merge crossing into a word (a space after a non-space) would make a piece holding a
     * non-space then a space. */
    t->words_apart = !crossing;
    /* The normalizer matches user-defined symbols in the raw input, where
     * SentencePiece's U+2581 is itself, not a space. */
    unsigned char *raw = malloc(3 * max_len + 1);
    if (!raw) goto oom;
    for (int i = 0; i < t->n; i++) {
        int len = t->piece_len[i];
        if (t->type[i] != T_USER || len == 0 || table_find(&t->pieces, t->piece[i], (size_t)len) != i) continue;
        size_t raw_len = 0;
        for (int k = 0; k < len; k++) {
            if (t->piece[i][k] == ' ') {
                memcpy(raw + raw_len, SPACE_SYMBOL, 3);
                raw_len += 3;
            } else {
                raw[raw_len++] = t->piece[i][k];
            }
        }
        if (!trie_add(&t->user, t->piece[i], (size_t)len, i) || !trie_add(&t->user_raw, raw, raw_len, i)) {
            free(raw);
            goto oom;
        }
    }
    free(raw);
    /* A step writes at most 4 bytes as U+FFFD each, or 3 and then one piece. */
    if ((size_t)t->unk_surface_len > max_len) max_len = (size_t)t->unk_surface_len;
    t->decode_bound = 12 + max_len;
    return 1;
oom:
    set_err(err, "%s: out of memory", name);
    return 0;
}

L2Tokenizer *l2_tokenizer_open(const char *path, int vocab_size, char *err) {
    if (!path) {
        set_err(err, "tokenizer: no path given");
        return NULL;
    }
    /* Long paths would push the message out of the error buffer. */
    const char *name = path, *slash = strrchr(path, '/');
    if (strlen(path) > 120 && slash) name = slash + 1;

    size_t size = 0;
    unsigned char *data = read_file(path, &size, name, err);
    if (!data) return NULL;
    L2Tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        free(data);
        set_err(err, "%s: out of memory", name);
        return NULL;
    }
    t->file = data;
    t->im_start = t->im_end = -1;
    if (!trie_init(&t->user) || !trie_init(&t->user_raw) || !trie_init(&t->rules)) {
        set_err(err, "%s: out of memory", name);
        goto fail;
    }
    if (size < 4) {
        set_err(err, "%s: too short to be a tokenizer.bin (%zu bytes)", name, size);
        goto fail;
    }
    uint32_t max_token_length = rd32(data);
    if (max_token_length > MAX_TOKEN_LENGTH) {
        set_err(err, "%s: max_token_length %u is absurd: not a tokenizer.bin", name, max_token_length);
        goto fail;
    }
    /* First pass: validate the pieces and count them. */
    size_t pos = 4;
    int n = 0;
    while (pos < size && !at_trailer(data + pos, size - pos)) {
        if (size - pos >= 4 && rd32(data + pos) == TRAILER_MAGIC) { /* no piece score has these bytes */
            set_err(err, "%s: trailer after piece %d is truncated or damaged", name, n - 1);
            goto fail;
        }
        if (size - pos < 8) {
            set_err(err, "%s: piece %d runs past the end of the file (truncated?)", name, n);
            goto fail;
        }
        uint32_t len = rd32(data + pos + 4);
        if (len > max_token_length) {
            set_err(err, "%s: piece %d is %u bytes, longer than max_token_length %u: not a tokenizer.bin",
                    name, n, len, max_token_length);
            goto fail;
        }
        if (len > size - pos - 8) {
            set_err(err, "%s: piece %d runs past the end of the file (truncated?)", name, n);
            goto fail;
        }
        pos += 8 + (size_t)len;
        n++;
    }
    if (n == 0) {
        set_err(err, "%s: has no pieces", name);
        goto fail;
    }
    if (vocab_size > 0 && n != vocab_size) {
        set_err(err, "%s: has %d pieces, the model's vocab_size is %d", name, n, vocab_size);
        goto fail;
    }
    t->n = n;
    t->piece = malloc((size_t)n * sizeof *t->piece);
    t->piece_len = malloc((size_t)n * sizeof(int));
    t->score = malloc((size_t)n * sizeof(float));
    t->type = malloc((size_t)n);
    t->byte_of = malloc((size_t)n * sizeof(short));
    if (!t->piece || !t->piece_len || !t->score || !t->type || !t->byte_of) {
        set_err(err, "%s: out of memory", name);
        goto fail;
    }
    pos = 4;
    for (int i = 0; i < n; i++) {
        memcpy(&t->score[i], data + pos, 4); /* little-endian hosts, as llama2.c */
        t->piece_len[i] = (int)rd32(data + pos + 4);
        t->piece[i] = data + pos + 8;
        t->byte_of[i] = -1;
        pos += 8 + (size_t)t->piece_len[i];
    }
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    t->has_trailer = pos < size;
    if (t->has_trailer) {
        if (!parse_trailer(t, data + pos, size - pos, name, err)) goto fail;
    } else if (!infer_defaults(t, name, err)) {
        goto fail;
    }
    if (!build_index(t, name, err)) goto fail;
    return t;
fail:
    free_tokenizer(t);
    return NULL;
}

int l2_tokenizer_vocab_size(const L2Tokenizer *t) { return t->n; }
int l2_tokenizer_bos_id(const L2Tokenizer *t) { return t->bos_id; }
int l2_tokenizer_eos_id(const L2Tokenizer *t) { return t->eos_id; }

int l2_tokenizer_chat_ids(const L2Tokenizer *t, int *im_start, int *im_end) {
    if (t->im_start < 0) return 0;
    if (im_start) *im_start = t->im_start;
    if (im_end) *im_end = t->im_end;
    return 1;
}

/* One protobuf varint at *p (before end), or -1 when it is malformed. */
static int64_t pb_varint(const unsigned char **p, const unsigned char *end) {
    uint64_t v = 0;
    for (int shift = 0; *p < end && shift < 64; shift += 7) {
        unsigned char c = *(*p)++;
        v |= (uint64_t)(c & 0x7F) << shift;
        if (!(c & 0x80)) return v > INT64_MAX ? -1 : (int64_t)v;
    }
    return -1;
}

/* The bytes of length-delimited field `field` in the protobuf message [p, end), or NULL. */
static const unsigned char *pb_field(const unsigned char *p, const unsigned char *end, int field, size_t *len) {
    while (p < end) {
        int64_t key = pb_varint(&p, end), n = 0;
        if (key < 0) return NULL;
        switch (key & 7) {
        case 0: if (pb_varint(&p, end) < 0) return NULL; break;
        case 1: n = 8; break;
        case 5: n = 4; break;
        case 2: if ((n = pb_varint(&p, end)) < 0) return NULL; break;
        default: return NULL;
        }
        if (n > end - p) return NULL;
        if ((key & 7) == 2 && key >> 3 == field) {
            *len = (size_t)n;
            return p;
        }
        p += n;
    }
    return NULL;
}

int l2_tokenizer_normalizer_note(const L2Tokenizer *t, const char *model_path, char *note, size_t size) {
    note[0] = '\0';
    if (t->has_trailer) return 0;
    char err[L2_ERR_SIZE];
    size_t file_size = 0, spec_len = 0, name_len = 0;
    unsigned char *data = read_file(model_path, &file_size, model_path, err);
    if (!data) return 0; /* no tokenizer.model to learn from */
    /* ModelProto field 3 is the normalizer spec; its field 1 is the normalizer's name */
    const unsigned char *spec = pb_field(data, data + file_size, 3, &spec_len);
    const unsigned char *name = spec ? pb_field(spec, spec + spec_len, 1, &name_len) : NULL;
    if (name && name_len > 0 && name_len < 64 && !(name_len == 8 && !memcmp(name, "identity", 8)))
        snprintf(note, size,
                 "note: this tokenizer.bin (llama2.c's format, no trailer) cannot carry a normalizer, but %s "
                 "normalizes with %.*s: text %.*s changes (full-width letters, compatibility forms) is encoded "
                 "unnormalized here, unlike SentencePiece; `llama2zh vocab export %s` writes a file that carries it",
                 model_path, (int)name_len, name, (int)name_len, name, model_path);
    free(data);
    return note[0] != '\0';
}

/* ---- encode: normalizer ---- */

typedef struct {
    unsigned char *p;
    size_t n, cap;
    int oom;
} Buf;

static void buf_put(Buf *b, const unsigned char *s, size_t n) {
    if (b->oom || n == 0) return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n) cap *= 2;
        unsigned char *grown = realloc(b->p, cap);
        if (!grown) {
            b->oom = 1;
            return;
        }
        b->p = grown;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

/* Longest user-defined piece that prefixes s (normalized text), or 0. */
static size_t user_match(const L2Tokenizer *t, const unsigned char *s, size_t n) {
    size_t len;
    return trie_longest(&t->user, s, n, &len) >= 0 ? len : 0;
}

/* SentencePiece's NormalizePrefix: the normalized text of the input's next
 * unit (*out, *out_len) and how many input bytes it consumes. */
static size_t norm_prefix(const L2Tokenizer *t, const unsigned char *s, size_t n, const unsigned char **out,
                          size_t *out_len) {
    size_t m;
    if (trie_longest(&t->user_raw, s, n, &m) >= 0) { /* user-defined symbols pass through unnormalized */
        *out = s;
        *out_len = m;
        return m;
    }
    int r = trie_longest(&t->rules, s, n, &m);
    if (r >= 0) {
        *out = t->rule_val[r];
        *out_len = (size_t)t->rule_val_len[r];
        return m;
    }
    m = (size_t)utf8_char_len(s, n);
    if (m == 0) {
        *out = REPLACEMENT;
        *out_len = 3;
        return 1;
    }
    *out = s;
    *out_len = m;
    return m;
}

/* Appends normalized text; spaces stay ' ' and U+2581 becomes ' ', the
 * internal spelling of SentencePiece's escaped space. */
static void put_escaped(Buf *b, const unsigned char *s, size_t n) {
    size_t start = 0;
    for (size_t i = 0; i < n;) {
        if (n - i >= 3 && memcmp(s + i, SPACE_SYMBOL, 3) == 0) {
            buf_put(b, s + start, i - start);
            buf_put(b, (const unsigned char *)" ", 1);
            i += 3;
            start = i;
        } else {
            i++;
        }
    }
    buf_put(b, s + start, n - start);
}

/* SentencePiece's Normalizer::Normalize (normalizer.cc). */
static void normalize(const L2Tokenizer *t, const unsigned char *in, size_t n, Buf *out) {
    const unsigned char *sp;
    size_t sp_len, used;
    int remove_extra = (t->flags & F_REMOVE_EXTRA) != 0;
    int dummy = (t->flags & F_DUMMY_PREFIX) != 0, suffix = (t->flags & F_SUFFIX) != 0;
    if (remove_extra) { /* heading spaces */
        while (n > 0) {
            used = norm_prefix(t, in, n, &sp, &sp_len);
            if (sp_len != 1 || sp[0] != ' ') break;
            in += used;
            n -= used;
        }
    }
    if (n == 0) return;
    if (dummy && !suffix) buf_put(out, (const unsigned char *)" ", 1);
    int prev_space = remove_extra;
    while (n > 0) {
        used = norm_prefix(t, in, n, &sp, &sp_len);
        while (prev_space && sp_len > 0 && sp[0] == ' ') {
            sp++;
            sp_len--;
        }
        if (sp_len > 0) {
            put_escaped(out, sp, sp_len);
            prev_space = sp[sp_len - 1] == ' ';
        }
        in += used;
        n -= used;
        if (!remove_extra) prev_space = 0;
    }
    if (remove_extra)
        while (out->n > 0 && out->p[out->n - 1] == ' ') out->n--;
    if (dummy && suffix) buf_put(out, (const unsigned char *)" ", 1);
}

/* ---- encode: the ids of the pieces found ---- */

typedef struct {
    int start, len, prev, next, frozen;
} Symbol;

typedef struct {
    float score;
    int left, right, size;
} Pair;

/* Best path ending at a byte position of the normalized text. */
typedef struct {
    float score;
    int start; /* where its last piece starts; -1 while none found */
    int id;    /* its last piece; -1 for an unknown character */
} PathEnd;

typedef struct {
    const L2Tokenizer *t;
    const unsigned char *text; /* normalized */
    Symbol *sym;               /* BPE */
    Pair *heap;
    size_t n_heap, cap_heap;
    int *rev_left; /* per unused piece: length of the left part of its last merge */
    PathEnd *best; /* unigram */
    int *ids, max_ids;
    size_t n_ids;
    int prev_unk, oom;
} Encoder;

static void put_id(Encoder *e, int id) {
    if (e->n_ids < (size_t)e->max_ids) e->ids[e->n_ids] = id;
    e->n_ids++;
}

/* Emits piece id for the text w, or, for id -1, the unknown text w: its
 * bytes as byte pieces, or one <unk> per run of unknowns. */
static void emit_piece(Encoder *e, int id, const unsigned char *w, int len) {
    const L2Tokenizer *t = e->t;
    if (id >= 0) {
        put_id(e, id);
        e->prev_unk = 0;
        return;
    }
    if (t->flags & F_BYTE_FALLBACK) {
        for (int i = 0; i < len; i++) {
            if (w[i] == ' ') { /* SentencePiece's bytes of U+2581 */
                for (int k = 0; k < 3; k++)
                    put_id(e, t->byte_id[SPACE_SYMBOL[k]] >= 0 ? t->byte_id[SPACE_SYMBOL[k]] : t->unk_id);
            } else {
                put_id(e, t->byte_id[w[i]] >= 0 ? t->byte_id[w[i]] : t->unk_id);
            }
        }
    } else if (!e->prev_unk) {
        put_id(e, t->unk_id);
    }
    e->prev_unk = 1;
}

/* Bytes of the character at s as SentencePiece's OneCharLen counts them (by
 * the lead byte alone; the normalizer has made the text valid UTF-8). */
static size_t one_char_len(const unsigned char *s, size_t n) {
    static const unsigned char len_of[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    size_t len = len_of[s[0] >> 4];
    return len < n ? len : n;
}

/* ---- encode: BPE (bpe_model.cc) ---- */

/* Higher score first, then the leftmost. */
static int pair_before(const Pair *a, const Pair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(Encoder *e, Pair p) {
    if (e->n_heap == e->cap_heap) {
        size_t cap = e->cap_heap ? 2 * e->cap_heap : 256;
        Pair *grown = realloc(e->heap, cap * sizeof *grown);
        if (!grown) {
            e->oom = 1;
            return;
        }
        e->heap = grown;
        e->cap_heap = cap;
    }
    size_t i = e->n_heap++;
    while (i > 0 && pair_before(&p, &e->heap[(i - 1) / 2])) {
        e->heap[i] = e->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    e->heap[i] = p;
}

static Pair heap_pop(Encoder *e) {
    Pair top = e->heap[0], last = e->heap[--e->n_heap];
    size_t i = 0, n = e->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && pair_before(&e->heap[c + 1], &e->heap[c])) c++;
        if (!pair_before(&e->heap[c], &last)) break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n > 0) e->heap[i] = last;
    return top;
}

static void maybe_add_pair(Encoder *e, int left, int right) {
    const L2Tokenizer *t = e->t;
    if (left < 0 || right < 0 || e->sym[left].frozen || e->sym[right].frozen) return;
    int size = e->sym[left].len + e->sym[right].len;
    if (size > t->max_merge_len) return;
    int id = table_find(&t->pieces, e->text + e->sym[left].start, (size_t)size);
    if (id < 0) return;
    heap_push(e, (Pair){t->score[id], left, right, size});
    if (t->type[id] == T_UNUSED) e->rev_left[id] = e->sym[left].len;
}

/* Emits the ids of one final symbol: an unused piece splits back into the
 * two symbols it was last merged from (down to SentencePiece's depth limit of
 * 100, past which it stays whole); one never merged is unknown. */
static void emit_symbol(Encoder *e, const unsigned char *w, int len, int depth) {
    const L2Tokenizer *t = e->t;
    int id = table_find(&t->pieces, w, (size_t)len);
    if (id >= 0 && t->type[id] == T_UNUSED && depth <= 100) {
        int left = e->rev_left[id];
        if (left == 0) {
            emit_piece(e, -1, w, len);
            return;
        }
        emit_symbol(e, w, left, depth + 1);
        emit_symbol(e, w + left, len - left, depth + 1);
        return;
    }
    emit_piece(e, id, w, len);
}

/* Merges the best-scoring adjacent pair, leftmost first, in the list of symbols from first on
 * until no pair is a piece. */
static void merge(Encoder *e, int first) {
    for (int i = first; e->sym[i].next >= 0; i = e->sym[i].next) maybe_add_pair(e, i, e->sym[i].next);
    while (e->n_heap > 0 && !e->oom) {
        Pair top = heap_pop(e);
        Symbol *l = &e->sym[top.left], *r = &e->sym[top.right];
        /* Stale: one side was merged into something else since. */
        if (l->len == 0 || r->len == 0 || l->len + r->len != top.size) continue;
        l->len += r->len;
        l->next = r->next;
        if (r->next >= 0) e->sym[r->next].prev = top.left;
        r->len = 0;
        maybe_add_pair(e, l->prev, top.left);
        maybe_add_pair(e, top.left, l->next);
    }
}

static void bpe(Encoder *e, size_t n) {
    const L2Tokenizer *t = e->t;
    e->sym = malloc((n + 1) * sizeof *e->sym);
    e->rev_left = t->has_unused ? calloc((size_t)t->n, sizeof(int)) : NULL;
    if (!e->sym || (t->has_unused && !e->rev_left)) {
        e->oom = 1;
        return;
    }
    int n_sym = 0;
    for (size_t pos = 0; pos < n; n_sym++) {
        size_t len = user_match(t, e->text + pos, n - pos);
        int frozen = len > 0;
        if (!frozen) len = one_char_len(e->text + pos, n - pos);
        e->sym[n_sym] = (Symbol){(int)pos, (int)len, n_sym - 1, -1, frozen};
        if (n_sym > 0) e->sym[n_sym - 1].next = n_sym;
        pos += len;
    }
    /* Each word (from a space after a non-space) is merged and emitted alone when no merge can
     * cross into one: the same merges as over the whole text, with a heap a word long. (An
     * unused piece splits back where its two parts met, which its text alone decides.) */
    for (int first = 0, end; first < n_sym && !e->oom; first = end) {
        for (end = first + 1; end < n_sym; end++) {
            const unsigned char *at = e->text + e->sym[end].start;
            if (t->words_apart && at[0] == ' ' && at[-1] != ' ') break;
        }
        e->sym[first].prev = -1;
        e->sym[end - 1].next = -1;
        merge(e, first);
        for (int i = first; i >= 0; i = e->sym[i].next) emit_symbol(e, e->text + e->sym[i].start, e->sym[i].len, 0);
    }
}

/* ---- encode: unigram (unigram_model.cc, Model::EncodeOptimized) ---- */

/* Offers a path ending here; the first one offered wins ties. */
static void offer(PathEnd *p, float score, int start, int id) {
    if (p->start < 0 || score > p->score) *p = (PathEnd){score, start, id};
}

/* Viterbi in float arithmetic, as SentencePiece 0.2.3 computes it: the same
 * roundings give the same choice between paths whose scores are close. */
static void unigram(Encoder *e, size_t n) {
    const L2Tokenizer *t = e->t;
    const unsigned char *s = e->text;
    PathEnd *best = e->best = malloc((n + 1) * sizeof *e->best);
    if (!best) {
        e->oom = 1;
        return;
    }
    for (size_t i = 0; i <= n; i++) best[i] = (PathEnd){0.0f, -1, -1};
    const float unk_score = t->min_score - 10.0f; /* kUnkPenalty */
    size_t frontier = 0;                           /* the furthest end offered so far */
    for (size_t pos = 0; pos < n;) {
        float here = best[pos].score;
        if (here < -100000.0f || here > 100000.0f) { /* SentencePiece rebases long paths' scores */
            for (size_t i = pos; i <= frontier; i++)
                if (i == pos || best[i].start >= 0) best[i].score -= here;
            here = 0.0f;
        }
        size_t char_len = one_char_len(s + pos, n - pos), limit = n - pos;
        int has_single = 0, spaces = 0;
        uint32_t h = HASH_INIT;
        if (limit > (size_t)t->max_merge_len) limit = (size_t)t->max_merge_len;
        for (size_t len = 1; len <= limit; len++) {
            h = hash_step(h, s[pos + len - 1]);
            spaces += s[pos + len - 1] == ' ';
            if (pos + len < n && is_trail(s[pos + len])) continue; /* pieces end on characters */
            int id = table_find_hashed(&t->pieces, s + pos, len, h);
            if (id < 0 || t->type[id] == T_UNUSED) continue;
            if (pos + len > frontier) frontier = pos + len;
            /* User-defined symbols score 0.1 per byte after the first (U+2581,
             * our ' ', counting its 3), enough to be chosen over the pieces
             * inside them. */
            float score = t->type[id] == T_USER ? (float)(0.1 * (double)(len + 2 * (size_t)spaces - 1)) : t->score[id];
            offer(&best[pos + len], score + here, (int)pos, id);
            if (len == char_len) has_single = 1;
        }
        if (!has_single) {
            if (pos + char_len > frontier) frontier = pos + char_len;
            offer(&best[pos + char_len], unk_score + here, (int)pos, -1);
        }
        pos += char_len;
    }
    /* Turn the backward links into forward ones (start := end of the next
     * piece, -1 after the last), then emit from the front. */
    int end = (int)n, next = -1;
    while (end > 0) {
        int start = best[end].start;
        best[end].start = next;
        next = end;
        end = start;
    }
    for (int start = 0, stop = next; stop > 0; start = stop, stop = best[stop].start)
        emit_piece(e, best[stop].id, s + start, stop - start);
}

int l2_encode(const L2Tokenizer *t, const char *text, size_t len, int bos, int eos, int *ids, int max_ids,
              char *err) {
    if (!t || (!text && len > 0)) {
        set_err(err, "encode: no tokenizer or no text");
        return -1;
    }
    Encoder e = {.t = t, .ids = ids, .max_ids = ids && max_ids > 0 ? max_ids : 0};
    Buf norm = {0};
    int result = -1;
    if (bos && t->bos_id >= 0) put_id(&e, t->bos_id);
    normalize(t, (const unsigned char *)text, len, &norm);
    if (norm.n >= (size_t)INT32_MAX / 2) {
        set_err(err, "encode: text too long (%zu bytes)", len);
        goto done;
    }
    e.text = norm.p;
    if (!norm.oom) {
        if (t->flags & F_UNIGRAM)
            unigram(&e, norm.n);
        else
            bpe(&e, norm.n);
    }
    if (norm.oom || e.oom) {
        set_err(err, "encode: out of memory");
        goto done;
    }
    if (eos && t->eos_id >= 0) put_id(&e, t->eos_id);
    if (e.n_ids > (size_t)INT32_MAX) {
        set_err(err, "encode: text too long (%zu bytes)", len);
        goto done;
    }
    result = (int)e.n_ids;
done:
    free(norm.p);
    free(e.sym);
    free(e.heap);
    free(e.rev_left);
    free(e.best);
    return result;
}

/* ---- decode ---- */

void l2_decoder_init(L2Decoder *d) { memset(d, 0, sizeof *d); }

size_t l2_decode_bound(const L2Tokenizer *t) { return t->decode_bound; }

/* Pending bytes cannot finish a character any more: each becomes U+FFFD. */
static int flush_pending(L2Decoder *d, char *out) {
    int w = 0;
    for (int i = 0; i < d->n_pending; i++, w += 3) memcpy(out + w, REPLACEMENT, 3);
    d->n_pending = 0;
    return w;
}

/* One byte of a run of byte pieces: out gets every character it completes,
 * and U+FFFD for each byte that cannot start or continue one. */
static int feed_byte(L2Decoder *d, unsigned char b, char *out) {
    int w = 0;
    d->pending[d->n_pending++] = b;
    while (d->n_pending > 0) {
        int k = d->n_pending, need = utf8_need(d->pending[0]);
        int used;
        if (utf8_prefix_ok(d->pending, k)) {
            if (k < need) break; /* wait for the rest of the character */
            memcpy(out + w, d->pending, (size_t)need);
            w += need;
            used = need;
        } else {
            memcpy(out + w, REPLACEMENT, 3);
            w += 3;
            used = 1;
        }
        memmove(d->pending, d->pending + used, (size_t)(k - used));
        d->n_pending = k - used;
    }
    return w;
}

int l2_decode_step(const L2Tokenizer *t, L2Decoder *d, int id, char *out, char *err) {
    if (id < 0 || id >= t->n) {
        set_err(err, "decode: token id %d is out of range (vocab_size %d)", id, t->n);
        return -1;
    }
    if (d->n_pending < 0 || d->n_pending > 3) d->n_pending = 0; /* a decoder never initialised */
    int w;
    if (t->type[id] == T_BYTE) {
        w = feed_byte(d, (unsigned char)t->byte_of[id], out);
        if (w > 0) d->started = 1;
        return w;
    }
    /* Any other piece ends a run of byte pieces. */
    w = flush_pending(d, out);
    if (w > 0) d->started = 1;
    if (t->type[id] == T_CONTROL) return w;
    if (t->type[id] == T_UNKNOWN) {
        memcpy(out + w, t->unk_surface, (size_t)t->unk_surface_len);
        w += t->unk_surface_len;
    } else {
        const unsigned char *s = t->piece[id];
        int len = t->piece_len[id], bos_ws = 0;
        /* SentencePiece drops the space the dummy prefix put before the first
         * piece; with remove_extra_whitespaces every leading piece's space. */
        if (!d->started && (t->flags & (F_DUMMY_PREFIX | F_REMOVE_EXTRA)) && len > 0 && s[0] == ' ') {
            s++;
            len--;
            bos_ws = !(t->flags & F_REMOVE_EXTRA);
        }
        memcpy(out + w, s, (size_t)len);
        w += len;
        if (bos_ws) d->started = 1;
    }
    if (w > 0) d->started = 1;
    return w;
}

int l2_decode_finish(const L2Tokenizer *t, L2Decoder *d, char *out) {
    if (d->n_pending < 0 || d->n_pending > 3) d->n_pending = 0;
    return flush_pending(d, out);
}

long l2_decode(const L2Tokenizer *t, const int *ids, int n_ids, char *out, size_t cap, char *err) {
    char *piece = malloc(t->decode_bound);
    if (!piece) {
        set_err(err, "decode: out of memory");
        return -1;
    }
    L2Decoder d;
    l2_decoder_init(&d);
    size_t total = 0;
    for (int i = 0; i <= n_ids; i++) {
        int w = i < n_ids ? l2_decode_step(t, &d, ids[i], piece, err) : l2_decode_finish(t, &d, piece);
        if (w < 0) {
            free(piece);
            return -1;
        }
        if (total < cap) memcpy(out + total, piece, cap - total < (size_t)w ? cap - total : (size_t)w);
        total += (size_t)w;
    }
    free(piece);
    return (long)total;
}

/* ---- chat: ChatML ids, the rule of llama2zh/chat.py ---- */

/* Ids are counted in *n and written while they fit in max_ids, as l2_encode does. */
static void put_chat_id(int *ids, int max_ids, long *n, int id) {
    if (*n < max_ids) ids[*n] = id;
    (*n)++;
}

/* The plain-text ids of role "\n" text: every stretch of text between the markers has this
 * shape ("\n" alone is role "" and text "", the generation prompt role "assistant"). */
static int put_chat_text(const L2Tokenizer *t, const char *role, const char *text, int *ids, int max_ids,
                         long *n, char *err) {
    size_t role_len = strlen(role), text_len = strlen(text);
    char *s = malloc(role_len + 1 + text_len);
    if (!s) {
        set_err(err, "chat: out of memory");
        return 0;
    }
    memcpy(s, role, role_len);
    s[role_len] = '\n';
    memcpy(s + role_len + 1, text, text_len);
    int room = *n < max_ids ? max_ids - (int)*n : 0;
    int k = l2_encode(t, s, role_len + 1 + text_len, 0, 0, room ? ids + *n : NULL, room, err);
    free(s);
    if (k < 0) return 0;
    *n += k;
    return 1;
}

static int has_chat(const L2Tokenizer *t, char *err) {
    if (t->im_start >= 0) return 1;
    set_err(err, "chat: tokenizer.bin has no chat template (<|im_start|>, <|im_end|>)");
    return 0;
}

static int known_role(const char *role) {
    return role && (!strcmp(role, "system") || !strcmp(role, "user") || !strcmp(role, "assistant"));
}

/* The count as an int, or -1 when it does not fit one. */
static int chat_count(long n, char *err) {
    if (n <= INT32_MAX) return (int)n;
    set_err(err, "chat: conversation too long (%ld ids)", n);
    return -1;
}

int l2_chat_render(const L2Tokenizer *t, const L2Message *messages, int n_messages, int bos,
                   int add_generation_prompt, int *ids, int max_ids, char *err) {
    if (!has_chat(t, err)) return -1;
    if (n_messages < 0 || (n_messages > 0 && !messages)) {
        set_err(err, "chat: no messages given");
        return -1;
    }
    if (!ids || max_ids < 0) max_ids = 0;
    long n = 0;
    if (bos && t->bos_id >= 0) put_chat_id(ids, max_ids, &n, t->bos_id);
    for (int i = 0; i < n_messages; i++) {
        const L2Message *m = &messages[i];
        if (!known_role(m->role) || !m->content) {
            set_err(err, "chat: message %d needs a role (system, user or assistant) and a content", i);
            return -1;
        }
        put_chat_id(ids, max_ids, &n, t->im_start);
        if (!put_chat_text(t, m->role, m->content, ids, max_ids, &n, err)) return -1;
        put_chat_id(ids, max_ids, &n, t->im_end);
        if (!put_chat_text(t, "", "", ids, max_ids, &n, err)) return -1;
    }
    if (add_generation_prompt) {
        put_chat_id(ids, max_ids, &n, t->im_start);
        if (!put_chat_text(t, "assistant", "", ids, max_ids, &n, err)) return -1;
    }
    return chat_count(n, err);
}

int l2_chat_close_reply(const L2Tokenizer *t, int *ids, int max_ids, char *err) {
    if (!has_chat(t, err)) return -1;
    if (!ids || max_ids < 0) max_ids = 0;
    long n = 0;
    put_chat_id(ids, max_ids, &n, t->im_end);
    if (!put_chat_text(t, "", "", ids, max_ids, &n, err)) return -1;
    return chat_count(n, err);
}
