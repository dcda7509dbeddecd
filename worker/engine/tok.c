/* tok.c - see tok.h. Hash tables are open-addressed with linear probing:
 * pieces -> ids keyed by FNV-1a, merge pairs (left id, right id) -> (rank,
 * merged id) keyed by a 64-bit mix. BPE merging keeps a binary heap of
 * candidate pairs ordered by (rank, position) as Hugging Face's tokenizers
 * does, so a long segment costs O(n log n), not O(n^2). */
#include "worker/engine/tok.h"

#include "common/buf.h"
#include "common/util.h"

#include <jansson.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TOK_SPACE_MARK "\xe2\x96\x81" /* U+2581, the "▁" that stands for a space */
#define TOK_SPACE_MARK_LEN 3
#define TOK_MAX_ADDED 65536

enum tok_kind { TOK_KIND_BYTE, TOK_KIND_HF };

typedef struct {
    const char *key; /* points at the piece owned by tok_tokenizer.pieces */
    size_t len;
    int32_t id;      /* -1: empty slot */
} tok_vocab_slot;

typedef struct {
    uint64_t pair;   /* left id << 32 | right id */
    int32_t rank;    /* -1: empty slot */
    int32_t merged;
} tok_merge_slot;

typedef struct {
    char *content;
    size_t len;
    int32_t id;
    bool special, lstrip, rstrip;
} tok_added;

struct tok_tokenizer {
    enum tok_kind kind;
    int vocab_size;       /* largest id + 1 */
    char **pieces;        /* [vocab_size]; NULL where no token has the id */
    bool *is_special;     /* [vocab_size]: added tokens marked special */
    tok_vocab_slot *vocab;
    size_t vocab_cap;     /* power of two */
    tok_merge_slot *merges;
    size_t merges_cap;    /* power of two, 0 when there are no merges */
    tok_added *added;     /* sorted by first byte */
    size_t nadded;
    size_t added_start[257]; /* added[added_start[c] .. added_start[c+1]) start with byte c */
    int32_t byte_ids[256];   /* id of <0xNN>, or -1 */
    bool byte_fallback, fuse_unk;
    int32_t unk, bos, eos, pad;
};

/* ---- id arrays ---------------------------------------------------------- */

void tok_ids_init(tok_ids *a, size_t max) {
    a->v = NULL;
    a->len = a->cap = 0;
    a->max = max;
}

int tok_ids_push(tok_ids *a, int32_t id) {
    if (a->len >= a->max) return -1;
    if (a->len == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        if (cap > a->max) cap = a->max;
        int32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) return -1;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->len++] = id;
    return 0;
}

void tok_ids_free(tok_ids *a) {
    free(a->v);
    a->v = NULL;
    a->len = a->cap = 0;
}

/* ---- hash tables -------------------------------------------------------- */

