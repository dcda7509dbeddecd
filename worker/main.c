/* main.c - strata-worker: `strata-worker run ...` runs one job locally;
 * otherwise the agent that serves a strata server.
 *
 * Exit status: 0 after a clean shutdown, 1 on a fatal runtime error (e.g. the
 * server refused the token), 2 on bad arguments. */
#include <curl/curl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "worker/agent.h"
#include "worker/engine/blas.h"
#include "worker/local.h"

static void main_usage(FILE *out) {
    fprintf(out,
            "usage: strata-worker --server URL --token T [options]\n"
            "       strata-worker run ...        (one job locally; see strata-worker run --help)\n"
            "\n"
            "Serves a strata server: registers, claims jobs, runs them, reports results:\n"
            "one job at a time, or one per GPU on a worker with several GPUs.\n"
            "\n"
            "  --server URL        server base URL (env STRATA_URL), e.g. http://127.0.0.1:8080\n"
            "  --token T           API token, or @FILE to read it from FILE (env STRATA_TOKEN)\n"
            "  --name NAME         worker name shown by the server (default: the hostname)\n"
            "  --queues Q1,Q2      queues to take jobs from (default: default)\n"
            "  --heartbeat SECONDS heartbeat period while a job runs (default 10)\n"
            "  --wait SECONDS      claim long-poll, 1..60 (default 30)\n"
            "  --work-dir DIR      scratch space for jobs (default $TMPDIR/strata-worker-PID)\n"
            "  --once              exit after one job (one at a time, whatever the GPUs)\n"
            "  --help              this text\n"
            "\n"
            "SIGTERM/SIGINT: stop claiming, finish and report the running jobs, exit 0.\n"
            "A second SIGTERM/SIGINT: cancel the running jobs, hand them back, exit 0.\n");
}

static void main_on_signal(int signo) {
    (void)signo;
    agent_signal();
}

/* Resolves a token argument: "@path" reads the token from a file (trailing
 * whitespace dropped). Returns 0 with *out malloc'd (caller frees), or -1
 * with err set. */
static int main_load_token(const char *arg, char **out, char *err, size_t errlen) {
    if (arg[0] != '@') {
        *out = strdup(arg);
        return *out ? 0 : err_set(err, errlen, "out of memory");
    }
    char *data = NULL;
    size_t len = 0;
    if (util_read_file(arg + 1, 4096, &data, &len, err, errlen) != 0) return -1;
    while (len > 0 && (data[len - 1] == '\n' || data[len - 1] == '\r' || data[len - 1] == ' ' ||
                       data[len - 1] == '\t'))
        data[--len] = '\0';
    if (len == 0) {
        free(data);
        return err_set(err, errlen, "token file %s is empty", arg + 1);
    }
    *out = data;
    return 0;
}

/* Parses a whole-number option value in [min, max]. Returns 0, or -1 after
 * printing a message. */
static int main_parse_seconds(const char *opt, const char *value, int64_t min, int64_t max,
                              int *out) {
    int64_t v;
    if (util_parse_i64(value, min, max, &v) != 0) {
        fprintf(stderr, "strata-worker: --%s must be a whole number of seconds in %lld..%lld, "
                        "not \"%s\"\n", opt, (long long)min, (long long)max, value);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int main_agent(int argc, char **argv) {
    enum { OPT_SERVER = 1, OPT_TOKEN, OPT_NAME, OPT_QUEUES, OPT_HEARTBEAT, OPT_WAIT, OPT_WORKDIR,
           OPT_ONCE, OPT_HELP };
    static const struct option options[] = {
        {"server", required_argument, NULL, OPT_SERVER},
        {"token", required_argument, NULL, OPT_TOKEN},
        {"name", required_argument, NULL, OPT_NAME},
        {"queues", required_argument, NULL, OPT_QUEUES},
        {"heartbeat", required_argument, NULL, OPT_HEARTBEAT},
        {"wait", required_argument, NULL, OPT_WAIT},
        {"work-dir", required_argument, NULL, OPT_WORKDIR},
        {"once", no_argument, NULL, OPT_ONCE},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    agent_config cfg = {.heartbeat_s = 10, .wait_s = 30};
    const char *server = getenv("STRATA_URL"), *token_arg = getenv("STRATA_TOKEN");
    char work_dir[PATH_MAX], err[ERR_LEN];
    char *token = NULL;
    int rc = 2;
    work_dir[0] = '\0';

    opterr = 0;
    int opt;
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case OPT_SERVER: server = optarg; break;
        case OPT_TOKEN: token_arg = optarg; break;
        case OPT_NAME: cfg.name = optarg; break;
        case OPT_QUEUES: cfg.queues = optarg; break;
        case OPT_HEARTBEAT:
            if (main_parse_seconds("heartbeat", optarg, 1, 3600, &cfg.heartbeat_s) != 0) goto out;
            break;
        case OPT_WAIT:
            if (main_parse_seconds("wait", optarg, 1, 60, &cfg.wait_s) != 0) goto out;
            break;
        case OPT_WORKDIR:
            if (snprintf(work_dir, sizeof work_dir, "%s", optarg) >= (int)sizeof work_dir) {
                fprintf(stderr, "strata-worker: --work-dir is too long\n");
                goto out;
            }
            break;
        case OPT_ONCE: cfg.once = true; break;
        case OPT_HELP:
            main_usage(stdout);
            rc = 0;
            goto out;
        default:
            if (optopt)
                fprintf(stderr, "strata-worker: option needs a value or is unknown: %s\n",
                        argv[optind - 1]);
            else
                fprintf(stderr, "strata-worker: unknown option %s\n", argv[optind - 1]);
            fprintf(stderr, "try: strata-worker --help\n");
            goto out;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "strata-worker: unexpected argument \"%s\" (try --help)\n", argv[optind]);
        goto out;
    }
    if (!server || !*server) {
        fprintf(stderr, "strata-worker: no server: give --server URL or set STRATA_URL\n");
        goto out;
    }
    if (!token_arg || !*token_arg) {
        fprintf(stderr, "strata-worker: no token: give --token T (or @FILE) or set "
                        "STRATA_TOKEN\n");
        goto out;
    }
    if (main_load_token(token_arg, &token, err, sizeof err) != 0) {
        fprintf(stderr, "strata-worker: %s\n", err);
        goto out;
    }
    if (!work_dir[0]) {
        const char *tmp = getenv("TMPDIR");
        snprintf(work_dir, sizeof work_dir, "%s/strata-worker-%ld", tmp && *tmp ? tmp : "/tmp",
                 (long)getpid());
        cfg.remove_work_dir = true;
    }
    cfg.server_url = server;
    cfg.token = token;
    cfg.work_dir = work_dir;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = main_on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "strata-worker: curl_global_init failed\n");
        rc = 1;
        goto out;
    }
    if (agent_run(&cfg, err, sizeof err) != 0) {
        log_error("%s", err);
        rc = 1;
    } else {
        rc = 0;
    }
    curl_global_cleanup();
out:
    free(token);
    return rc;
}

int main(int argc, char **argv) {
    /* First: it may re-execute the process to pick OpenBLAS's kernels. */
    blas_setup(argc, argv);
    log_init("worker");
    if (argc > 1 && strcmp(argv[1], "run") == 0) return local_main(argc - 1, argv + 1);
    if (argc > 1 && strcmp(argv[1], "--help") == 0) {
        main_usage(stdout);
        return 0;
    }
    return main_agent(argc, argv);
}
