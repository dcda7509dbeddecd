/* spec.c - see spec.h. One validator per job kind; each checks types, ranges
 * and unknown fields, since a typo in a field name would otherwise be a silent
 * default. */
#include "spec.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* Cuts s before a trailing multibyte UTF-8 character that snprintf's
 * truncation left incomplete: jansson refuses such text, and the error that
 * carried it would be lost (a spec with an unknown field then passed). */
static void spec_utf8_trim(char *s) {
    size_t n = strlen(s), start = n;
    while (start > 0 && n - start < 3 && ((unsigned char)s[start - 1] & 0xC0) == 0x80) start--;
    if (start == 0) return;
    unsigned char lead = (unsigned char)s[start - 1];
    size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    if (n - (start - 1) < need) s[start - 1] = '\0';
}

void spec_error(json_t *errors, const char *field, const char *fmt, ...) {
    char message[512], name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    snprintf(name, sizeof name, "%s", field);
    spec_utf8_trim(message);
    spec_utf8_trim(name);
    json_t *e = json_pack("{s:s, s:s}", "field", name, "message", message);
    /* Still not UTF-8 (a caller's text was not): the error must not vanish. */
    if (!e) e = json_pack("{s:s, s:s}", "field", "spec", "message", "invalid (not UTF-8)");
    json_array_append_new(errors, e);
}

static bool spec_is_positive_id(json_t *v) {
    return json_is_integer(v) && json_integer_value(v) > 0;
}

/* Appends "\"a\"", "\"a\" or \"b\"", "\"a\", \"b\" or \"c\"" for the keys
 * (then "path" when path is true) to out. */
static void spec_key_list(const char *const *keys, bool path, char *out, size_t outlen) {
    const char *all[8];
    size_t n = 0;
    for (; keys[n] && n < 7; n++) all[n] = keys[n];
    if (path) all[n++] = "path";
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < n && used < outlen; i++) {
        const char *sep = i == 0 ? "" : i + 1 == n ? " or " : ", ";
        int w = snprintf(out + used, outlen - used, "%s\"%s\"", sep, all[i]);
        if (w < 0) return;
        used += (size_t)w;
    }
}

/* An input reference: exactly one of the id keys (ids: artifact, job, model,
 * dataset, ...) or, locally, path. example is shown when ref is not an
 * object. */
static void spec_check_ref_of(json_t *ref, const char *field, const char *const *ids,
                              const char *example, enum spec_mode mode, json_t *errors) {
    char sub[160]; /* field (< 80) + "." + key, truncated if longer */
    if (!ref) {
        spec_error(errors, field, "is required");
        return;
    }
    if (!json_is_object(ref)) {
        spec_error(errors, field, "must be an object such as %s", example);
        return;
    }
    int kinds = 0;
    const char *key;
    json_t *value;
    json_object_foreach(ref, key, value) {
        snprintf(sub, sizeof sub, "%s.%s", field, key);
        size_t i = 0;
        while (ids[i] && strcmp(ids[i], key) != 0) i++;
        if (ids[i]) {
            kinds++;
            if (!spec_is_positive_id(value)) spec_error(errors, sub, "must be a positive integer id");
        } else if (strcmp(key, "path") == 0 && mode == SPEC_LOCAL) {
            kinds++;
            if (!json_is_string(value) || json_string_length(value) == 0 ||
                strlen(json_string_value(value)) != json_string_length(value))
                spec_error(errors, sub, "must be a non-empty file path");
        } else {
            spec_error(errors, sub, "unknown field");
        }
    }
    char keys[200];
    spec_key_list(ids, mode == SPEC_LOCAL, keys, sizeof keys);
    if (kinds == 0)
        spec_error(errors, field, "needs %s%s", ids[1] || mode == SPEC_LOCAL ? "one of " : "",
                   keys);
    else if (kinds > 1)
        spec_error(errors, field, "must name exactly one input");
}

static const char *const spec_cka_ids[] = {"artifact", "job", NULL};