static uint64_t tok_hash_bytes(const char *s, size_t len) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t tok_hash_pair(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

/* Smallest power of two >= 2n (load factor at most one half). */
static size_t tok_table_cap(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    return cap;
}

static int32_t tok_vocab_find(const tok_tokenizer *t, const char *s, size_t len) {
    if (!t->vocab) return -1;
    size_t mask = t->vocab_cap - 1;
    for (size_t i = tok_hash_bytes(s, len) & mask;; i = (i + 1) & mask) {
        const tok_vocab_slot *e = &t->vocab[i];
        if (e->id < 0) return -1;
        if (e->len == len && memcmp(e->key, s, len) == 0) return e->id;
    }
}

/* Inserts key (owned elsewhere) -> id; an existing key keeps its id. The
 * table never fills: it was sized for every piece. */
static void tok_vocab_insert(tok_tokenizer *t, const char *key, size_t len, int32_t id) {
    size_t mask = t->vocab_cap - 1;
    for (size_t i = tok_hash_bytes(key, len) & mask;; i = (i + 1) & mask) {
        tok_vocab_slot *e = &t->vocab[i];
        if (e->id < 0) {
            e->key = key;
            e->len = len;
            e->id = id;
            return;
        }
        if (e->len == len && memcmp(e->key, key, len) == 0) return;
    }
}

static const tok_merge_slot *tok_merge_find(const tok_tokenizer *t, int32_t left, int32_t right) {
    if (!t->merges_cap) return NULL;
    uint64_t pair = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    size_t mask = t->merges_cap - 1;
    for (size_t i = tok_hash_pair(pair) & mask;; i = (i + 1) & mask) {
        const tok_merge_slot *e = &t->merges[i];
        if (e->rank < 0) return NULL;
        if (e->pair == pair) return e;
    }
}

/* Inserts a merge; a pair already present keeps its lower rank. */
static void tok_merge_insert(tok_tokenizer *t, int32_t left, int32_t right, int32_t rank,
                             int32_t merged) {
    uint64_t pair = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    size_t mask = t->merges_cap - 1;
    for (size_t i = tok_hash_pair(pair) & mask;; i = (i + 1) & mask) {
        tok_merge_slot *e = &t->merges[i];
        if (e->rank < 0) {
            e->pair = pair;
            e->rank = rank;
            e->merged = merged;
            return;
        }
        if (e->pair == pair) return;
    }
}

/* ---- loading ------------------------------------------------------------ */

void tok_free(tok_tokenizer *t) {
    if (!t) return;
    if (t->pieces)
        for (int i = 0; i < t->vocab_size; i++) free(t->pieces[i]);
    free(t->pieces);
    free(t->is_special);
    free(t->vocab);
    free(t->merges);
    for (size_t i = 0; i < t->nadded; i++) free(t->added[i].content);
    free(t->added);
    free(t);
}

tok_tokenizer *tok_byte_new(void) {
    tok_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->kind = TOK_KIND_BYTE;
    t->vocab_size = TOK_BYTE_VOCAB;
    t->unk = -1;
    t->bos = TOK_BYTE_BOS;
    t->eos = TOK_BYTE_EOS;
    t->pad = TOK_BYTE_PAD;
    for (int i = 0; i < 256; i++) t->byte_ids[i] = i;
    return t;
}

/* True when v is JSON null or absent. */
static bool tok_json_none(const json_t *v) { return !v || json_is_null(v); }

static bool tok_json_str_is(const json_t *v, const char *s) {
    return json_is_string(v) && strcmp(json_string_value(v), s) == 0;
}

/* A Replace normalizer/decoder {"pattern": {"String": from}, "content": to}. */
static bool tok_is_replace(const json_t *v, const char *from, const char *to) {
    return json_is_object(v) && tok_json_str_is(json_object_get(v, "type"), "Replace") &&
           tok_json_str_is(json_object_get(json_object_get(v, "pattern"), "String"), from) &&
           tok_json_str_is(json_object_get(v, "content"), to);
}

/* Checks the normalizer, pre-tokenizer and decoder are exactly Llama 2's.
 * Returns 0 or -1 with err saying which section differs. */
static int tok_check_pipeline(const json_t *root, char *err, size_t errlen) {
    const json_t *norm = json_object_get(root, "normalizer");
    const json_t *seq = json_object_get(norm, "normalizers");
    if (!json_is_object(norm) || !tok_json_str_is(json_object_get(norm, "type"), "Sequence") ||
        !json_is_array(seq) || json_array_size(seq) != 2 ||
        !tok_json_str_is(json_object_get(json_array_get(seq, 0), "type"), "Prepend") ||
        !tok_json_str_is(json_object_get(json_array_get(seq, 0), "prepend"), TOK_SPACE_MARK) ||
        !tok_is_replace(json_array_get(seq, 1), " ", TOK_SPACE_MARK))
        return err_set(err, errlen,
                       "normalizer: only Llama 2's Sequence[Prepend \"\xe2\x96\x81\", Replace \" \" "
                       "-> \"\xe2\x96\x81\"] is supported");
    if (!tok_json_none(json_object_get(root, "pre_tokenizer")))
        return err_set(err, errlen, "pre_tokenizer: must be null (Llama 2's tokenizer has none)");
    const json_t *dec = json_object_get(root, "decoder");
    const json_t *ds = json_object_get(dec, "decoders");
    const json_t *strip = json_array_get(ds, 3);
    if (!json_is_object(dec) || !tok_json_str_is(json_object_get(dec, "type"), "Sequence") ||
        !json_is_array(ds) || json_array_size(ds) != 4 ||
        !tok_is_replace(json_array_get(ds, 0), TOK_SPACE_MARK, " ") ||
        !tok_json_str_is(json_object_get(json_array_get(ds, 1), "type"), "ByteFallback") ||
        !tok_json_str_is(json_object_get(json_array_get(ds, 2), "type"), "Fuse") ||
        !tok_json_str_is(json_object_get(strip, "type"), "Strip") ||
        !tok_json_str_is(json_object_get(strip, "content"), " ") ||
        json_integer_value(json_object_get(strip, "start")) != 1 ||
        json_integer_value(json_object_get(strip, "stop")) != 0)
        return err_set(err, errlen,
                       "decoder: only Llama 2's Sequence[Replace \"\xe2\x96\x81\" -> \" \", "
                       "ByteFallback, Fuse, Strip(1, 0)] is supported");
    return 0;
}

/* Reads model.vocab into t->pieces (sized to the largest id seen in vocab or
 * added_tokens). Returns 0 or -1 with err. */
static int tok_load_vocab(tok_tokenizer *t, const json_t *vocab, const json_t *added, char *err,
                          size_t errlen) {
    int64_t max_id = -1;
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)vocab, key, val) {
        if (!json_is_integer(val) || json_integer_value(val) < 0 ||
            json_integer_value(val) >= (json_int_t)TOK_MAX_VOCAB)
            return err_set(err, errlen, "model.vocab: \"%.64s\" has an id that is not an integer in [0, %u)",
                           key, TOK_MAX_VOCAB);
        if (json_integer_value(val) > max_id) max_id = json_integer_value(val);
    }
    size_t i;
    json_array_foreach(added, i, val) {
        json_int_t id = json_integer_value(json_object_get(val, "id"));
        if (!json_is_integer(json_object_get(val, "id")) || id < 0 || id >= (json_int_t)TOK_MAX_VOCAB)
            return err_set(err, errlen, "added_tokens[%zu].id: not an integer in [0, %u)", i,
                           TOK_MAX_VOCAB);
        if (id > max_id) max_id = id;
    }
    if (max_id < 0) return err_set(err, errlen, "model.vocab: empty");
    t->vocab_size = (int)(max_id + 1);
    t->pieces = calloc((size_t)t->vocab_size, sizeof *t->pieces);
    t->is_special = calloc((size_t)t->vocab_size, sizeof *t->is_special);
    t->vocab_cap = tok_table_cap(json_object_size(vocab) + json_array_size(added));
    t->vocab = malloc(t->vocab_cap * sizeof *t->vocab);
    if (!t->pieces || !t->is_special || !t->vocab) return err_set(err, errlen, "out of memory");
    for (size_t s = 0; s < t->vocab_cap; s++) t->vocab[s].id = -1;
    json_object_foreach((json_t *)vocab, key, val) {
        int32_t id = (int32_t)json_integer_value(val);
        if (t->pieces[id])
            return err_set(err, errlen, "model.vocab: \"%.64s\" and \"%.64s\" share id %d",
                           t->pieces[id], key, (int)id);
        size_t len = strlen(key);
        if (len == 0) return err_set(err, errlen, "model.vocab: an empty token (id %d)", (int)id);
        t->pieces[id] = strdup(key);
        if (!t->pieces[id]) return err_set(err, errlen, "out of memory");
        tok_vocab_insert(t, t->pieces[id], len, id);
    }
    return 0;
}

