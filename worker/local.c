/* local.c - see local.h. */
#include "worker/local.h"

#include "common/spec.h"
#include "common/util.h"
#include "worker/engine/cuda/cuda.h"
#include "worker/runner.h"
#include "worker/train.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define LOCAL_SPEC_MAX (16u << 20)

typedef struct {
    const char *out_dir;    /* NULL: artifacts are refused */
    const char *resume_dir; /* --resume: where a train job's checkpoints are; NULL: none */
    bool bad_input;      /* an input reference could not be resolved */
} local_state;

static atomic_int local_cancel;

static void local_on_sigint(int signo) {
    (void)signo;
    atomic_store(&local_cancel, 1);
}

static void local_usage(FILE *out) {
    fprintf(out,
            "usage: strata-worker run --kind KIND --spec JSON|@FILE [--out DIR] [--resume DIR]\n"
            "                         [--gpu N | --cpu]\n"
            "\n"
            "Runs one job here, without a server, and prints its result as JSON.\n"
            "Inputs are {\"path\": \"x.npy\"} or, per layer, {\"path\": \"dir\"} holding\n"
            "hidden_states_{layer}.npy files. Example:\n"
            "  strata-worker run --kind cka --spec '{\"x\": {\"path\": \"a.npy\"}, "
            "\"y\": {\"path\": \"b.npy\"}}'\n"
            "\n"
            "  strata-worker run --kind predict --spec '{\"model\": {\"path\": \"model_dir\"}, "
            "\"dataset\": {\"path\": \"data.json\"}}' --out DIR\n"
            "Models are a Hugging Face directory or a llama2.c .bin; datasets an alpaca JSON\n"
            "or Flan JSONL file (\"format\" tells them apart when the content does not);\n"
            "an adapter is {\"path\": \"dir\"} with adapter_config.json.\n"
            "\n"
            "  --kind KIND   job kind (cka, predict, train)\n"
            "  --spec SPEC   the job spec as JSON, or @FILE to read it from FILE\n"
            "  --out DIR     where the job's output artifacts go (created if missing)\n"
            "  --resume DIR  train: continue from the highest checkpoint-{step}-* set in DIR\n"
            "                (an earlier run's --out)\n"
            "  --gpu N       predict/train on GPU N (default: GPU 0 when there is one)\n"
            "  --cpu         predict/train on the CPU even when there is a GPU\n"
            "                (a GPU that cannot be used is reported and the CPU runs the job)\n"
            "Exit status: 0 success, 2 bad arguments/spec/input, 1 other failure.\n");
}

static const char *local_ref_path(json_t *ref, char *err, size_t errlen) {
    const char *path = json_string_value(json_object_get(ref, "path"));
    if (!path)
        err_set(err, errlen,
                "a local run reads {\"path\": ...} inputs; {\"artifact\"} and {\"job\"} need a "
                "server");
    return path;
}

static int local_resolve_file(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen,
                              char *err, size_t errlen) {
    local_state *st = ctx->user;
    struct stat sb;
    const char *p = local_ref_path(ref, err, errlen);
    st->bad_input = true;
    if (!p) return -1;
    if (stat(p, &sb) != 0) return err_set(err, errlen, "%s: %s", p, strerror(errno));
    if (!S_ISREG(sb.st_mode)) return err_set(err, errlen, "%s is not a regular file", p);
    int n = snprintf(path, pathlen, "%s", p);
    if (n < 0 || (size_t)n >= pathlen) return err_set(err, errlen, "path too long: %s", p);
    st->bad_input = false;
    return 0;
}

/* A {"path": ...} that exists; dir_ok / file_ok say which kinds may be
 * there. Copies it to path. */
static int local_resolve_existing(runner_ctx *ctx, json_t *ref, const char *what, bool dir_ok,
                                  bool file_ok, char *path, size_t pathlen, char *err,
                                  size_t errlen) {
    local_state *st = ctx->user;
    struct stat sb;
    const char *p = local_ref_path(ref, err, errlen);
    st->bad_input = true;
    if (!p) return -1;
    if (stat(p, &sb) != 0) return err_set(err, errlen, "%s: %s", p, strerror(errno));
    bool ok = (dir_ok && S_ISDIR(sb.st_mode)) || (file_ok && S_ISREG(sb.st_mode));
    if (!ok)
        return err_set(err, errlen, "%s %s is not a %s", what, p,
                       dir_ok && file_ok ? "directory or regular file"
                       : dir_ok         ? "directory"
                                        : "regular file");
    int n = snprintf(path, pathlen, "%s", p);
    if (n < 0 || (size_t)n >= pathlen) return err_set(err, errlen, "path too long: %s", p);
    st->bad_input = false;
    return 0;
}