/* A cka input: {"artifact": ID} or {"job": ID} (or a local path). */
static void spec_check_ref(json_t *ref, const char *field, enum spec_mode mode, json_t *errors) {
    spec_check_ref_of(ref, field, spec_cka_ids, "{\"artifact\": 3} or {\"job\": 12}", mode,
                      errors);
}

/* "layers": "all" or a non-empty array of layer indices; unique is set when
 * an index may appear only once. */
static void spec_check_layers(json_t *value, const char *field, bool unique, json_t *errors) {
    if (json_is_string(value) && strcmp(json_string_value(value), "all") == 0) return;
    if (!json_is_array(value) || json_array_size(value) == 0 ||
        json_array_size(value) > SPEC_MAX_LAYER) {
        spec_error(errors, field, "must be \"all\" or a non-empty array of layer indices");
        return;
    }
    /* one bit per possible index: repeats are found in one pass */
    unsigned char seen[SPEC_MAX_LAYER / 8 + 1];
    memset(seen, 0, sizeof seen);
    size_t i;
    json_t *layer;
    json_array_foreach(value, i, layer) {
        char item[96];
        snprintf(item, sizeof item, "%s[%zu]", field, i);
        if (!json_is_integer(layer) || json_integer_value(layer) < 0 ||
            json_integer_value(layer) > SPEC_MAX_LAYER) {
            spec_error(errors, item, "must be a layer index (integer >= 0)");
            continue;
        }
        size_t index = (size_t)json_integer_value(layer);
        unsigned char bit = (unsigned char)(1u << (index % 8));
        if (unique && (seen[index / 8] & bit))
            spec_error(errors, item, "repeats layer %zu", index);
        seen[index / 8] |= bit;
    }
}

static int spec_validate_cka(json_t *spec, enum spec_mode mode, json_t *errors) {
    size_t before = json_array_size(errors);
    const char *key;
    json_t *value;
    json_object_foreach(spec, key, value) {
        char field[80];
        snprintf(field, sizeof field, "spec.%s", key);
        if (strcmp(key, "x") == 0 || strcmp(key, "y") == 0) {
            spec_check_ref(value, field, mode, errors);
        } else if (strcmp(key, "kernel") == 0) {
            if (!json_is_string(value) ||
                (strcmp(json_string_value(value), "linear") != 0 &&
                 strcmp(json_string_value(value), "rbf") != 0))
                spec_error(errors, field, "must be \"linear\" or \"rbf\"");
        } else if (strcmp(key, "debiased") == 0) {
            if (!json_is_boolean(value)) spec_error(errors, field, "must be true or false");
        } else if (strcmp(key, "rbf_threshold") == 0) {
            if (!json_is_number(value) || json_number_value(value) <= 0 ||
                json_number_value(value) > 1e6)
                spec_error(errors, field, "must be a number in (0, 1e6]");
        } else if (strcmp(key, "layers") == 0) {
            spec_check_layers(value, field, false, errors);
        } else {
            spec_error(errors, field, "unknown field");
        }
    }
    if (!json_object_get(spec, "x")) spec_error(errors, "spec.x", "is required");
    if (!json_object_get(spec, "y")) spec_error(errors, "spec.y", "is required");
    /* Layers select among a predict job's per-layer files; with two single
     * matrices they would be silently ignored. */
    if (json_object_get(spec, "layers") && json_array_size(errors) == before &&
        json_object_get(json_object_get(spec, "x"), "artifact") &&
        json_object_get(json_object_get(spec, "y"), "artifact"))
        spec_error(errors, "spec.layers",
                   "applies only to per-layer inputs ({\"job\": ID}); x and y are single artifacts");
    return json_array_size(errors) > before ? -1 : 0;
}

/* One of the strings of a NULL-terminated list. */
static bool spec_is_one_of(json_t *v, const char *const *choices) {
    if (!json_is_string(v)) return false;
    for (size_t i = 0; choices[i]; i++)
        if (strcmp(json_string_value(v), choices[i]) == 0) return true;
    return false;
}

/* A predict's model: registered, or the output of a full fine-tuning train
 * job (the server checks the job's kind and method). */