static int tok_added_cmp(const void *a, const void *b) {
    const tok_added *x = a, *y = b;
    unsigned char cx = (unsigned char)x->content[0], cy = (unsigned char)y->content[0];
    if (cx != cy) return cx < cy ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* Reads added_tokens: each must name its id and content; a content that the
 * vocabulary spells differently at the same id is an error. Returns 0 or -1. */
static int tok_load_added(tok_tokenizer *t, const json_t *added, char *err, size_t errlen) {
    size_t n = json_array_size(added);
    if (n > TOK_MAX_ADDED) return err_set(err, errlen, "added_tokens: more than %d", TOK_MAX_ADDED);
    t->added = calloc(n ? n : 1, sizeof *t->added);
    if (!t->added) return err_set(err, errlen, "out of memory");
    size_t i;
    json_t *v;
    json_array_foreach(added, i, v) {
        const json_t *content = json_object_get(v, "content");
        if (!json_is_string(content) || json_string_length(content) == 0)
            return err_set(err, errlen, "added_tokens[%zu].content: not a non-empty string", i);
        if (json_is_true(json_object_get(v, "single_word")))
            return err_set(err, errlen, "added_tokens[%zu]: single_word tokens are not supported", i);
        int32_t id = (int32_t)json_integer_value(json_object_get(v, "id"));
        const char *s = json_string_value(content);
        size_t len = json_string_length(content);
        if (memchr(s, '\0', len))
            return err_set(err, errlen, "added_tokens[%zu].content: contains a NUL byte", i);
        if (t->pieces[id] && strcmp(t->pieces[id], s) != 0)
            return err_set(err, errlen, "added_tokens[%zu]: id %d is \"%.64s\" in the vocabulary", i,
                           (int)id, t->pieces[id]);
        if (!t->pieces[id]) {
            int32_t other = tok_vocab_find(t, s, len);
            if (other >= 0)
                return err_set(err, errlen, "added_tokens[%zu]: \"%.64s\" is id %d in the vocabulary",
                               i, s, (int)other);
            t->pieces[id] = strdup(s);
            if (!t->pieces[id]) return err_set(err, errlen, "out of memory");
            tok_vocab_insert(t, t->pieces[id], len, id);
        }
        tok_added *a = &t->added[t->nadded++];
        a->content = strdup(s);
        if (!a->content) return err_set(err, errlen, "out of memory");
        a->len = len;
        a->id = id;
        a->special = json_is_true(json_object_get(v, "special"));
        a->lstrip = json_is_true(json_object_get(v, "lstrip"));
        a->rstrip = json_is_true(json_object_get(v, "rstrip"));
        t->is_special[id] = a->special;
    }
    qsort(t->added, t->nadded, sizeof *t->added, tok_added_cmp);
    size_t k = 0;
    for (int c = 0; c <= 256; c++) {
        while (k < t->nadded && (unsigned char)t->added[k].content[0] < c) k++;
        t->added_start[c] = k;
    }
    return 0;
}

/* Splits merge number i (either "a b" or ["a", "b"]) into its two pieces,
 * copied into left/right. Returns 0 or -1 with err. */
static int tok_merge_parts(const json_t *m, size_t i, char **left, char **right, char *err,
                           size_t errlen) {
    *left = *right = NULL;
    if (json_is_string(m)) {
        const char *s = json_string_value(m);
        const char *sp = strchr(s, ' ');
        if (!sp || sp == s || sp[1] == '\0' || strchr(sp + 1, ' '))
            return err_set(err, errlen, "model.merges[%zu]: \"%.64s\" is not two tokens separated by one space",
                           i, s);
        *left = strndup(s, (size_t)(sp - s));
        *right = strdup(sp + 1);
    } else if (json_is_array(m) && json_array_size(m) == 2 &&
               json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
        *left = strdup(json_string_value(json_array_get(m, 0)));
        *right = strdup(json_string_value(json_array_get(m, 1)));
    } else {
        return err_set(err, errlen, "model.merges[%zu]: neither \"a b\" nor [\"a\", \"b\"]", i);
    }
    if (!*left || !*right) {
        free(*left);
        free(*right);
        *left = *right = NULL;
        return err_set(err, errlen, "out of memory");
    }
    return 0;
}

static int tok_load_merges(tok_tokenizer *t, const json_t *merges, char *err, size_t errlen) {
    size_t n = json_array_size(merges);
    if (n >= (size_t)INT32_MAX) return err_set(err, errlen, "model.merges: too many");
    if (n == 0) return 0;
    t->merges_cap = tok_table_cap(n);
    t->merges = malloc(t->merges_cap * sizeof *t->merges);
    if (!t->merges) return err_set(err, errlen, "out of memory");
    for (size_t s = 0; s < t->merges_cap; s++) t->merges[s].rank = -1;
    size_t i;
    json_t *m;
    json_array_foreach(merges, i, m) {
        char *left, *right;
        if (tok_merge_parts(m, i, &left, &right, err, errlen) != 0) return -1;
        size_t ll = strlen(left), rl = strlen(right);
        int32_t a = tok_vocab_find(t, left, ll), b = tok_vocab_find(t, right, rl), ab = -1;
        char *joined = malloc(ll + rl + 1);
        if (joined) {
            memcpy(joined, left, ll);
            memcpy(joined + ll, right, rl + 1);
            ab = tok_vocab_find(t, joined, ll + rl);
        }
        int rc = 0;
        if (!joined)
            rc = err_set(err, errlen, "out of memory");
        else if (a < 0 || b < 0 || ab < 0)
            rc = err_set(err, errlen, "model.merges[%zu]: \"%.64s\" not in the vocabulary", i,
                         a < 0 ? left : b < 0 ? right : joined);
        else
            tok_merge_insert(t, a, b, (int32_t)i, ab);
        free(joined);
        free(left);
        free(right);
        if (rc) return rc;
    }
    return 0;
}

/* Reads model.{type, dropout, unk_token, byte_fallback, fuse_unk, ...} and
 * the vocabulary, merges and added tokens. Returns 0 or -1 with err. */
static int tok_load_model(tok_tokenizer *t, const json_t *root, char *err, size_t errlen) {
    const json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) return err_set(err, errlen, "model: missing or not an object");
    if (!tok_json_str_is(json_object_get(model, "type"), "BPE"))
        return err_set(err, errlen, "model.type: only \"BPE\" is supported");
    if (!tok_json_none(json_object_get(model, "dropout")))
        return err_set(err, errlen, "model.dropout: must be null (encoding would not be deterministic)");
    const char *affix[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t i = 0; i < 2; i++) {
        const json_t *v = json_object_get(model, affix[i]);
        if (!tok_json_none(v) && !tok_json_str_is(v, ""))
            return err_set(err, errlen, "model.%s: must be null (Llama 2's tokenizer has none)", affix[i]);
    }
    /* ignore_merges takes a word found whole in the vocabulary as it is,
     * which Llama 2's tokenizer does not do */
    const json_t *im = json_object_get(model, "ignore_merges");
    if (!tok_json_none(im) && !json_is_false(im))
        return err_set(err, errlen, "model.ignore_merges: must be false (Llama 2's tokenizer merges every word)");
    const json_t *bf = json_object_get(model, "byte_fallback"), *fu = json_object_get(model, "fuse_unk");
    if ((!tok_json_none(bf) && !json_is_boolean(bf)) || (!tok_json_none(fu) && !json_is_boolean(fu)))
        return err_set(err, errlen, "model.byte_fallback and model.fuse_unk: must be booleans");
    t->byte_fallback = json_is_true(bf);
    t->fuse_unk = json_is_true(fu);
    const json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab)) return err_set(err, errlen, "model.vocab: missing or not an object");
    if (!json_is_array(merges)) return err_set(err, errlen, "model.merges: missing or not an array");
    const json_t *added = json_object_get(root, "added_tokens");
    if (!tok_json_none(added) && !json_is_array(added))
        return err_set(err, errlen, "added_tokens: not an array");
    for (size_t i = 0; i < json_array_size(added); i++)
        if (!json_is_object(json_array_get(added, i)))
            return err_set(err, errlen, "added_tokens[%zu]: not an object", i);
    if (tok_load_vocab(t, vocab, added, err, errlen) != 0) return -1;
    if (tok_load_added(t, added, err, errlen) != 0) return -1;
    if (tok_load_merges(t, merges, err, errlen) != 0) return -1;
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_ids[b] = tok_vocab_find(t, name, 6);
    }
    const json_t *unk = json_object_get(model, "unk_token");
    t->unk = -1;
    if (json_is_string(unk)) {
        t->unk = tok_vocab_find(t, json_string_value(unk), json_string_length(unk));
        if (t->unk < 0)
            return err_set(err, errlen, "model.unk_token: \"%.64s\" not in the vocabulary",
                           json_string_value(unk));
    } else if (!tok_json_none(unk)) {
        return err_set(err, errlen, "model.unk_token: not a string");
    }
    return 0;
}