/* A model: a Hugging Face directory or a llama2.c .bin file. */
static int local_resolve_model(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen,
                               char *err, size_t errlen) {
    return local_resolve_existing(ctx, ref, "model", true, true, path, pathlen, err, errlen);
}

/* A dataset file; its format is left to the content ("auto") unless the
 * spec's "format" says (predict reads that itself). */
static int local_resolve_dataset(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen,
                                 char *format, size_t formatlen, char *err, size_t errlen) {
    if (local_resolve_existing(ctx, ref, "dataset", false, true, path, pathlen, err, errlen) != 0)
        return -1;
    snprintf(format, formatlen, "auto");
    return 0;
}

/* An adapter: a directory with adapter_config.json and
 * adapter_model.safetensors (checked by the LoRA loader). */
static int local_resolve_adapter(runner_ctx *ctx, json_t *ref, char *path, size_t pathlen,
                                 char *err, size_t errlen) {
    return local_resolve_existing(ctx, ref, "adapter", true, false, path, pathlen, err, errlen);
}

static int local_layer_cmp(const void *pa, const void *pb) {
    const runner_layer_file *a = pa, *b = pb;
    return (a->layer > b->layer) - (a->layer < b->layer);
}

static int local_resolve_layers(runner_ctx *ctx, json_t *ref, runner_layer_file **files,
                                size_t *nfiles, char *err, size_t errlen) {
    local_state *st = ctx->user;
    runner_layer_file *out = NULL;
    size_t n = 0, cap = 0;
    int rc = -1;
    DIR *d = NULL;
    *files = NULL;
    *nfiles = 0;
    st->bad_input = true;
    const char *dir = local_ref_path(ref, err, errlen);
    if (!dir) return -1;
    d = opendir(dir);
    if (!d) return err_set(err, errlen, "%s: %s", dir, strerror(errno));
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int layer;
        if (!runner_layer_from_name(e->d_name, &layer)) continue;
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 32;
            runner_layer_file *p = realloc(out, ncap * sizeof *p);
            if (!p) {
                err_set(err, errlen, "out of memory");
                goto out;
            }
            out = p;
            cap = ncap;
        }
        out[n].layer = layer;
        int len = snprintf(out[n].path, sizeof out[n].path, "%s/%s", dir, e->d_name);
        if (len < 0 || (size_t)len >= sizeof out[n].path) {
            err_set(err, errlen, "path too long in %s", dir);
            goto out;
        }
        n++;
    }
    if (n == 0) {
        err_set(err, errlen, "%s holds no hidden_states_{layer}.npy files", dir);
        goto out;
    }
    qsort(out, n, sizeof *out, local_layer_cmp);
    *files = out;
    *nfiles = n;
    out = NULL;
    st->bad_input = false;
    rc = 0;
out:
    free(out);
    closedir(d);
    return rc;
}

/* --resume DIR: the highest complete checkpoint in DIR (an earlier run's
 * --out); without --resume, none. A --resume DIR without a checkpoint is a
 * bad argument, not a fresh start. */
static int local_resolve_checkpoint(runner_ctx *ctx, char *dir, size_t dirlen, int64_t *step,
                                    char *err, size_t errlen) {
    local_state *st = ctx->user;
    *step = 0;
    if (!st->resume_dir) return 0;
    if (train_find_checkpoint(st->resume_dir, step, err, errlen) != 0) {
        st->bad_input = true;
        return -1;
    }
    if (*step == 0) {
        st->bad_input = true;
        return err_set(err, errlen, "--resume %s: no checkpoint-{step}-trainer_state.json there",
                       st->resume_dir);
    }
    int n = snprintf(dir, dirlen, "%s", st->resume_dir);
    if (n < 0 || (size_t)n >= dirlen) {
        st->bad_input = true;
        return err_set(err, errlen, "--resume: path too long");
    }
    return 0;
}

static void local_progress(runner_ctx *ctx, int64_t step, int64_t total, const char *message) {
    (void)ctx;
    fprintf(stderr, "progress %lld/%lld %s\n", (long long)step, (long long)total,
            message ? message : "");
}

static void local_log(runner_ctx *ctx, const char *line) {
    (void)ctx;
    fprintf(stderr, "%s\n", line);
}

/* Copies src to dst (streamed), for when rename crosses file systems. */
static int local_copy(const char *src, const char *dst, char *err, size_t errlen) {
    char buf[1 << 16];
    int in = open(src, O_RDONLY | O_CLOEXEC), out = -1, rc = -1;
    if (in < 0) return err_set(err, errlen, "open %s: %s", src, strerror(errno));
    out = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) {
        err_set(err, errlen, "create %s: %s", dst, strerror(errno));
        goto out;
    }
    for (;;) {
        ssize_t r = read(in, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            err_set(err, errlen, "read %s: %s", src, strerror(errno));
            goto out;
        }
        if (r == 0) break;
        for (ssize_t off = 0; off < r;) {
            ssize_t w = write(out, buf + off, (size_t)(r - off));
            if (w < 0 && errno == EINTR) continue;
            if (w < 0) {
                err_set(err, errlen, "write %s: %s", dst, strerror(errno));
                goto out;
            }
            off += w;
        }
    }
    if (fsync(out) != 0) {
        err_set(err, errlen, "fsync %s: %s", dst, strerror(errno));
        goto out;
    }
    rc = 0;