static const char *const spec_predict_model_ids[] = {"model", "job", NULL};
static const char *const spec_predict_adapter_ids[] = {"job", "artifact", NULL};
static const char *const spec_predict_dataset_ids[] = {"dataset", NULL};
static const char *const spec_templates[] = {"llama2", "alpaca", "default", "vanilla", NULL};
static const char *const spec_pools[] = {"last_token", "mean", "mean_after_system", NULL};
static const char *const spec_dtypes[] = {"float16", "float32", NULL};
static const char *const spec_precisions[] = {"bf16", "fp16", "fp32", NULL};
static const char *const spec_dataset_formats[] = {"alpaca", "flan", NULL};

/* "precision" of a predict or train job's matrix products on a GPU. */
static void spec_check_precision(json_t *value, const char *field, json_t *errors) {
    if (!spec_is_one_of(value, spec_precisions))
        spec_error(errors, field,
                   "must be \"bf16\" (the default on a GPU), \"fp16\" or \"fp32\" (the CPU "
                   "always computes in fp32)");
}

/* "generate": {"max_new_tokens": 1..4096}. */
static void spec_check_generate(json_t *value, json_t *errors) {
    if (!json_is_object(value)) {
        spec_error(errors, "spec.generate", "must be an object such as {\"max_new_tokens\": 64}");
        return;
    }
    const char *key;
    json_t *v;
    json_object_foreach(value, key, v) {
        char field[300];
        snprintf(field, sizeof field, "spec.generate.%s", key);
        if (strcmp(key, "max_new_tokens") != 0)
            spec_error(errors, field, "unknown field");
        else if (!json_is_integer(v) || json_integer_value(v) < 1 ||
                 json_integer_value(v) > SPEC_MAX_NEW_TOKENS)
            spec_error(errors, field, "must be an integer from 1 to %d", SPEC_MAX_NEW_TOKENS);
    }
    if (!json_object_get(value, "max_new_tokens"))
        spec_error(errors, "spec.generate.max_new_tokens", "is required");
}

static int spec_validate_predict(json_t *spec, enum spec_mode mode, json_t *errors) {
    size_t before = json_array_size(errors);
    const char *key;
    json_t *value;
    json_object_foreach(spec, key, value) {
        char field[80];
        snprintf(field, sizeof field, "spec.%s", key);
        if (strcmp(key, "model") == 0) {
            spec_check_ref_of(value, field, spec_predict_model_ids,
                              "{\"model\": 3} or {\"job\": 12} (a full train job)", mode, errors);
        } else if (strcmp(key, "adapter") == 0) {
            /* null: no adapter, as when the field is left out */
            if (!json_is_null(value))
                spec_check_ref_of(value, field, spec_predict_adapter_ids,
                                  "{\"job\": 12} (a train job) or {\"artifact\": 7}", mode,
                                  errors);
        } else if (strcmp(key, "dataset") == 0) {
            spec_check_ref_of(value, field, spec_predict_dataset_ids, "{\"dataset\": 5}", mode,
                              errors);
        } else if (strcmp(key, "template") == 0) {
            if (!spec_is_one_of(value, spec_templates))
                spec_error(errors, field,
                           "must be \"llama2\" (default), \"alpaca\", \"default\" or \"vanilla\"");
        } else if (strcmp(key, "max_samples") == 0) {
            if (!json_is_integer(value) || json_integer_value(value) < 1 ||
                json_integer_value(value) > SPEC_MAX_SAMPLES)
                spec_error(errors, field, "must be an integer from 1 to %d", SPEC_MAX_SAMPLES);
        } else if (strcmp(key, "pool") == 0) {
            if (!spec_is_one_of(value, spec_pools))
                spec_error(errors, field,
                           "must be \"last_token\" (default), \"mean\" or \"mean_after_system\"");
        } else if (strcmp(key, "layers") == 0) {
            spec_check_layers(value, field, true, errors);
        } else if (strcmp(key, "dtype") == 0) {
            if (!spec_is_one_of(value, spec_dtypes))
                spec_error(errors, field, "must be \"float16\" (default) or \"float32\"");
        } else if (strcmp(key, "precision") == 0) {
            spec_check_precision(value, field, errors);
        } else if (strcmp(key, "batch_size") == 0) {
            if (!json_is_integer(value) || json_integer_value(value) < 1 ||
                json_integer_value(value) > SPEC_MAX_BATCH)
                spec_error(errors, field, "must be an integer from 1 to %d", SPEC_MAX_BATCH);
        } else if (strcmp(key, "generate") == 0) {
            spec_check_generate(value, errors);
        } else if (strcmp(key, "format") == 0) {
            if (!spec_is_one_of(value, spec_dataset_formats))
                spec_error(errors, field, "must be \"alpaca\" or \"flan\"");
        } else {
            spec_error(errors, field, "unknown field");
        }
    }
    if (!json_object_get(spec, "model")) spec_error(errors, "spec.model", "is required");
    if (!json_object_get(spec, "dataset")) spec_error(errors, "spec.dataset", "is required");
    /* A registered dataset carries its format; only a bare local file needs
     * telling (when its content does not). */
    json_t *dataset = json_object_get(spec, "dataset");
    if (json_object_get(spec, "format") && json_is_object(dataset) &&
        !json_object_get(dataset, "path"))
        spec_error(errors, "spec.format",
                   "applies only to a local dataset file ({\"path\": ...}); a registered dataset "
                   "has its format");
    return json_array_size(errors) > before ? -1 : 0;
}