int tok_load_hf_buffer(const char *data, size_t len, tok_tokenizer **out, char *err,
                       size_t errlen) {
    *out = NULL;
    json_error_t jerr;
    json_t *root = json_loadb(data, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return err_set(err, errlen, "not valid JSON (line %d: %s)", jerr.line, jerr.text);
    int rc = -1;
    tok_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    t->kind = TOK_KIND_HF;
    t->pad = -1;
    if (!json_is_object(root)) {
        err_set(err, errlen, "not a JSON object");
        goto out;
    }
    if (tok_check_pipeline(root, err, errlen) != 0) goto out;
    if (tok_load_model(t, root, err, errlen) != 0) goto out;
    t->bos = tok_vocab_find(t, "<s>", 3);
    t->eos = tok_vocab_find(t, "</s>", 4);
    rc = 0;
out:
    json_decref(root);
    if (rc == 0)
        *out = t;
    else
        tok_free(t);
    return rc;
}

/* Reads the id of tokenizer_config.json's field name (a string, an object
 * with "content", or null: no such token) into *id. Returns 0 or -1. */
static int tok_config_token(const tok_tokenizer *t, const json_t *cfg, const char *name,
                            int32_t *id, char *err, size_t errlen) {
    const json_t *v = json_object_get(cfg, name);
    if (!v) return 0;
    if (json_is_null(v)) {
        *id = -1;
        return 0;
    }
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (!json_is_string(v))
        return err_set(err, errlen, "tokenizer_config.json: %s is neither a string nor {\"content\"}", name);
    *id = tok_vocab_find(t, json_string_value(v), json_string_length(v));
    if (*id < 0)
        return err_set(err, errlen, "tokenizer_config.json: %s \"%.64s\" is not a token", name,
                       json_string_value(v));
    return 0;
}

int tok_load_hf(const char *path, tok_tokenizer **out, char *err, size_t errlen) {
    *out = NULL;
    char *data = NULL, *cfg_data = NULL, *cfg_path = NULL;
    json_t *cfg = NULL;
    tok_tokenizer *t = NULL;
    size_t len, cfg_len;
    char why[ERR_LEN];
    int rc = -1;
    if (util_read_file(path, TOK_MAX_FILE, &data, &len, why, sizeof why) != 0) {
        err_set(err, errlen, "%s: %s", path, why);
        goto out;
    }
    if (tok_load_hf_buffer(data, len, &t, why, sizeof why) != 0) {
        err_set(err, errlen, "%s: %s", path, why);
        goto out;
    }
    const char *slash = strrchr(path, '/');
    size_t dirlen = slash ? (size_t)(slash - path) + 1 : 0;
    size_t plen = dirlen + sizeof "tokenizer_config.json";
    cfg_path = malloc(plen);
    if (!cfg_path) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    snprintf(cfg_path, plen, "%.*stokenizer_config.json", (int)dirlen, path);
    if (access(cfg_path, F_OK) == 0) {
        if (util_read_file(cfg_path, 1u << 20, &cfg_data, &cfg_len, why, sizeof why) != 0) {
            err_set(err, errlen, "%s: %s", cfg_path, why);
            goto out;
        }
        json_error_t jerr;
        cfg = json_loadb(cfg_data, cfg_len, 0, &jerr);
        if (!json_is_object(cfg)) {
            err_set(err, errlen, "%s: not a JSON object", cfg_path);
            goto out;
        }
        if (tok_config_token(t, cfg, "bos_token", &t->bos, err, errlen) != 0 ||
            tok_config_token(t, cfg, "eos_token", &t->eos, err, errlen) != 0 ||
            tok_config_token(t, cfg, "pad_token", &t->pad, err, errlen) != 0)
            goto out;
    }
    *out = t;
    t = NULL;
    rc = 0;
out:
    tok_free(t);
    json_decref(cfg);
    free(cfg_data);
    free(cfg_path);
    free(data);
    return rc;
}

int tok_load_dir(const char *dir, int vocab_size, tok_tokenizer **out, char *err, size_t errlen) {
    *out = NULL;
    size_t plen = strlen(dir) + sizeof "/tokenizer.json";
    char *path = malloc(plen);
    if (!path) return err_set(err, errlen, "out of memory");
    snprintf(path, plen, "%s/tokenizer.json", dir);
    tok_tokenizer *t = NULL;
    int rc = -1;
    if (access(path, F_OK) == 0) {
        if (tok_load_hf(path, &t, err, errlen) != 0) goto out;
    } else if (vocab_size == TOK_BYTE_VOCAB) {
        t = tok_byte_new();
        if (!t) {
            err_set(err, errlen, "out of memory");
            goto out;
        }
    } else {
        err_set(err, errlen, "%s: no tokenizer.json, and a vocab_size of %d is not the byte-level "
                "tokenizer's %d", dir, vocab_size, TOK_BYTE_VOCAB);
        goto out;
    }
    if (tok_vocab_size(t) > vocab_size) {
        err_set(err, errlen, "%s: the tokenizer has ids up to %d but the model's vocab_size is %d",
                path, tok_vocab_size(t) - 1, vocab_size);
        goto out;
    }
    *out = t;
    t = NULL;
    rc = 0;
out:
    tok_free(t);
    free(path);
    return rc;
}

/* ---- encoding ----------------------------------------------------------- */

/* Length of the UTF-8 character at s[0..n), or 0 when it is not valid UTF-8
 * (overlong forms, surrogates and values past U+10FFFF included). */
static size_t tok_utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    unsigned min;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) len = 2, min = 0x80;
    else if (c >= 0xe0 && c <= 0xef) len = 3, min = 0x800;
    else if (c >= 0xf0 && c <= 0xf4) len = 4, min = 0x10000;
    else return 0;
    if (len > n) return 0;
    unsigned cp = c & (0x7fu >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = cp << 6 | (s[i] & 0x3fu);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return len;
}

