/* main.c - strata-server: `serve` (the default), `migrate` and
 * `token create --user NAME --role ROLE`. All read the same configuration
 * (see config.h); none runs as root. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "server/api.h"
#include "server/auth.h"
#include "server/config.h"
#include "server/db.h"
#include "server/http.h"
#include "server/migrate.h"
#include "server/notify.h"
#include "server/reaper.h"
#include "server/server.h"

#define MAIN_DB_WAIT_S 30
#define MAIN_DRAIN_S 30

static void main_usage(void) {
    fprintf(stderr, "usage: strata-server [serve] [flags]\n"
                    "       strata-server migrate [flags]\n"
                    "       strata-server token create --user NAME --role admin|user|worker "
                    "[flags]\n");
    cfg_usage();
}

/* Connects (waiting for the database) and applies pending migrations. Returns
 * the connection (caller PQfinish()es it) or NULL with err. */
static PGconn *main_connect_migrate(const cfg_t *cfg, int report, char *err, size_t errlen) {
    PGconn *conn = db_connect_retry(cfg->database_url, MAIN_DB_WAIT_S, err, errlen);
    if (!conn) return NULL;
    int applied = migrate_apply(conn, cfg->migrations, report, err, errlen);
    if (applied < 0) {
        PQfinish(conn);
        return NULL;
    }
    if (report && applied == 0) printf("no pending migrations\n");
    return conn;
}

static int main_migrate(const cfg_t *cfg) {
    char err[ERR_LEN];
    PGconn *conn = main_connect_migrate(cfg, 1, err, sizeof err);
    if (!conn) {
        log_error("%s", err);
        return 1;
    }
    PQfinish(conn);
    return 0;
}