/* ---- train ------------------------------------------------------------ */

static const char *const spec_train_model_ids[] = {"model", NULL};
static const char *const spec_train_dataset_ids[] = {"dataset", NULL};
static const char *const spec_train_adapter_ids[] = {"artifact", "job", NULL};
static const char *const spec_train_taskmap_ids[] = {"artifact", NULL};
static const char *const spec_tokenizer_ids[] = {"model", "artifact", NULL};
static const char *const spec_lora_targets[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                "gate_proj", "up_proj", "down_proj", NULL};
static const char *const spec_schedulers[] = {"cosine", "linear", "constant",
                                              "constant_with_warmup", NULL};
static const char *const spec_train_modes[] = {"sft", "pretrain", NULL};

/* An integer in [lo, hi]; otherwise an error naming field. */
static void spec_check_int(json_t *v, const char *field, json_int_t lo, json_int_t hi,
                           json_t *errors) {
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        spec_error(errors, field, "must be an integer from %lld to %lld", (long long)lo,
                   (long long)hi);
}

/* A number in [lo, hi] (lo excluded when lo_open, hi excluded when hi_open). */
static void spec_check_num(json_t *v, const char *field, double lo, bool lo_open, double hi,
                           bool hi_open, json_t *errors) {
    double x = json_is_number(v) ? json_number_value(v) : 0;
    if (!json_is_number(v) || (lo_open ? x <= lo : x < lo) || (hi_open ? x >= hi : x > hi))
        spec_error(errors, field, "must be a number in %c%g, %g%c", lo_open ? '(' : '[', lo, hi,
                   hi_open ? ')' : ']');
}

/* "init": a from-scratch model's config in config.json's names. The shape
 * rules are llama_config_load's (C divisible by NH, NH by NKV, an even head
 * size for RoPE), so a spec that passes here builds. */