typedef struct {
    int32_t rank;
    uint32_t pos;
    int32_t merged;
} tok_cand;

static bool tok_cand_less(const tok_cand *a, const tok_cand *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

typedef struct {
    tok_cand *v;
    size_t len, cap;
} tok_heap;

static int tok_heap_push(tok_heap *h, tok_cand c) {
    if (h->len == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        tok_cand *v = realloc(h->v, cap * sizeof *v);
        if (!v) return -1;
        h->v = v;
        h->cap = cap;
    }
    size_t i = h->len++;
    while (i > 0 && tok_cand_less(&c, &h->v[(i - 1) / 2])) {
        h->v[i] = h->v[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->v[i] = c;
    return 0;
}

static tok_cand tok_heap_pop(tok_heap *h) {
    tok_cand top = h->v[0], last = h->v[--h->len];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const tok_cand *best = &last;
        if (l < h->len && tok_cand_less(&h->v[l], best)) m = l, best = &h->v[l];
        if (r < h->len && tok_cand_less(&h->v[r], best)) m = r;
        if (m == i) break;
        h->v[i] = h->v[m];
        i = m;
    }
    if (h->len) h->v[i] = last;
    return top;
}

/* The symbols of one segment as a doubly linked list over an array; a symbol
 * merged into its left neighbour is marked dead and unlinked. */
typedef struct {
    int32_t *id;
    int32_t *prev, *next;
    bool *dead;
    size_t n, cap;
} tok_symbols;

static int tok_symbols_push(tok_symbols *s, int32_t id) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 256;
        int32_t *a = realloc(s->id, cap * sizeof *a);
        if (a) s->id = a;
        int32_t *p = realloc(s->prev, cap * sizeof *p);
        if (p) s->prev = p;
        int32_t *q = realloc(s->next, cap * sizeof *q);
        if (q) s->next = q;
        bool *d = realloc(s->dead, cap * sizeof *d);
        if (d) s->dead = d;
        if (!a || !p || !q || !d) return -1;
        s->cap = cap;
    }
    s->id[s->n] = id;
    s->prev[s->n] = (int32_t)s->n - 1;
    s->next[s->n] = (int32_t)s->n + 1;
    s->dead[s->n] = false;
    s->n++;
    return 0;
}

