/* config.c - see config.h. */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"

/* One setting: its variable, its flag and where it lands. Integers carry
 * their allowed range so a typo is an error, not a silent default. */
enum cfg_type { CFG_STR, CFG_INT, CFG_I64 };

typedef struct {
    const char *env;
    const char *flag;
    enum cfg_type type;
    size_t offset;
    size_t size;
    int64_t min, max;
    const char *help;
} cfg_option;

#define CFG_S(field) offsetof(cfg_t, field), sizeof(((cfg_t *)0)->field)

static const cfg_option cfg_options[] = {
    {"STRATA_HOME", "--home", CFG_STR, CFG_S(home), 0, 0, "state directory (default ./var)"},
    {"STRATA_DATABASE_URL", "--database-url", CFG_STR, CFG_S(database_url), 0, 0,
     "libpq conninfo or URI (default host=$STRATA_HOME/pg/run dbname=strata)"},
    {"STRATA_BIND", "--bind", CFG_STR, CFG_S(bind), 0, 0, "listen address (default 127.0.0.1)"},
    {"STRATA_PORT", "--port", CFG_INT, CFG_S(port), 1, 65535, "listen port (default 8080)"},
    {"STRATA_MAX_BODY", "--max-body", CFG_I64, CFG_S(max_body), 1024, INT64_C(1) << 40,
     "JSON/text body limit in bytes (default 1048576)"},
    {"STRATA_MAX_UPLOAD", "--max-upload", CFG_I64, CFG_S(max_upload), 1, INT64_C(1) << 50,
     "artifact size limit in bytes (default 68719476736)"},
    {"STRATA_MAX_RESULT", "--max-result", CFG_I64, CFG_S(max_result), 1024, INT64_C(1) << 40,
     "job result (complete) body limit in bytes (default 67108864)"},
    {"STRATA_LEASE_S", "--lease-s", CFG_INT, CFG_S(lease_s), 1, 86400,
     "job lease in seconds (default 60)"},
    {"STRATA_REAPER_INTERVAL_S", "--reaper-interval-s", CFG_INT, CFG_S(reaper_interval_s), 1,
     3600, "seconds between lease checks (default 5)"},
    {"STRATA_RETRY_BASE_S", "--retry-base-s", CFG_INT, CFG_S(retry_base_s), 0, 86400,
     "first retry delay in seconds (default 5)"},
    {"STRATA_RETRY_MAX_S", "--retry-max-s", CFG_INT, CFG_S(retry_max_s), 0, 864000,
     "largest retry delay in seconds (default 300)"},
    {"STRATA_DB_POOL", "--db-pool", CFG_INT, CFG_S(db_pool), 1, 1000,
     "database connections (default 16)"},
    {"STRATA_MIGRATIONS", "--migrations", CFG_STR, CFG_S(migrations), 0, 0,
     "directory of NNNN_name.sql files"},
};

#define CFG_NOPTIONS (sizeof cfg_options / sizeof cfg_options[0])

void cfg_usage(void) {
    fprintf(stderr, "settings (environment variable, or the flag):\n");
    for (size_t i = 0; i < CFG_NOPTIONS; i++)
        fprintf(stderr, "  %-26s %-20s %s\n", cfg_options[i].env, cfg_options[i].flag,
                cfg_options[i].help);
    fprintf(stderr, "  %-26s %-20s %s\n", "STRATA_LOG_LEVEL", "--log-level", "debug or info");
}

static int cfg_set(cfg_t *cfg, const cfg_option *o, const char *value, char *err,
                   size_t errlen) {
    char *field = (char *)cfg + o->offset;
    if (o->type == CFG_STR) {
        int n = snprintf(field, o->size, "%s", value);
        if (n < 0 || (size_t)n >= o->size) return err_set(err, errlen, "%s is too long", o->env);
        return 0;
    }
    int64_t v;
    if (util_parse_i64(value, o->min, o->max, &v) != 0)
        return err_set(err, errlen, "%s must be an integer in [%lld, %lld], not \"%s\"", o->env,
                       (long long)o->min, (long long)o->max, value);
    if (o->type == CFG_INT)
        *(int *)(void *)field = (int)v;
    else
        *(int64_t *)(void *)field = v;
    return 0;
}

static int cfg_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Turns a relative path into an absolute one (the server's working directory
 * may differ from libpq's idea of a relative socket directory). */
static int cfg_absolute(char *path, size_t size, char *err, size_t errlen) {
    if (path[0] == '/') return 0;
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) return err_set(err, errlen, "getcwd: %s", strerror(errno));
    char joined[PATH_MAX * 2];
    const char *rel = path;
    if (rel[0] == '.' && rel[1] == '/') rel += 2;
    if (strcmp(rel, ".") == 0) rel = "";
    snprintf(joined, sizeof joined, "%s%s%s", cwd, rel[0] ? "/" : "", rel);
    int n = snprintf(path, size, "%s", joined);
    if (n < 0 || (size_t)n >= size) return err_set(err, errlen, "path too long: %s", joined);
    return 0;
}

