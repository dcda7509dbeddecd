/* notify.c - see notify.h. */
#include "notify.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"

static const char NOTIFY_SQL_LISTEN[] = "LISTEN " NOTIFY_CHANNEL;

struct notify_hub {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    unsigned long generation; /* bumped on every wake */
    bool shutting_down;
    bool stop_listener;
    pthread_t thread;
    char *conninfo;
    db_pool *pool;
};

void notify_wake_all(notify_hub *hub) {
    pthread_mutex_lock(&hub->lock);
    hub->generation++;
    pthread_cond_broadcast(&hub->cond);
    pthread_mutex_unlock(&hub->lock);
}

static bool notify_should_stop(notify_hub *hub) {
    pthread_mutex_lock(&hub->lock);
    bool stop = hub->stop_listener;
    pthread_mutex_unlock(&hub->lock);
    return stop;
}

/* Connects and LISTENs. Returns the connection or NULL. */
static PGconn *notify_connect(notify_hub *hub) {
    PGconn *conn = db_connect(hub->conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        PQfinish(conn);
        return NULL;
    }
    PGresult *res = PQexec(conn, NOTIFY_SQL_LISTEN);
    bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    PQclear(res);
    if (!ok) {
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

/* The listener: waits on its socket (half a second at a time, to notice a
 * stop request), turning every notification into a wake-up. When the
 * connection drops it tells the pool and reconnects once a second. */
static void *notify_main(void *arg) {
    notify_hub *hub = arg;
    PGconn *conn = NULL;
    bool warned = false;
    while (!notify_should_stop(hub)) {
        if (!conn) {
            conn = notify_connect(hub);
            if (!conn) {
                if (!warned) log_warn("listener: database unavailable; retrying");
                warned = true;
                sleep(1);
                continue;
            }
            if (warned) log_info("listener: reconnected to the database");
            warned = false;
            /* Work may have been queued while we were away. */
            notify_wake_all(hub);
        }
        struct pollfd pfd = {.fd = PQsocket(conn), .events = POLLIN};
        int r = poll(&pfd, 1, 500);
        if (r < 0 && errno != EINTR) r = 1;
        if (r <= 0) continue;
        if (!PQconsumeInput(conn) || PQstatus(conn) != CONNECTION_OK) {
            log_warn("listener: lost the database connection");
            PQfinish(conn);
            conn = NULL;
            db_pool_mark_suspect(hub->pool);
            warned = true;
            continue;
        }
        bool any = false;
        PGnotify *n;
        while ((n = PQnotifies(conn)) != NULL) {
            any = true;
            PQfreemem(n);
        }
        if (any) notify_wake_all(hub);
    }
    if (conn) PQfinish(conn);
    return NULL;
}

notify_hub *notify_start(const char *conninfo, db_pool *pool) {
    notify_hub *hub = calloc(1, sizeof *hub);
    if (!hub) return NULL;
    hub->conninfo = strdup(conninfo);
    if (!hub->conninfo) {
        free(hub);
        return NULL;
    }
    hub->pool = pool;
    pthread_mutex_init(&hub->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&hub->cond, &attr);
    pthread_condattr_destroy(&attr);
    if (pthread_create(&hub->thread, NULL, notify_main, hub) != 0) {
        pthread_cond_destroy(&hub->cond);
        pthread_mutex_destroy(&hub->lock);
        free(hub->conninfo);
        free(hub);
        return NULL;
    }
    return hub;
}

void notify_stop(notify_hub *hub) {
    if (!hub) return;
    pthread_mutex_lock(&hub->lock);
    hub->stop_listener = true;
    hub->shutting_down = true;
    pthread_cond_broadcast(&hub->cond);
    pthread_mutex_unlock(&hub->lock);
    pthread_join(hub->thread, NULL);
    pthread_cond_destroy(&hub->cond);
    pthread_mutex_destroy(&hub->lock);
    free(hub->conninfo);
    free(hub);
}

void notify_shutdown(notify_hub *hub) {
    pthread_mutex_lock(&hub->lock);
    hub->shutting_down = true;
    pthread_cond_broadcast(&hub->cond);
    pthread_mutex_unlock(&hub->lock);
}

bool notify_wait(notify_hub *hub, int timeout_ms) {
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&hub->lock);
    unsigned long seen = hub->generation;
    while (!hub->shutting_down && hub->generation == seen) {
        if (pthread_cond_timedwait(&hub->cond, &hub->lock, &deadline) == ETIMEDOUT) break;
    }
    bool alive = !hub->shutting_down;
    pthread_mutex_unlock(&hub->lock);
    return alive;
}