out:
    close(in);
    if (out >= 0 && close(out) != 0 && rc == 0)
        rc = err_set(err, errlen, "close %s: %s", dst, strerror(errno));
    return rc;
}

static int local_add_artifact(runner_ctx *ctx, const char *name, const char *path, char *err,
                              size_t errlen) {
    local_state *st = ctx->user;
    char dst[PATH_MAX];
    if (!util_valid_name(name)) return err_set(err, errlen, "bad artifact name \"%s\"", name);
    if (!st->out_dir)
        return err_set(err, errlen, "the job writes artifact %s: pass --out DIR to keep it", name);
    int n = snprintf(dst, sizeof dst, "%s/%s", st->out_dir, name);
    if (n < 0 || (size_t)n >= sizeof dst) return err_set(err, errlen, "path too long: %s", name);
    if (rename(path, dst) != 0) {
        if (errno != EXDEV) return err_set(err, errlen, "move %s to %s: %s", path, dst, strerror(errno));
        if (local_copy(path, dst, err, errlen) != 0) return -1;
    }
    fprintf(stderr, "artifact %s\n", dst);
    return 0;
}

/* Removes the scratch directory and the plain files in it. */
static void local_remove_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char p[PATH_MAX];
        int n = snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        if (n > 0 && (size_t)n < sizeof p) unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

/* Parses --spec's value: inline JSON or @FILE. Returns the object or NULL
 * after printing why. */
static json_t *local_load_spec(const char *arg) {
    json_error_t jerr;
    json_t *spec;
    if (arg[0] == '@') {
        char *data = NULL, err[ERR_LEN];
        size_t len = 0;
        if (util_read_file(arg + 1, LOCAL_SPEC_MAX, &data, &len, err, sizeof err) != 0) {
            fprintf(stderr, "strata-worker run: --spec: %s\n", err);
            return NULL;
        }
        spec = json_loadb(data, len, 0, &jerr);
        free(data);
    } else {
        spec = json_loads(arg, 0, &jerr);
    }
    if (!spec)
        fprintf(stderr, "strata-worker run: --spec is not valid JSON: %s (line %d, column %d)\n",
                jerr.text, jerr.line, jerr.column);
    return spec;
}

/* Takes "--name VALUE" or "--name=VALUE" at argv[*i]. Returns the value, or
 * NULL when argv[*i] is not this option; *missing when the value is absent. */
static const char *local_option(int argc, char **argv, int *i, const char *name, bool *missing) {
    size_t n = strlen(name);
    const char *a = argv[*i];
    if (strncmp(a, name, n) != 0) return NULL;
    if (a[n] == '=') return a + n + 1;
    if (a[n] != '\0') return NULL;
    if (*i + 1 >= argc) {
        *missing = true;
        return NULL;
    }
    return argv[++*i];
}

/* The device of --gpu N / --cpu: --cpu gives -1; --gpu N gives N (a whole
 * number; whether that GPU exists is the runner's to find out, and it says
 * so in the job log); neither gives GPU 0 when cuda_devices finds one, else
 * -1. Returns 0, or -1 after printing why the arguments are wrong. */
static int local_pick_gpu(const char *gpu_arg, bool cpu, int *gpu) {
    if (cpu && gpu_arg) {
        fprintf(stderr, "strata-worker run: --gpu and --cpu exclude each other\n");
        return -1;
    }
    if (cpu) {
        *gpu = -1;
        return 0;
    }
    if (gpu_arg) {
        int64_t v;
        if (util_parse_i64(gpu_arg, 0, CUDA_MAX_DEVICES - 1, &v) != 0) {
            fprintf(stderr, "strata-worker run: --gpu must be a GPU index from 0 to %d, not \"%s\"\n",
                    CUDA_MAX_DEVICES - 1, gpu_arg);
            return -1;
        }
        *gpu = (int)v;
        return 0;
    }
    static cuda_device_info devs[CUDA_MAX_DEVICES];
    char why[ERR_LEN];
    *gpu = cuda_devices(devs, CUDA_MAX_DEVICES, why, sizeof why) > 0 ? devs[0].index : -1;
    return 0;
}