/* Turns one UTF-8 character into symbols: its vocabulary id, else its bytes'
 * <0xNN> ids, else <unk> (fused with a preceding <unk> when fuse_unk).
 * *last_unk tracks whether the previous symbol came from an unknown char.
 * Returns 0 or -1 with err. */
static int tok_char_symbols(const tok_tokenizer *t, const char *c, size_t len, tok_symbols *s,
                            bool *last_unk, char *err, size_t errlen) {
    int32_t id = tok_vocab_find(t, c, len);
    if (id >= 0) {
        *last_unk = false;
        return tok_symbols_push(s, id) ? err_set(err, errlen, "out of memory") : 0;
    }
    bool bytes_ok = t->byte_fallback;
    for (size_t i = 0; bytes_ok && i < len; i++) bytes_ok = t->byte_ids[(unsigned char)c[i]] >= 0;
    if (bytes_ok) {
        *last_unk = false;
        for (size_t i = 0; i < len; i++)
            if (tok_symbols_push(s, t->byte_ids[(unsigned char)c[i]]))
                return err_set(err, errlen, "out of memory");
        return 0;
    }
    if (t->unk < 0)
        return err_set(err, errlen, "character \"%.*s\" is not in the vocabulary and there is no "
                       "byte fallback or unk token", (int)len, c);
    if (t->fuse_unk && *last_unk) return 0;
    *last_unk = true;
    return tok_symbols_push(s, t->unk) ? err_set(err, errlen, "out of memory") : 0;
}

/* Encodes one segment of text (no added tokens in it) with BPE: normalizes
 * it (leading "▁", spaces to "▁"), splits it into symbols and merges pairs
 * lowest rank first, leftmost on ties. Appends the ids to out. Returns 0 or -1. */
