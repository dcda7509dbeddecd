/* sft.h - training examples and batches: LLaMA-Factory's supervised
 * preprocessing, raw-text pretraining examples, seeded epoch shuffling with
 * a resumable data position, and per-cluster / per-task caps for multi-task
 * (Flan) mixtures.
 *
 * Examples (sft_build). SFT mode, as LLaMA-Factory's
 * preprocess_supervised_dataset does for one-turn examples:
 *   prompt, response = tmpl_encode(...)            (response ends with EOS)
 *   keep = tmpl_cutoff(len(prompt), len(response), cutoff_len, reserved_label_len)
 *   input_ids = prompt[:keep_p] + response[:keep_r]
 *   labels    = [SFT_IGNORE] * keep_p + response[:keep_r]
 * Pretraining mode (raw text, all tokens count):
 *   input_ids = [BOS] + encode(query + response) + [EOS], cut to cutoff_len
 *   (BOS / EOS left out when the tokenizer has none; the text is the query
 *   followed directly by the response, which may be "")
 *   labels    = input_ids
 * Labels are aligned with input_ids, as Hugging Face passes them: the loss
 * predicts labels[i + 1] from position i (the shift is the loss's job), so
 * labels[0] never counts.
 *
 * Batches (sft_loader). Each epoch visits every example once, in an order
 * that depends only on (seed, epoch): Fisher-Yates over 0..n-1 driven by
 * xoshiro256** seeded through splitmix64 (sft_rng_*). Micro-batches take
 * batch_size consecutive examples of that order (the epoch's last one may
 * be smaller); an optimizer step groups grad_accum consecutive micro-batches
 * of one epoch, and the epoch's last step takes what is left (so steps never
 * straddle epochs and every example is seen once per epoch). Rows are right
 * padded to the micro-batch's longest example with the pad id, labels with
 * SFT_IGNORE. The data position (epoch, cursor into that epoch's order)
 * after any step is all a resumed run needs to continue the same sequence.
 *
 * Mixtures (sft_mix_cap). Flan examples carry a task; a task map (TSV
 * "task<TAB>cluster" with that header line, e.g. the seed's flan_tasks.tsv)
 * names each task's cluster. Capping keeps at most cap examples per cluster
 * (or per task), chosen by one seeded shuffle of the whole dataset. */
#ifndef STRATA_SFT_H
#define STRATA_SFT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/engine/dataset.h"
#include "worker/engine/template.h"
#include "worker/engine/tok.h"

#define SFT_IGNORE (-100) /* label of a position the loss skips (PyTorch's ignore_index) */

/* ---- deterministic random numbers ---- */

/* xoshiro256** (Blackman and Vigna), its four words filled from splitmix64. */
typedef struct {
    uint64_t s[4];
} sft_rng;

/* Seeds the generator for (seed, stream): the splitmix64 state starts at
 * splitmix64_mix(seed) ^ splitmix64_mix(stream + 1) and its next four
 * outputs are the xoshiro words. Streams are the epochs of one run. */
void sft_rng_init(sft_rng *r, uint64_t seed, uint64_t stream);
uint64_t sft_rng_next(sft_rng *r);
/* A uniform integer in [0, n) for n >= 1, by rejection (no modulo bias):
 * draws x until x >= (2^64 - n) % n, then returns x % n. */
uint64_t sft_rng_below(sft_rng *r, uint64_t n);
/* Fisher-Yates: for i = n-1 down to 1 swap v[i] with v[sft_rng_below(r, i + 1)]. */
void sft_shuffle(sft_rng *r, size_t *v, size_t n);

/* ---- examples ---- */

enum sft_mode { SFT_MODE_SFT = 0, SFT_MODE_PRETRAIN };

typedef struct {
    enum sft_mode mode;
    enum tmpl_kind tmpl;       /* SFT mode only */
    size_t cutoff_len;         /* at least 2; LLaMA-Factory's default is 1024 */
    size_t reserved_label_len; /* SFT mode; LLaMA-Factory's default is 1 */
} sft_opts;

/* All examples' tokens, concatenated: example i is ids[off[i] .. off[i+1]). */
typedef struct {
    int32_t *input_ids;
    int32_t *labels;
    size_t *off;        /* n + 1 entries */
    size_t n;           /* examples */
    size_t n_tokens;    /* off[n] */
    size_t n_label;     /* labels that count (not SFT_IGNORE), excluding each example's first */
    size_t n_truncated; /* examples tmpl_cutoff / cutoff_len shortened */
} sft_set;

/* Builds the examples of ds (or of the ds indices subset[0..n_subset), in
 * that order, when subset is not NULL) with tokenizer t. Fails for an empty
 * dataset or subset, a cutoff_len under 2 (or, in SFT mode, not above
 * reserved_label_len, which would leave no prompt), a reserved_label_len of
 * 0, or a template/tokenizer error (naming the example). Returns 0 with *out
 * (sft_set_free), or -1 with err and *out empty. */
int sft_build(const ds_dataset *ds, const size_t *subset, size_t n_subset,
              const tok_tokenizer *t, const sft_opts *o, sft_set *out, char *err,
              size_t errlen);
void sft_set_free(sft_set *s);

/* The id padding uses, as LLaMA-Factory sets it: the tokenizer's pad id,
 * else its EOS id, else 0. */
int32_t sft_pad_id(const tok_tokenizer *t);