int local_main(int argc, char **argv) {
    const char *kind = NULL, *spec_arg = NULL, *out_dir = NULL, *resume_dir = NULL;
    const char *gpu_arg = NULL;
    bool cpu = false;
    for (int i = 1; i < argc; i++) {
        bool missing = false;
        const char *v;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            local_usage(stdout);
            return 0;
        }
        if (strcmp(argv[i], "--cpu") == 0) {
            cpu = true;
            continue;
        }
        if ((v = local_option(argc, argv, &i, "--kind", &missing)) != NULL)
            kind = v;
        else if ((v = local_option(argc, argv, &i, "--spec", &missing)) != NULL)
            spec_arg = v;
        else if ((v = local_option(argc, argv, &i, "--out", &missing)) != NULL)
            out_dir = v;
        else if ((v = local_option(argc, argv, &i, "--resume", &missing)) != NULL)
            resume_dir = v;
        else if ((v = local_option(argc, argv, &i, "--gpu", &missing)) != NULL)
            gpu_arg = v;
        if (missing) {
            fprintf(stderr, "strata-worker run: %s needs a value\n", argv[i]);
            return 2;
        }
        if (!v) {
            fprintf(stderr, "strata-worker run: unknown argument \"%s\"\n", argv[i]);
            local_usage(stderr);
            return 2;
        }
    }
    if (!kind || !spec_arg) {
        fprintf(stderr, "strata-worker run: --kind and --spec are required\n");
        local_usage(stderr);
        return 2;
    }
    if (!runner_supports(kind)) {
        fprintf(stderr, "strata-worker run: unknown job kind \"%s\" (this worker runs: cka, predict, train)\n",
                kind);
        return 2;
    }
    int gpu = -1;
    if (local_pick_gpu(gpu_arg, cpu, &gpu) != 0) return 2;
    json_t *spec = local_load_spec(spec_arg);
    if (!spec) return 2;
    json_t *errors = json_array();
    int status = 1;
    char work_dir[PATH_MAX] = "";
    json_t *result = NULL;
    struct sigaction old_int, sa;
    bool handler = false;
    if (!errors) goto out;
    if (spec_validate(kind, spec, SPEC_LOCAL, errors) != 0) {
        size_t i;
        json_t *e;
        fprintf(stderr, "strata-worker run: invalid spec:\n");
        json_array_foreach(errors, i, e)
            fprintf(stderr, "  %s: %s\n", json_string_value(json_object_get(e, "field")),
                    json_string_value(json_object_get(e, "message")));
        status = 2;
        goto out;
    }
    char err[ERR_LEN] = "";
    if (out_dir && util_mkdirs(out_dir, 0755, err, sizeof err) != 0) {
        fprintf(stderr, "strata-worker run: --out: %s\n", err);
        status = 2;
        goto out;
    }
    const char *tmp = getenv("TMPDIR");
    int n = snprintf(work_dir, sizeof work_dir, "%s/strata-run-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (n < 0 || (size_t)n >= sizeof work_dir || !mkdtemp(work_dir)) {
        fprintf(stderr, "strata-worker run: cannot create a scratch directory: %s\n",
                strerror(errno));
        work_dir[0] = '\0';
        goto out;
    }

    if (resume_dir && strcmp(kind, "train") != 0) {
        fprintf(stderr, "strata-worker run: --resume is for train jobs\n");
        status = 2;
        goto out;
    }
    local_state st = {out_dir, resume_dir, false};
    atomic_store(&local_cancel, 0);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = local_on_sigint;
    sigemptyset(&sa.sa_mask);
    handler = sigaction(SIGINT, &sa, &old_int) == 0;
    runner_ctx ctx = {.resolve_file = local_resolve_file,
                      .resolve_layers = local_resolve_layers,
                      .resolve_model = local_resolve_model,
                      .resolve_dataset = local_resolve_dataset,
                      .resolve_adapter = local_resolve_adapter,
                      .progress = local_progress,
                      .log = local_log,
                      .add_artifact = local_add_artifact,
                      .resolve_checkpoint = local_resolve_checkpoint,
                      .cancel = &local_cancel,
                      .work_dir = work_dir,
                      .user = &st,
                      .gpu = gpu};
    bool retryable = false, cancelled = false;
    if (runner_run(kind, spec, &ctx, &result, &retryable, &cancelled, err, sizeof err) != 0) {
        fprintf(stderr, "strata-worker run: %s\n", cancelled ? "cancelled" : err);
        status = (!retryable || st.bad_input) && !cancelled ? 2 : 1;
        goto out;
    }
    char *text = json_dumps(result, JSON_COMPACT);
    if (!text) {
        fprintf(stderr, "strata-worker run: out of memory\n");
        goto out;
    }
    printf("%s\n", text);
    free(text);
    status = fflush(stdout) == 0 ? 0 : 1;
out:
    if (handler) sigaction(SIGINT, &old_int, NULL);
    if (work_dir[0]) local_remove_dir(work_dir);
    json_decref(result);
    json_decref(errors);
    json_decref(spec);
    return status;
}
