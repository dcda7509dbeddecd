/* tok.h - tokenizers: Hugging Face tokenizer.json of Llama 2's kind, and a
 * byte-level tokenizer for small models trained from scratch.
 *
 * Llama 2's tokenizer.json (the only configuration accepted):
 *   normalizer    Sequence[Prepend "▁", Replace " " -> "▁"]
 *   pre_tokenizer null
 *   model         BPE, byte_fallback, no dropout, no continuing-subword prefix
 *                 or end-of-word suffix; merges as "a b" strings or ["a","b"]
 *   decoder       Sequence[Replace "▁" -> " ", ByteFallback, Fuse, Strip 1 leading " "]
 *   added_tokens  special tokens (<unk>, <s>, </s>, ...) split out of the raw
 *                 text before the rest is normalized, as Hugging Face does.
 * Encoding then works as tokenizers' BPE does: each text segment between
 * added tokens gets "▁" prepended (when non-empty) and its spaces replaced;
 * its UTF-8 characters become symbols (a character not in the vocabulary
 * becomes one <0xNN> token per byte); pairs merge lowest rank first, leftmost
 * on ties. Encoding never adds BOS or EOS: the caller (templates) decides.
 *
 * The byte-level tokenizer: ids 0..255 are the bytes themselves, 256 is BOS,
 * 257 EOS, 258 PAD (vocabulary size 259). No normalization: decode(encode(x))
 * is x for any byte string.
 *
 * A tokenizer is immutable once loaded and may be shared between threads. */
#ifndef STRATA_TOK_H
#define STRATA_TOK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TOK_MAX_FILE (64u << 20)     /* largest tokenizer.json read */
#define TOK_MAX_VOCAB (1u << 22)     /* ids are below this */
#define TOK_MAX_TEXT (16u << 20)     /* largest text encoded in one call */

#define TOK_BYTE_BOS 256
#define TOK_BYTE_EOS 257
#define TOK_BYTE_PAD 258
#define TOK_BYTE_VOCAB 259

typedef struct tok_tokenizer tok_tokenizer;

/* A growable array of token ids with a hard maximum (like buf_t): pushing
 * past max fails and leaves the array as it was. */
typedef struct {
    int32_t *v;
    size_t len, cap, max;
} tok_ids;

void tok_ids_init(tok_ids *a, size_t max);
/* Appends one id. Returns 0, or -1 (array unchanged) over max or out of memory. */
int tok_ids_push(tok_ids *a, int32_t id);
void tok_ids_free(tok_ids *a);

/* Loads a tokenizer.json file (at most TOK_MAX_FILE bytes). If a
 * tokenizer_config.json sits in the same directory, its bos_token, eos_token
 * and pad_token (strings or {"content": ...}) name the special ids;
 * otherwise "<s>" and "</s>" among the added tokens do, and there is no pad.
 * Returns 0 with *out owned by the caller (tok_free), or -1 with err naming
 * the problem (the file and the JSON field). */
int tok_load_hf(const char *path, tok_tokenizer **out, char *err, size_t errlen);

/* The same from a tokenizer.json held in memory (no tokenizer_config.json). */
int tok_load_hf_buffer(const char *data, size_t len, tok_tokenizer **out, char *err,
                       size_t errlen);

/* The tokenizer of a model directory: dir/tokenizer.json (and its
 * tokenizer_config.json) when present, else the byte-level tokenizer when
 * the model's vocab_size is TOK_BYTE_VOCAB. The tokenizer's ids must all be
 * below vocab_size (the model's embedding rows). Returns 0 with *out (caller
 * frees), or -1 with err naming the directory or file. */
int tok_load_dir(const char *dir, int vocab_size, tok_tokenizer **out, char *err, size_t errlen);

/* The byte-level tokenizer described above. Returns NULL when out of memory. */
tok_tokenizer *tok_byte_new(void);

void tok_free(tok_tokenizer *t);

/* Encodes len bytes of UTF-8 text (at most TOK_MAX_TEXT; invalid UTF-8 is
 * an error for the Hugging Face kind) and APPENDS the ids to out, without BOS
 * or EOS. Returns 0, or -1 with err (out may then hold a partial result). */
int tok_encode(const tok_tokenizer *t, const char *text, size_t len, tok_ids *out, char *err,
               size_t errlen);

/* Decodes ids to text as Hugging Face's decoder does (for the byte-level
 * tokenizer: the bytes; its BOS, EOS and PAD have no text). Special tokens
 * are written as their text unless skip_special. Returns 0 with *text (NUL-terminated,
 * caller frees) and *len, or -1 with err for an id out of range. */
int tok_decode(const tok_tokenizer *t, const int32_t *ids, size_t n, bool skip_special,
               char **text, size_t *len, char *err, size_t errlen);

int tok_vocab_size(const tok_tokenizer *t); /* largest id + 1 */
int tok_bos_id(const tok_tokenizer *t);     /* -1 when none */
int tok_eos_id(const tok_tokenizer *t);     /* -1 when none */
int tok_pad_id(const tok_tokenizer *t);     /* -1 when none */
/* The token's text as the vocabulary spells it ("▁the", "<0x0A>", "<s>"),
 * or NULL for an id without one. The byte tokenizer has no pieces. */
const char *tok_piece(const tok_tokenizer *t, int32_t id);
/* The id of a piece, or -1. */
int32_t tok_piece_id(const tok_tokenizer *t, const char *piece);

#endif