/* ---- batches ---- */

/* Step counts as Hugging Face's Trainer derives them, with this module's
 * epoch-bounded steps: micro = ceil(n / batch_size) micro-batches per epoch,
 * steps_per_epoch = ceil(micro / grad_accum); total = max_steps when it is
 * above 0, else num_epochs * steps_per_epoch. Returns 0, or -1 with err for
 * n, batch_size or grad_accum of 0, or both max_steps and num_epochs 0. */
int sft_plan(size_t n, size_t batch_size, size_t grad_accum, size_t num_epochs,
             size_t max_steps, size_t *steps_per_epoch, size_t *total_steps, char *err,
             size_t errlen);

typedef struct {
    uint64_t epoch;  /* 0-based */
    uint64_t cursor; /* examples of that epoch's order already consumed */
} sft_pos;

/* One micro-batch: rows x seq_len, row-major, right padded. */
typedef struct {
    size_t rows, seq_len;
    int32_t *input_ids; /* rows * seq_len */
    int32_t *labels;    /* rows * seq_len; SFT_IGNORE on padding */
    size_t *lens;       /* rows: each row's unpadded length */
    size_t *index;      /* rows: the example's index in the sft_set */
    size_t n_label;     /* counted labels (as sft_set.n_label counts them) */
} sft_batch;

/* One optimizer step: 1..grad_accum micro-batches of one epoch. */
typedef struct {
    sft_batch *mb;
    size_t n_mb;
    size_t cap_mb; /* entries allocated (kept across calls) */
    size_t n_label;  /* sum over the micro-batches */
    size_t n_tokens; /* unpadded tokens, summed */
    uint64_t epoch;  /* the epoch the step's examples come from */
} sft_step;

typedef struct {
    uint64_t seed;
    size_t batch_size, grad_accum;
    bool shuffle;   /* false: every epoch in dataset order */
    int32_t pad_id; /* sft_pad_id */
} sft_loader_opts;

typedef struct {
    const sft_set *set; /* borrowed; must outlive the loader */
    sft_loader_opts o;
    size_t *order; /* the current epoch's order */
    sft_pos pos;
} sft_loader;

/* Starts a loader at position (0, 0). Returns 0, or -1 with err for a bad
 * option or out of memory. The loader borrows set. */
int sft_loader_init(sft_loader *l, const sft_set *set, const sft_loader_opts *o, char *err,
                    size_t errlen);
/* Moves to a saved position (from sft_loader_pos after a step). Returns 0,
 * or -1 with err when cursor is past the dataset. */
int sft_loader_seek(sft_loader *l, sft_pos pos, char *err, size_t errlen);
sft_pos sft_loader_pos(const sft_loader *l);
/* Fills *step with the next optimizer step and moves the position past it
 * (to (epoch + 1, 0) when the epoch is done). *step must be zeroed before
 * its first use; it is reused across calls (sft_step_free at the end).
 * Returns 0, or -1 with err when out of memory. */
int sft_loader_next(sft_loader *l, sft_step *step, char *err, size_t errlen);
void sft_step_free(sft_step *step);
void sft_loader_free(sft_loader *l);

/* ---- multi-task mixtures ---- */

typedef struct {
    char **task, **cluster; /* n pairs, sorted by task */
    size_t n;
} sft_taskmap;

/* Parses a task map: the header line "task\tcluster", then one
 * "task\tcluster" per line (a trailing "\r" and blank lines are ignored).
 * Fails on a missing header, a line without exactly one tab, an empty
 * field or a task listed twice (naming the 1-based line). name is used in
 * errors. Returns 0 with *out (sft_taskmap_free), or -1 with err. */
int sft_taskmap_parse(const char *name, const char *data, size_t len, sft_taskmap *out,
                      char *err, size_t errlen);
/* sft_taskmap_parse on a file (at most 16 MiB). */
int sft_taskmap_load(const char *path, sft_taskmap *out, char *err, size_t errlen);
/* The task's cluster, or NULL when the map lacks it. */
const char *sft_taskmap_cluster(const sft_taskmap *m, const char *task);
void sft_taskmap_free(sft_taskmap *m);

enum sft_cap_by { SFT_CAP_CLUSTER = 0, SFT_CAP_TASK };

typedef struct {
    char *name;       /* the cluster or task */
    size_t available; /* its examples in the dataset */
    size_t kept;      /* min(available, cap) */
} sft_group;

typedef struct {
    size_t *keep; /* kept dataset indices, ascending */
    size_t n_keep;
    sft_group *groups; /* sorted by name */
    size_t n_groups;
} sft_mix;

/* Caps ds at cap examples per cluster (map required) or per task (map
 * unused, may be NULL). Shuffles 0..n-1 once with sft_rng_init(seed, 0) and
 * sft_shuffle, then walks that order keeping an example while its group has
 * fewer than cap kept; keep is then sorted ascending (the loader does the
 * training order). Fails for an empty dataset, cap 0, an example without a
 * task, or (by cluster) a task the map lacks, naming the example. Returns 0
 * with *out (sft_mix_free), or -1 with err. */
int sft_mix_cap(const ds_dataset *ds, const sft_taskmap *map, enum sft_cap_by by, size_t cap,
                uint64_t seed, sft_mix *out, char *err, size_t errlen);
void sft_mix_free(sft_mix *m);

#endif