static int main_token(const cfg_t *cfg, int argc, char **argv) {
    const char *user = NULL, *role_text = NULL;
    if (argc < 2 || strcmp(argv[1], "create") != 0) {
        main_usage();
        return 2;
    }
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--user") == 0 && i + 1 < argc)
            user = argv[++i];
        else if (strncmp(argv[i], "--user=", 7) == 0)
            user = argv[i] + 7;
        else if (strcmp(argv[i], "--role") == 0 && i + 1 < argc)
            role_text = argv[++i];
        else if (strncmp(argv[i], "--role=", 7) == 0)
            role_text = argv[i] + 7;
        else {
            fprintf(stderr, "strata-server token create: unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    enum auth_role role;
    if (!user || !auth_valid_user_name(user)) {
        fprintf(stderr, "strata-server token create: --user NAME is required "
                        "(1-64 of A-Z a-z 0-9 . _ -)\n");
        return 2;
    }
    if (!role_text || auth_role_parse(role_text, &role) != 0) {
        fprintf(stderr, "strata-server token create: --role must be admin, user or worker\n");
        return 2;
    }
    char err[ERR_LEN];
    PGconn *conn = main_connect_migrate(cfg, 0, err, sizeof err);
    if (!conn) {
        log_error("%s", err);
        return 1;
    }
    char token[AUTH_TOKEN_LEN];
    int conflict = 0;
    int rc = auth_token_create(conn, user, role, token, &conflict, err, sizeof err);
    PQfinish(conn);
    if (rc != 0) {
        log_error("%s", err);
        return 1;
    }
    printf("%s\n", token);
    return 0;
}

/* Waits until requests in flight are done, or MAIN_DRAIN_S seconds pass. */
static void main_drain(srv_t *srv) {
    double deadline = util_now_seconds() + MAIN_DRAIN_S;
    while (atomic_load(&srv->in_flight) > 0 && util_now_seconds() < deadline) usleep(20000);
    int left = atomic_load(&srv->in_flight);
    if (left > 0) log_warn("stopping with %d request(s) still in flight", left);
}

static int main_serve(const cfg_t *cfg) {
    char err[ERR_LEN];
    int rc = 1;
    srv_t srv = {.cfg = cfg,
                 .policy = {.lease_s = cfg->lease_s,
                            .retry_base_s = cfg->retry_base_s,
                            .retry_max_s = cfg->retry_max_s}};
    atomic_init(&srv.in_flight, 0);
    atomic_init(&srv.stopping, false);
    struct MHD_Daemon *daemon = NULL;
    reaper *reap = NULL;

    if (util_mkdirs(cfg->tmp_dir, 0755, err, sizeof err) != 0) {
        log_error("%s", err);
        return 1;
    }
    PGconn *conn = main_connect_migrate(cfg, 0, err, sizeof err);
    if (!conn) {
        log_error("%s", err);
        return 1;
    }
    int boot = auth_bootstrap(conn, cfg->token_path, err, sizeof err);
    PQfinish(conn);
    if (boot != 0) {
        log_error("bootstrap: %s", err);
        return 1;
    }

    /* Signals are taken by sigwait below; every thread inherits the mask. */
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
    signal(SIGPIPE, SIG_IGN);

    srv.pool = db_pool_new(cfg->database_url, cfg->db_pool);
    srv.hub = srv.pool ? notify_start(cfg->database_url, srv.pool) : NULL;
    if (!srv.pool || !srv.hub) {
        log_error("cannot start: out of memory or threads");
        goto out;
    }
    reap = reaper_start(&srv);
    if (!reap) {
        log_error("cannot start the reaper thread");
        goto out;
    }
    daemon = http_start(&srv, api_routes, api_nroutes, err, sizeof err);
    if (!daemon) {
        log_error("%s", err);
        goto out;
    }
    log_info("listening on http://%s:%d", cfg->bind, cfg->port);

    int sig = 0;
    sigwait(&stop_signals, &sig);
    log_info("received %s; stopping", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    atomic_store(&srv.stopping, true);
    MHD_socket listen_fd = MHD_quiesce_daemon(daemon);
    if (listen_fd != MHD_INVALID_SOCKET) close(listen_fd);
    notify_shutdown(srv.hub);
    main_drain(&srv);
    rc = 0;
out:
    if (daemon) MHD_stop_daemon(daemon);
    reaper_stop(reap);
    notify_stop(srv.hub);
    db_pool_free(srv.pool);
    if (rc == 0) log_info("stopped");
    return rc;
}

int main(int argc, char **argv) {
    log_init("server");
    if (argc > 1 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        main_usage();
        return 0;
    }
    if (getuid() == 0 || geteuid() == 0) {
        fprintf(stderr, "strata-server: refusing to run as root; run it as an unprivileged "
                        "user (e.g. runuser -u strata -- strata-server ...)\n");
        return 1;
    }
    int first = 1;
    const char *command = "serve";
    if (argc > 1 && argv[1][0] != '-') {
        command = argv[1];
        first = 2;
    }
    char **rest = calloc((size_t)argc + 1, sizeof *rest);
    if (!rest) return 1;
    int nrest = 0;
    char err[ERR_LEN];
    cfg_t *cfg = calloc(1, sizeof *cfg);
    int rc = 2;
    if (!cfg) goto out;
    rest[nrest++] = (char *)command;
    int more = 0;
    if (cfg_load(cfg, argc, argv, first, rest + 1, &more, err, sizeof err) != 0) {
        fprintf(stderr, "strata-server: %s\n", err);
        goto out;
    }
    nrest += more;
    if (cfg->debug) log_set_level(LOG_DEBUG);

    if (strcmp(command, "serve") == 0) {
        if (nrest > 1) {
            fprintf(stderr, "strata-server serve: unknown argument %s\n", rest[1]);
            main_usage();
            goto out;
        }
        rc = main_serve(cfg);
    } else if (strcmp(command, "migrate") == 0) {
        if (nrest > 1) {
            fprintf(stderr, "strata-server migrate: unknown argument %s\n", rest[1]);
            goto out;
        }
        rc = main_migrate(cfg);
    } else if (strcmp(command, "token") == 0) {
        rc = main_token(cfg, nrest, rest);
    } else {
        fprintf(stderr, "strata-server: unknown command %s\n", command);
        main_usage();
    }
out:
    free(cfg);
    free(rest);
    return rc;
}