static int tok_bpe_segment(const tok_tokenizer *t, const char *text, size_t len, tok_ids *out,
                           char *err, size_t errlen) {
    if (len == 0) return 0;
    tok_symbols s = {0};
    tok_heap h = {0};
    int rc = -1;
    bool last_unk = false;
    if (tok_char_symbols(t, TOK_SPACE_MARK, TOK_SPACE_MARK_LEN, &s, &last_unk, err, errlen) != 0)
        goto out;
    for (size_t i = 0; i < len;) {
        size_t cl = tok_utf8_len((const unsigned char *)text + i, len - i);
        if (cl == 0) {
            err_set(err, errlen, "text is not valid UTF-8 at byte %zu", i);
            goto out;
        }
        const char *c = text[i] == ' ' ? TOK_SPACE_MARK : text + i;
        if (tok_char_symbols(t, c, text[i] == ' ' ? TOK_SPACE_MARK_LEN : cl, &s, &last_unk, err,
                             errlen) != 0)
            goto out;
        i += cl;
    }
    if (s.n > (size_t)INT32_MAX) {
        err_set(err, errlen, "text too long");
        goto out;
    }
    for (size_t i = 0; i + 1 < s.n; i++) {
        const tok_merge_slot *m = tok_merge_find(t, s.id[i], s.id[i + 1]);
        if (m && tok_heap_push(&h, (tok_cand){m->rank, (uint32_t)i, m->merged})) {
            err_set(err, errlen, "out of memory");
            goto out;
        }
    }
    while (h.len) {
        tok_cand c = tok_heap_pop(&h);
        size_t pos = c.pos;
        if (s.dead[pos] || (size_t)s.next[pos] >= s.n) continue;
        size_t right = (size_t)s.next[pos];
        /* An entry is stale when either side has changed since it was
         * pushed; the pair it names then no longer merges into c.merged. */
        const tok_merge_slot *m = tok_merge_find(t, s.id[pos], s.id[right]);
        if (!m || m->merged != c.merged) continue;
        s.id[pos] = c.merged;
        s.dead[right] = true;
        s.next[pos] = s.next[right];
        if ((size_t)s.next[right] < s.n) s.prev[s.next[right]] = (int32_t)pos;
        if (s.prev[pos] >= 0) {
            size_t p = (size_t)s.prev[pos];
            m = tok_merge_find(t, s.id[p], s.id[pos]);
            if (m && tok_heap_push(&h, (tok_cand){m->rank, (uint32_t)p, m->merged})) {
                err_set(err, errlen, "out of memory");
                goto out;
            }
        }
        if ((size_t)s.next[pos] < s.n) {
            m = tok_merge_find(t, s.id[pos], s.id[s.next[pos]]);
            if (m && tok_heap_push(&h, (tok_cand){m->rank, (uint32_t)pos, m->merged})) {
                err_set(err, errlen, "out of memory");
                goto out;
            }
        }
    }
    for (size_t i = 0; i < s.n; i = (size_t)s.next[i])
        if (tok_ids_push(out, s.id[i])) {
            err_set(err, errlen, "too many tokens (at most %zu)", out->max);
            goto out;
        }
    rc = 0;
out:
    free(s.id);
    free(s.prev);
    free(s.next);
    free(s.dead);
    free(h.v);
    return rc;
}

static bool tok_is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* The longest added token that starts at text[i], or NULL. */
static const tok_added *tok_match_added(const tok_tokenizer *t, const char *text, size_t len,
                                        size_t i) {
    unsigned char c = (unsigned char)text[i];
    const tok_added *best = NULL;
    for (size_t k = t->added_start[c]; k < t->added_start[c + 1]; k++) {
        const tok_added *a = &t->added[k];
        if (a->len <= len - i && (!best || a->len > best->len) &&
            memcmp(text + i, a->content, a->len) == 0)
            best = a;
    }
    return best;
}

/* Splits the raw text on added tokens (leftmost, longest match; lstrip and
 * rstrip tokens swallow the whitespace beside them) and BPE-encodes what lies
 * between them. */
static int tok_encode_hf(const tok_tokenizer *t, const char *text, size_t len, tok_ids *out,
                         char *err, size_t errlen) {
    size_t seg = 0; /* start of the text not yet encoded */
    for (size_t i = 0; i < len;) {
        const tok_added *a = t->nadded ? tok_match_added(t, text, len, i) : NULL;
        if (!a) {
            i++;
            continue;
        }
        size_t seg_end = i;
        if (a->lstrip)
            while (seg_end > seg && tok_is_space(text[seg_end - 1])) seg_end--;
        if (tok_bpe_segment(t, text + seg, seg_end - seg, out, err, errlen) != 0) return -1;
        if (tok_ids_push(out, a->id))
            return err_set(err, errlen, "too many tokens (at most %zu)", out->max);
        i += a->len;
        if (a->rstrip)
            while (i < len && tok_is_space(text[i])) i++;
        seg = i;
    }
    return tok_bpe_segment(t, text + seg, len - seg, out, err, errlen);
}

int tok_encode(const tok_tokenizer *t, const char *text, size_t len, tok_ids *out, char *err,
               size_t errlen) {
    if (len > TOK_MAX_TEXT)
        return err_set(err, errlen, "text of %zu bytes is over the %u-byte limit", len, TOK_MAX_TEXT);
    if (t->kind == TOK_KIND_HF) return tok_encode_hf(t, text, len, out, err, errlen);
    for (size_t i = 0; i < len; i++)
        if (tok_ids_push(out, (unsigned char)text[i]))
            return err_set(err, errlen, "too many tokens (at most %zu)", out->max);
    return 0;
}