static void spec_check_init(json_t *init, json_t *errors) {
    if (!json_is_object(init)) {
        spec_error(errors, "spec.base_model.init",
                   "must be a config object such as {\"hidden_size\": 64, \"intermediate_size\": "
                   "172, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"vocab_size\": "
                   "32000}");
        return;
    }
    static const struct {
        const char *name;
        json_int_t lo, hi;
        bool required;
    } ints[] = {
        {"hidden_size", 1, 1 << 16, true},
        {"intermediate_size", 1, 1 << 18, true},
        {"num_hidden_layers", 1, 1024, true},
        {"num_attention_heads", 1, 1024, true},
        {"num_key_value_heads", 1, 1024, false},
        {"vocab_size", 1, 1 << 24, true},
        {"max_position_embeddings", 1, 1 << 24, false},
        {"bos_token_id", 0, (1 << 24) - 1, false},
        {"eos_token_id", 0, (1 << 24) - 1, false},
        {"pad_token_id", 0, (1 << 24) - 1, false},
    };
    size_t before = json_array_size(errors);
    const char *key;
    json_t *v;
    json_object_foreach(init, key, v) {
        char field[160];
        snprintf(field, sizeof field, "spec.base_model.init.%.100s", key);
        size_t i = 0;
        while (i < sizeof ints / sizeof ints[0] && strcmp(ints[i].name, key) != 0) i++;
        if (i < sizeof ints / sizeof ints[0])
            spec_check_int(v, field, ints[i].lo, ints[i].hi, errors);
        else if (strcmp(key, "rms_norm_eps") == 0)
            spec_check_num(v, field, 0, true, 1, false, errors);
        else if (strcmp(key, "rope_theta") == 0)
            spec_check_num(v, field, 0, true, 1e12, false, errors);
        else if (strcmp(key, "initializer_range") == 0)
            spec_check_num(v, field, 0, true, 10, false, errors);
        else if (strcmp(key, "tie_word_embeddings") == 0) {
            if (!json_is_boolean(v)) spec_error(errors, field, "must be true or false");
        } else
            spec_error(errors, field, "unknown field");
    }
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (ints[i].required && !json_object_get(init, ints[i].name)) {
            char field[160];
            snprintf(field, sizeof field, "spec.base_model.init.%s", ints[i].name);
            spec_error(errors, field, "is required");
        }
    if (json_array_size(errors) > before) return;
    json_int_t c = json_integer_value(json_object_get(init, "hidden_size"));
    json_int_t nh = json_integer_value(json_object_get(init, "num_attention_heads"));
    json_t *kv = json_object_get(init, "num_key_value_heads");
    json_int_t nkv = kv ? json_integer_value(kv) : nh;
    json_int_t vocab = json_integer_value(json_object_get(init, "vocab_size"));
    if (c % nh != 0 || (c / nh) % 2 != 0)
        spec_error(errors, "spec.base_model.init.num_attention_heads",
                   "must divide hidden_size (%lld) into heads of an even size (RoPE)",
                   (long long)c);
    else if (nh % nkv != 0)
        spec_error(errors, "spec.base_model.init.num_key_value_heads",
                   "must divide num_attention_heads (%lld)", (long long)nh);
    static const char *const ids[] = {"bos_token_id", "eos_token_id", "pad_token_id"};
    for (size_t i = 0; i < 3; i++) {
        json_t *id = json_object_get(init, ids[i]);
        if (id && json_integer_value(id) >= vocab) {
            char field[64];
            snprintf(field, sizeof field, "spec.base_model.init.%s", ids[i]);
            spec_error(errors, field, "must be below vocab_size (%lld)", (long long)vocab);
        }
    }
}

/* "base_model": {"model": ID}, locally {"path": DIR}, or {"init": CONFIG,
 * "tokenizer": REF} for a model trained from scratch. */
static void spec_check_base_model(json_t *v, enum spec_mode mode, json_t *errors) {
    const char *field = "spec.base_model";
    if (!json_is_object(v)) {
        spec_error(errors, field, "must be an object such as {\"model\": 3}");
        return;
    }
    json_t *init = json_object_get(v, "init");
    if (!init) {
        spec_check_ref_of(v, field, spec_train_model_ids, "{\"model\": 3}", mode, errors);
        return;
    }
    const char *key;
    json_t *value;
    json_object_foreach(v, key, value) {
        if (strcmp(key, "init") == 0 || strcmp(key, "tokenizer") == 0) continue;
        char sub[160];
        snprintf(sub, sizeof sub, "spec.base_model.%.100s", key);
        if (strcmp(key, "model") == 0 || strcmp(key, "path") == 0)
            spec_error(errors, sub, "cannot be given with init (one base model)");
        else
            spec_error(errors, sub, "unknown field");
    }
    spec_check_init(init, errors);
    json_t *tok = json_object_get(v, "tokenizer");
    if (!tok)
        spec_error(errors, "spec.base_model.tokenizer",
                   "is required with init (a registered model's tokenizer {\"model\": ID}, or a "
                   "tokenizer.json {\"artifact\": ID})");
    else
        spec_check_ref_of(tok, "spec.base_model.tokenizer", spec_tokenizer_ids,
                          "{\"model\": 3} or {\"artifact\": 7}", mode, errors);
}

