/* llama2c.c - llama_load_llama2c (model.h): checkpoints written by llama2.c's
 * export.py, in its legacy (version 0) and version 1 float32 layouts.
 *
 * Legacy: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
 * vocab_size, seq_len; a negative vocab_size means an unshared classifier),
 * then token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3,
 * rms_final, freq_cis_real, freq_cis_imag (seq_len * HS/2 each), [wcls].
 *
 * Version 1: uint32 magic "ak42", int32 version 1, the 7 int32, a uint8
 * shared_classifier flag, zeros up to byte 256; then rms_att, rms_ffn,
 * rms_final, token_embedding, wq, wk, wv, wo, w1, w2, w3, [wcls] (export.py's
 * version1_export order; no freq_cis).
 *
 * Every stacked tensor is [out, in] per layer, as in model.h. w1 is the gate,
 * w2 the down and w3 the up projection. Files are read with pread straight
 * into the parameter allocation: nothing is mapped, so resident memory is the
 * float32 copy alone. */
#include "worker/engine/model.h"

#include "common/util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define LLAMA2C_MAGIC 0x616b3432u
#define LLAMA2C_V1_HEADER 256
#define LLAMA2C_LEGACY_HEADER 28

typedef struct {
    int fd;
    const char *path;
    off_t off; /* next byte to read */
} llama2c_reader;

static int32_t llama2c_le32(const unsigned char *p) {
    uint32_t v = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                 (uint32_t)p[3] << 24;
    int32_t s;
    memcpy(&s, &v, sizeof s);
    return s;
}

/* Reads len bytes at r->off into dst and advances. Returns 0 or -1. */
static int llama2c_read(llama2c_reader *r, void *dst, size_t len, char *err, size_t errlen) {
    unsigned char *p = dst;
    while (len > 0) {
        ssize_t got = pread(r->fd, p, len, r->off);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0)
            return err_set(err, errlen, "read %s at offset %lld: %s", r->path,
                           (long long)r->off, got < 0 ? strerror(errno) : "unexpected end");
        p += got;
        len -= (size_t)got;
        r->off += got;
    }
    return 0;
}

/* Reads n floats into dst. */
static int llama2c_floats(llama2c_reader *r, float *dst, size_t n, char *err, size_t errlen) {
    return llama2c_read(r, dst, n * sizeof(float), err, errlen);
}

/* Reads L stacked q or k projections of nheads heads of size HS, each (nheads
 * * HS, C), reordering every head's rows from llama2.c's interleaved RoPE
 * pairs (2i, 2i+1) to Hugging Face's rotate-half pairs (i, i + HS/2): HF row
 * j*HS/2 + i is llama2.c row 2i + j. This undoes the permute in transformers'
 * convert_llama_weights_to_hf, so the HF forward pass computes the same
 * attention scores. */
static int llama2c_rope_rows(llama2c_reader *r, float *dst, size_t L, size_t nheads, size_t HS,
                             size_t C, char *err, size_t errlen) {
    size_t half = HS / 2;
    for (size_t l = 0; l < L; l++)
        for (size_t h = 0; h < nheads; h++) {
            float *head = dst + (l * nheads + h) * HS * C;
            for (size_t src = 0; src < HS; src++) {
                size_t i = src / 2, j = src % 2;
                if (llama2c_floats(r, head + (j * half + i) * C, C, err, errlen) != 0)
                    return -1;
            }
        }
    return 0;
}

/* The file size the header implies; -1 on overflow. */
static int llama2c_expected_size(const llama_config *c, bool v1, size_t header, size_t *out) {
    size_t n = llama_param_count(c);
    if (n == 0) return -1;
    if (!v1) {
        size_t HS = (size_t)(c->hidden_size / c->num_attention_heads), cis;
        if (__builtin_mul_overflow((size_t)c->max_position_embeddings, HS, &cis) ||
            __builtin_add_overflow(n, cis, &n)) /* real + imag: 2 * seq_len * HS/2 */
            return -1;
    }
    if (__builtin_mul_overflow(n, sizeof(float), &n) || __builtin_add_overflow(n, header, &n))
        return -1;
    *out = n;
    return 0;
}