/* The migrations directory: the configured one, ./migrations, or the one
 * beside the build directory of the running binary. */
static int cfg_find_migrations(cfg_t *cfg, char *err, size_t errlen) {
    if (cfg->migrations[0]) {
        if (!cfg_is_dir(cfg->migrations))
            return err_set(err, errlen, "STRATA_MIGRATIONS=%s is not a directory",
                           cfg->migrations);
        return cfg_absolute(cfg->migrations, sizeof cfg->migrations, err, errlen);
    }
    if (cfg_is_dir("migrations")) {
        snprintf(cfg->migrations, sizeof cfg->migrations, "migrations");
        return cfg_absolute(cfg->migrations, sizeof cfg->migrations, err, errlen);
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            char candidate[PATH_MAX + 32];
            snprintf(candidate, sizeof candidate, "%s/../migrations", exe);
            size_t len = strlen(candidate);
            if (cfg_is_dir(candidate) && len < sizeof cfg->migrations) {
                memcpy(cfg->migrations, candidate, len + 1);
                return 0;
            }
        }
    }
    return err_set(err, errlen,
                   "no migrations directory (set STRATA_MIGRATIONS or run from the source tree)");
}

int cfg_load(cfg_t *cfg, int argc, char **argv, int first, char **rest, int *nrest, char *err,
             size_t errlen) {
    memset(cfg, 0, sizeof *cfg);
    snprintf(cfg->home, sizeof cfg->home, "./var");
    snprintf(cfg->bind, sizeof cfg->bind, "127.0.0.1");
    cfg->port = 8080;
    cfg->max_body = 1048576;
    cfg->max_upload = INT64_C(68719476736);
    cfg->max_result = INT64_C(67108864);
    cfg->lease_s = 60;
    cfg->reaper_interval_s = 5;
    cfg->retry_base_s = 5;
    cfg->retry_max_s = 300;
    cfg->db_pool = 16;
    *nrest = 0;

    for (size_t i = 0; i < CFG_NOPTIONS; i++) {
        const char *v = getenv(cfg_options[i].env);
        if (v && *v && cfg_set(cfg, &cfg_options[i], v, err, errlen) != 0) return -1;
    }
    const char *level = getenv("STRATA_LOG_LEVEL");
    if (level && strcmp(level, "debug") == 0) cfg->debug = 1;

    for (int a = first; a < argc; a++) {
        const char *arg = argv[a];
        const cfg_option *match = NULL;
        const char *value = NULL;
        for (size_t i = 0; i < CFG_NOPTIONS && !match; i++) {
            size_t fl = strlen(cfg_options[i].flag);
            if (strncmp(arg, cfg_options[i].flag, fl) != 0) continue;
            if (arg[fl] == '=') {
                match = &cfg_options[i];
                value = arg + fl + 1;
            } else if (arg[fl] == '\0') {
                match = &cfg_options[i];
                if (a + 1 >= argc) return err_set(err, errlen, "%s needs a value", arg);
                value = argv[++a];
            }
        }
        if (match) {
            if (cfg_set(cfg, match, value, err, errlen) != 0) return -1;
        } else if (strcmp(arg, "--log-level") == 0 && a + 1 < argc) {
            cfg->debug = strcmp(argv[++a], "debug") == 0;
        } else {
            rest[(*nrest)++] = argv[a];
        }
    }

    if (cfg->retry_max_s < cfg->retry_base_s) cfg->retry_max_s = cfg->retry_base_s;
    if (cfg_absolute(cfg->home, sizeof cfg->home, err, errlen) != 0) return -1;
    int n1 = snprintf(cfg->artifacts_dir, sizeof cfg->artifacts_dir, "%s/artifacts", cfg->home);
    int n2 = snprintf(cfg->tmp_dir, sizeof cfg->tmp_dir, "%s/artifacts/tmp", cfg->home);
    int n3 = snprintf(cfg->token_path, sizeof cfg->token_path, "%s/admin.token", cfg->home);
    if (n1 < 0 || n2 < 0 || n3 < 0 || (size_t)n2 >= sizeof cfg->tmp_dir ||
        (size_t)n3 >= sizeof cfg->token_path)
        return err_set(err, errlen, "STRATA_HOME is too long");
    if (!cfg->database_url[0]) {
        int n = snprintf(cfg->database_url, sizeof cfg->database_url,
                         "host=%s/pg/run dbname=strata", cfg->home);
        if (n < 0 || (size_t)n >= sizeof cfg->database_url)
            return err_set(err, errlen, "STRATA_HOME is too long");
    }
    return cfg_find_migrations(cfg, err, errlen);
}