/* "dataset": one reference or a non-empty array of them (a mixture). */
static void spec_check_train_dataset(json_t *v, enum spec_mode mode, json_t *errors) {
    if (!json_is_array(v)) {
        spec_check_ref_of(v, "spec.dataset", spec_train_dataset_ids, "{\"dataset\": 5}", mode,
                          errors);
        return;
    }
    if (json_array_size(v) == 0 || json_array_size(v) > SPEC_MAX_DATASETS) {
        spec_error(errors, "spec.dataset", "must be a reference or an array of 1 to %d of them",
                   SPEC_MAX_DATASETS);
        return;
    }
    size_t i;
    json_t *item;
    json_array_foreach(v, i, item) {
        char field[64];
        snprintf(field, sizeof field, "spec.dataset[%zu]", i);
        spec_check_ref_of(item, field, spec_train_dataset_ids, "{\"dataset\": 5}", mode, errors);
    }
}

/* "lora": {"r", "alpha", "dropout", "targets"}. */
static void spec_check_lora(json_t *v, json_t *errors) {
    if (!json_is_object(v)) {
        spec_error(errors, "spec.lora",
                   "must be an object such as {\"r\": 8, \"alpha\": 16, \"dropout\": 0, "
                   "\"targets\": [\"q_proj\", \"v_proj\"]}");
        return;
    }
    const char *key;
    json_t *value;
    json_object_foreach(v, key, value) {
        char field[160];
        snprintf(field, sizeof field, "spec.lora.%.100s", key);
        if (strcmp(key, "r") == 0) {
            spec_check_int(value, field, 1, SPEC_MAX_LORA_R, errors);
        } else if (strcmp(key, "alpha") == 0) {
            spec_check_num(value, field, 0, true, 1e6, false, errors);
        } else if (strcmp(key, "dropout") == 0) {
            spec_check_num(value, field, 0, false, 1, true, errors);
        } else if (strcmp(key, "targets") == 0) {
            if (!json_is_array(value) || json_array_size(value) == 0) {
                spec_error(errors, field,
                           "must be a non-empty array of q_proj, k_proj, v_proj, o_proj, "
                           "gate_proj, up_proj, down_proj");
                continue;
            }
            unsigned seen = 0;
            size_t i;
            json_t *t;
            json_array_foreach(value, i, t) {
                char item[192];
                snprintf(item, sizeof item, "%s[%zu]", field, i);
                size_t k = 0;
                while (spec_lora_targets[k] &&
                       !(json_is_string(t) && strcmp(json_string_value(t), spec_lora_targets[k]) == 0))
                    k++;
                if (!spec_lora_targets[k])
                    spec_error(errors, item,
                               "must be one of q_proj, k_proj, v_proj, o_proj, gate_proj, "
                               "up_proj, down_proj");
                else if (seen & (1u << k))
                    spec_error(errors, item, "repeats %s", spec_lora_targets[k]);
                else
                    seen |= 1u << k;
            }
        } else {
            spec_error(errors, field, "unknown field");
        }
    }
}

/* "mixture": {"cap": N, "by": "cluster"|"task", "task_map": REF}; by
 * cluster needs the task map (task -> cluster TSV). */