/* Reads and checks the header into cfg; sets *v1 and *header. */
static int llama2c_header(llama2c_reader *r, size_t size, llama_config *cfg, bool *v1,
                          size_t *header, char *err, size_t errlen) {
    unsigned char h[LLAMA2C_V1_HEADER];
    size_t want = size < sizeof h ? size : sizeof h;
    if (size < LLAMA2C_LEGACY_HEADER)
        return err_set(err, errlen, "%s: %zu bytes, too short for a llama2.c header", r->path,
                       size);
    if (llama2c_read(r, h, want, err, errlen) != 0) return -1;
    const unsigned char *p = h;
    bool shared = false;
    *v1 = (uint32_t)llama2c_le32(h) == LLAMA2C_MAGIC;
    if (*v1) {
        if (size < LLAMA2C_V1_HEADER)
            return err_set(err, errlen, "%s: %zu bytes, too short for a version 1 header",
                           r->path, size);
        int32_t version = llama2c_le32(h + 4);
        if (version != 1)
            return err_set(err, errlen,
                           "%s: llama2.c version %d is not supported (legacy and version 1, "
                           "float32)",
                           r->path, (int)version);
        p = h + 8;
        if (h[36] > 1)
            return err_set(err, errlen, "%s: shared_classifier flag is %u (expected 0 or 1)",
                           r->path, (unsigned)h[36]);
        shared = h[36] == 1;
        *header = LLAMA2C_V1_HEADER;
    } else {
        *header = LLAMA2C_LEGACY_HEADER;
    }
    int32_t dim = llama2c_le32(p), hidden = llama2c_le32(p + 4), layers = llama2c_le32(p + 8);
    int32_t heads = llama2c_le32(p + 12), kv = llama2c_le32(p + 16);
    int32_t vocab = llama2c_le32(p + 20), seq = llama2c_le32(p + 24);
    if (!*v1) {
        /* The legacy format's only flag is vocab_size's sign. */
        shared = vocab > 0;
        if (vocab == INT32_MIN)
            return err_set(err, errlen, "%s: header: vocab_size out of range", r->path);
        vocab = vocab < 0 ? -vocab : vocab;
    }
    memset(cfg, 0, sizeof *cfg);
    cfg->hidden_size = dim;
    cfg->intermediate_size = hidden;
    cfg->num_hidden_layers = layers;
    cfg->num_attention_heads = heads;
    cfg->num_key_value_heads = kv;
    cfg->vocab_size = vocab;
    cfg->max_position_embeddings = seq;
    cfg->rms_norm_eps = 1e-5f;  /* llama2.c's model.py and run.c */
    cfg->rope_theta = 10000.0f;
    cfg->tie_word_embeddings = shared;
    /* run.c's fixed BOS and EOS (SentencePiece's ids in Llama 2's vocabulary
     * and in the small custom ones llama2.c trains). */
    cfg->bos_token_id = vocab > 1 ? 1 : -1;
    cfg->eos_token_id = vocab > 2 ? 2 : -1;
    cfg->pad_token_id = -1;
    return 0;
}

int llama_load_llama2c(const char *path, llama_model *m, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    llama2c_reader r = {.fd = -1, .path = path, .off = 0};
    llama_config cfg;
    bool v1 = false;
    size_t header = 0, expect = 0;
    char why[ERR_LEN];
    int rc = -1;
    r.fd = open(path, O_RDONLY | O_CLOEXEC);
    if (r.fd < 0) return err_set(err, errlen, "open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(r.fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        err_set(err, errlen, "%s is not a regular file", path);
        goto out;
    }
    size_t size = (size_t)sb.st_size;
    if (llama2c_header(&r, size, &cfg, &v1, &header, err, errlen) != 0) goto out;
    if (llama_alloc(m, &cfg, why, sizeof why) != 0) {
        err_set(err, errlen, "%s: header: %s", path, why);
        goto out;
    }
    if (llama2c_expected_size(&cfg, v1, header, &expect) != 0 || size != expect) {
        err_set(err, errlen,
                "%s: %zu bytes, but a %s checkpoint with this header has %zu (truncated, or "
                "not a llama2.c float32 export?)",
                path, size, v1 ? "version 1" : "legacy", expect);
        goto out;
    }
    r.off = (off_t)header;

    size_t C = (size_t)cfg.hidden_size, FF = (size_t)cfg.intermediate_size;
    size_t L = (size_t)cfg.num_hidden_layers, V = (size_t)cfg.vocab_size;
    size_t NH = (size_t)cfg.num_attention_heads, NKV = (size_t)cfg.num_key_value_heads;
    size_t HS = C / NH;
    llama_weights *w = &m->w;
    if (v1) {
        if (llama2c_floats(&r, w->attn_norm, L * C, err, errlen) ||
            llama2c_floats(&r, w->mlp_norm, L * C, err, errlen) ||
            llama2c_floats(&r, w->final_norm, C, err, errlen) ||
            llama2c_floats(&r, w->embed, V * C, err, errlen))
            goto out;
    } else {
        if (llama2c_floats(&r, w->embed, V * C, err, errlen) ||
            llama2c_floats(&r, w->attn_norm, L * C, err, errlen))
            goto out;
    }
    if (llama2c_rope_rows(&r, w->wq, L, NH, HS, C, err, errlen) ||
        llama2c_rope_rows(&r, w->wk, L, NKV, HS, C, err, errlen) ||
        llama2c_floats(&r, w->wv, L * NKV * HS * C, err, errlen) ||
        llama2c_floats(&r, w->wo, L * C * NH * HS, err, errlen))
        goto out;
    if (!v1 && llama2c_floats(&r, w->mlp_norm, L * C, err, errlen)) goto out;
    if (llama2c_floats(&r, w->w_gate, L * FF * C, err, errlen) ||
        llama2c_floats(&r, w->w_down, L * C * FF, err, errlen) ||
        llama2c_floats(&r, w->w_up, L * FF * C, err, errlen))
        goto out;
    if (!v1) {
        if (llama2c_floats(&r, w->final_norm, C, err, errlen)) goto out;
        /* freq_cis_real and freq_cis_imag: recomputed from rope_theta. */
        r.off += (off_t)(cfg.max_position_embeddings * HS * sizeof(float));
    }
    if (!cfg.tie_word_embeddings && llama2c_floats(&r, w->lm_head, V * C, err, errlen)) goto out;
    rc = 0;
out:
    close(r.fd);
    if (rc != 0) llama_free(m);
    return rc;
}
