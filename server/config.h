/* config.h - the server's configuration: environment variables, each of
 * which a command-line flag of the same name overrides (STRATA_PORT ->
 * --port). One cfg_t is filled at startup and read-only afterwards. */
#ifndef STRATA_CONFIG_H
#define STRATA_CONFIG_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    char home[PATH_MAX];          /* STRATA_HOME, absolute */
    char artifacts_dir[PATH_MAX]; /* $home/artifacts */
    char tmp_dir[PATH_MAX];       /* $home/artifacts/tmp */
    char token_path[PATH_MAX];    /* $home/admin.token */
    char database_url[4096];      /* STRATA_DATABASE_URL */
    char bind[256];               /* STRATA_BIND */
    int port;                     /* STRATA_PORT */
    int64_t max_body;             /* STRATA_MAX_BODY */
    int64_t max_upload;           /* STRATA_MAX_UPLOAD */
    int64_t max_result;           /* STRATA_MAX_RESULT: a job's completion body */
    int lease_s;                  /* STRATA_LEASE_S */
    int reaper_interval_s;        /* STRATA_REAPER_INTERVAL_S */
    int retry_base_s;             /* STRATA_RETRY_BASE_S */
    int retry_max_s;              /* STRATA_RETRY_MAX_S */
    int db_pool;                  /* STRATA_DB_POOL */
    char migrations[PATH_MAX];    /* STRATA_MIGRATIONS, resolved to an existing dir */
    int debug;                    /* STRATA_LOG_LEVEL=debug */
} cfg_t;

/* Fills cfg from defaults, then the environment, then the flags in
 * argv[first..argc) that name a setting (--port 8081 or --port=8081). Flags
 * it does not know are left for the subcommand: their indices are not
 * consumed, and *rest receives the arguments it did not use (in order; rest
 * must hold argc entries; *nrest their count). Returns 0, or -1 with err set
 * on a malformed value. */
int cfg_load(cfg_t *cfg, int argc, char **argv, int first, char **rest, int *nrest, char *err,
             size_t errlen);

/* Prints the flags and variables cfg_load understands. */
void cfg_usage(void);

#endif