static void spec_check_mixture(json_t *v, enum spec_mode mode, json_t *errors) {
    if (!json_is_object(v)) {
        spec_error(errors, "spec.mixture",
                   "must be an object such as {\"cap\": 1000, \"by\": \"task\"}");
        return;
    }
    const char *key;
    json_t *value;
    json_object_foreach(v, key, value) {
        char field[160];
        snprintf(field, sizeof field, "spec.mixture.%.100s", key);
        if (strcmp(key, "cap") == 0) {
            spec_check_int(value, field, 1, SPEC_MAX_SAMPLES, errors);
        } else if (strcmp(key, "by") == 0) {
            if (!json_is_string(value) || (strcmp(json_string_value(value), "cluster") != 0 &&
                                           strcmp(json_string_value(value), "task") != 0))
                spec_error(errors, field, "must be \"cluster\" or \"task\"");
        } else if (strcmp(key, "task_map") == 0) {
            spec_check_ref_of(value, field, spec_train_taskmap_ids, "{\"artifact\": 9}", mode,
                              errors);
        } else {
            spec_error(errors, field, "unknown field");
        }
    }
    if (!json_object_get(v, "cap")) spec_error(errors, "spec.mixture.cap", "is required");
    json_t *by = json_object_get(v, "by");
    if (!by) spec_error(errors, "spec.mixture.by", "is required");
    bool cluster = json_is_string(by) && strcmp(json_string_value(by), "cluster") == 0;
    if (cluster && !json_object_get(v, "task_map"))
        spec_error(errors, "spec.mixture.task_map",
                   "is required with by \"cluster\" (a TSV \"task<TAB>cluster\")");
    else if (!cluster && json_is_string(by) && json_object_get(v, "task_map"))
        spec_error(errors, "spec.mixture.task_map", "applies only with by \"cluster\"");
}