/* ---- decoding ----------------------------------------------------------- */

/* The byte a piece "<0xNN>" stands for, or -1 for any other piece (as
 * Hugging Face's ByteFallback decoder reads it: either case of hex digit). */
static int tok_piece_byte(const char *p) {
    if (strlen(p) != 6 || strncmp(p, "<0x", 3) != 0 || p[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = p[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* buf_append, except that appending nothing is always fine (buf_append
 * writes a terminator into a buffer that has not been allocated yet). */
static int tok_buf_add(buf_t *b, const void *data, size_t n) {
    return n ? buf_append(b, data, n) : 0;
}

/* Appends a run of byte tokens: as text when the bytes are valid UTF-8,
 * otherwise one U+FFFD per byte, as ByteFallback does. Returns 0 or -1. */
static int tok_flush_bytes(buf_t *b, const unsigned char *bytes, size_t n) {
    bool valid = true;
    for (size_t i = 0; i < n && valid;) {
        size_t cl = tok_utf8_len(bytes + i, n - i);
        valid = cl > 0;
        i += cl;
    }
    if (valid) return tok_buf_add(b, bytes, n);
    for (size_t i = 0; i < n; i++)
        if (tok_buf_add(b, "\xef\xbf\xbd", 3)) return -1;
    return 0;
}

/* Appends a piece with every "▁" turned into a space. Returns 0 or -1. */
static int tok_append_piece(buf_t *b, const char *p) {
    for (const char *q; (q = strstr(p, TOK_SPACE_MARK)) != NULL; p = q + TOK_SPACE_MARK_LEN)
        if (tok_buf_add(b, p, (size_t)(q - p)) || tok_buf_add(b, " ", 1)) return -1;
    return tok_buf_add(b, p, strlen(p));
}

int tok_decode(const tok_tokenizer *t, const int32_t *ids, size_t n, bool skip_special,
               char **text, size_t *len, char *err, size_t errlen) {
    *text = NULL;
    *len = 0;
    buf_t b;
    buf_init(&b, (size_t)TOK_MAX_TEXT * 4);
    unsigned char *bytes = malloc(n ? n : 1);
    size_t nbytes = 0;
    int rc = -1;
    if (!bytes) {
        err_set(err, errlen, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->vocab_size) {
            err_set(err, errlen, "id %d at position %zu is outside the vocabulary (0..%d)", (int)id, i,
                    t->vocab_size - 1);
            goto out;
        }
        if (t->kind == TOK_KIND_BYTE) {
            if (id < 256) bytes[nbytes++] = (unsigned char)id;
            continue;
        }
        const char *p = t->pieces[id];
        if (!p) {
            err_set(err, errlen, "id %d at position %zu has no token", (int)id, i);
            goto out;
        }
        if (skip_special && t->is_special[id]) continue;
        int byte = tok_piece_byte(p);
        if (byte >= 0) {
            bytes[nbytes++] = (unsigned char)byte;
            continue;
        }
        if ((nbytes && tok_flush_bytes(&b, bytes, nbytes)) || tok_append_piece(&b, p)) {
            err_set(err, errlen, "decoded text too long");
            goto out;
        }
        nbytes = 0;
    }
    if (nbytes) {
        int r = t->kind == TOK_KIND_BYTE ? tok_buf_add(&b, bytes, nbytes)
                                         : tok_flush_bytes(&b, bytes, nbytes);
        if (r) {
            err_set(err, errlen, "decoded text too long");
            goto out;
        }
    }
    if (!b.data) { /* nothing decoded: buf_t has not allocated yet */
        *text = calloc(1, 1);
        if (!*text) {
            err_set(err, errlen, "out of memory");
            goto out;
        }
        rc = 0;
        goto out;
    }
    size_t skip = t->kind == TOK_KIND_HF && b.len > 0 && b.data[0] == ' ' ? 1 : 0;
    *len = b.len - skip;
    if (skip) memmove(b.data, b.data + 1, b.len); /* the terminator moves too */
    *text = buf_steal(&b);
    rc = 0;
out:
    free(bytes);
    buf_free(&b);
    return rc;
}

/* ---- accessors ---------------------------------------------------------- */

int tok_vocab_size(const tok_tokenizer *t) { return t->vocab_size; }
int tok_bos_id(const tok_tokenizer *t) { return t->bos; }
int tok_eos_id(const tok_tokenizer *t) { return t->eos; }
int tok_pad_id(const tok_tokenizer *t) { return t->pad; }

const char *tok_piece(const tok_tokenizer *t, int32_t id) {
    if (t->kind != TOK_KIND_HF || id < 0 || id >= t->vocab_size) return NULL;
    return t->pieces[id];
}

int32_t tok_piece_id(const tok_tokenizer *t, const char *piece) {
    if (t->kind != TOK_KIND_HF) return -1;
    return tok_vocab_find(t, piece, strlen(piece));
}