static int spec_validate_train(json_t *spec, enum spec_mode mode, json_t *errors) {
    size_t before = json_array_size(errors);
    const char *key;
    json_t *value;
    json_object_foreach(spec, key, value) {
        char field[80];
        snprintf(field, sizeof field, "spec.%s", key);
        if (strcmp(key, "base_model") == 0) {
            spec_check_base_model(value, mode, errors);
        } else if (strcmp(key, "dataset") == 0) {
            spec_check_train_dataset(value, mode, errors);
        } else if (strcmp(key, "template") == 0) {
            if (!spec_is_one_of(value, spec_templates))
                spec_error(errors, field,
                           "must be \"llama2\" (default), \"alpaca\", \"default\" or \"vanilla\"");
        } else if (strcmp(key, "method") == 0) {
            if (!json_is_string(value) || (strcmp(json_string_value(value), "lora") != 0 &&
                                           strcmp(json_string_value(value), "full") != 0))
                spec_error(errors, field, "must be \"lora\" (default) or \"full\"");
        } else if (strcmp(key, "lora") == 0) {
            spec_check_lora(value, errors);
        } else if (strcmp(key, "learning_rate") == 0) {
            spec_check_num(value, field, 0, true, 10, false, errors);
        } else if (strcmp(key, "num_train_epochs") == 0) {
            spec_check_num(value, field, 0, true, 1e6, false, errors);
        } else if (strcmp(key, "max_steps") == 0) {
            if (!json_is_null(value)) spec_check_int(value, field, 1, SPEC_MAX_STEPS, errors);
        } else if (strcmp(key, "batch_size") == 0) {
            spec_check_int(value, field, 1, SPEC_MAX_BATCH, errors);
        } else if (strcmp(key, "gradient_accumulation_steps") == 0) {
            spec_check_int(value, field, 1, SPEC_MAX_ACCUM, errors);
        } else if (strcmp(key, "cutoff_len") == 0) {
            spec_check_int(value, field, 2, SPEC_MAX_CUTOFF, errors);
        } else if (strcmp(key, "lr_scheduler") == 0) {
            if (!spec_is_one_of(value, spec_schedulers))
                spec_error(errors, field,
                           "must be \"linear\" (default), \"cosine\", \"constant\" or "
                           "\"constant_with_warmup\"");
        } else if (strcmp(key, "warmup_steps") == 0) {
            spec_check_int(value, field, 0, SPEC_MAX_STEPS, errors);
        } else if (strcmp(key, "warmup_ratio") == 0) {
            spec_check_num(value, field, 0, false, 1, false, errors);
        } else if (strcmp(key, "weight_decay") == 0) {
            spec_check_num(value, field, 0, false, 1e3, false, errors);
        } else if (strcmp(key, "max_grad_norm") == 0) {
            spec_check_num(value, field, 0, false, 1e9, false, errors);
        } else if (strcmp(key, "adam_beta1") == 0 || strcmp(key, "adam_beta2") == 0) {
            spec_check_num(value, field, 0, false, 1, true, errors);
        } else if (strcmp(key, "adam_epsilon") == 0) {
            spec_check_num(value, field, 0, false, 1, false, errors);
        } else if (strcmp(key, "seed") == 0) {
            spec_check_int(value, field, 0, INT64_MAX, errors);
        } else if (strcmp(key, "save_steps") == 0) {
            spec_check_int(value, field, 0, SPEC_MAX_STEPS, errors);
        } else if (strcmp(key, "mode") == 0) {
            if (!spec_is_one_of(value, spec_train_modes))
                spec_error(errors, field, "must be \"sft\" (default) or \"pretrain\"");
        } else if (strcmp(key, "adapter_init") == 0) {
            spec_check_ref_of(value, field, spec_train_adapter_ids,
                              "{\"artifact\": 7} or {\"job\": 12} (a train job)", mode, errors);
        } else if (strcmp(key, "mixture") == 0) {
            spec_check_mixture(value, mode, errors);
        } else if (strcmp(key, "precision") == 0) {
            spec_check_precision(value, field, errors);
        } else {
            spec_error(errors, field, "unknown field");
        }
    }
    if (!json_object_get(spec, "base_model")) spec_error(errors, "spec.base_model", "is required");
    if (!json_object_get(spec, "dataset")) spec_error(errors, "spec.dataset", "is required");

    /* Combinations: each names the field that does not apply. */
    json_t *method = json_object_get(spec, "method");
    bool full = json_is_string(method) && strcmp(json_string_value(method), "full") == 0;
    if (full && json_object_get(spec, "lora"))
        spec_error(errors, "spec.lora", "applies only with method \"lora\"");
    if (full && json_object_get(spec, "adapter_init"))
        spec_error(errors, "spec.adapter_init", "applies only with method \"lora\"");
    if (!full && json_object_get(spec, "adapter_init") && json_object_get(spec, "lora"))
        spec_error(errors, "spec.lora",
                   "cannot be given with adapter_init (the adapter's config sets r, alpha, "
                   "dropout and targets)");
    if (json_object_get(spec, "warmup_steps") && json_object_get(spec, "warmup_ratio"))
        spec_error(errors, "spec.warmup_ratio", "cannot be given with warmup_steps (one of them)");
    json_t *sched = json_object_get(spec, "lr_scheduler");
    json_t *ws = json_object_get(spec, "warmup_steps"), *wr = json_object_get(spec, "warmup_ratio");
    bool warmup = (json_is_integer(ws) && json_integer_value(ws) > 0) ||
                  (json_is_number(wr) && json_number_value(wr) > 0);
    if (warmup && json_is_string(sched) && strcmp(json_string_value(sched), "constant") == 0)
        spec_error(errors, ws ? "spec.warmup_steps" : "spec.warmup_ratio",
                   "does not apply to lr_scheduler \"constant\" (use \"constant_with_warmup\")");
    json_t *mode_v = json_object_get(spec, "mode");
    bool pretrain = json_is_string(mode_v) && strcmp(json_string_value(mode_v), "pretrain") == 0;
    if (pretrain && json_object_get(spec, "template"))
        spec_error(errors, "spec.template",
                   "applies only to mode \"sft\" (pretraining reads raw text)");
    return json_array_size(errors) > before ? -1 : 0;
}

bool spec_known_kind(const char *kind) {
    return kind && (strcmp(kind, "cka") == 0 || strcmp(kind, "predict") == 0 ||
                     strcmp(kind, "train") == 0);
}

int spec_validate(const char *kind, json_t *spec, enum spec_mode mode, json_t *errors) {
    if (!json_is_object(spec)) {
        spec_error(errors, "spec", "must be an object");
        return -1;
    }
    if (kind && strcmp(kind, "cka") == 0) return spec_validate_cka(spec, mode, errors);
    if (kind && strcmp(kind, "predict") == 0) return spec_validate_predict(spec, mode, errors);
    if (kind && strcmp(kind, "train") == 0) return spec_validate_train(spec, mode, errors);
    spec_error(errors, "kind", "unknown job kind \"%s\" (this server runs: " SPEC_KINDS ")",
               kind ? kind : "");
    return -1;
}
