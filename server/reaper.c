/* reaper.c - see reaper.h. */
#include "reaper.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "common/log.h"
#include "common/util.h"

struct reaper {
    srv_t *srv;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool stop;
};

/* One pass; database trouble is logged and retried at the next interval. */
static void reaper_pass(reaper *r) {
    char err[ERR_LEN];
    PGconn *db = db_acquire(r->srv->pool, err, sizeof err);
    if (!db) {
        log_debug("reaper: %s", err);
        return;
    }
    bool requeued = false;
    int moved = job_reap(db, &requeued, err, sizeof err);
    db_release(r->srv->pool, db);
    if (moved < 0) log_warn("reaper: %s", err);
    if (requeued) notify_wake_all(r->srv->hub);
}

static void *reaper_main(void *arg) {
    reaper *r = arg;
    pthread_mutex_lock(&r->lock);
    while (!r->stop) {
        pthread_mutex_unlock(&r->lock);
        reaper_pass(r);
        pthread_mutex_lock(&r->lock);
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += r->srv->cfg->reaper_interval_s;
        while (!r->stop && pthread_cond_timedwait(&r->cond, &r->lock, &until) != ETIMEDOUT) {
        }
    }
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

reaper *reaper_start(srv_t *srv) {
    reaper *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->srv = srv;
    pthread_mutex_init(&r->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cond, &attr);
    pthread_condattr_destroy(&attr);
    if (pthread_create(&r->thread, NULL, reaper_main, r) != 0) {
        pthread_cond_destroy(&r->cond);
        pthread_mutex_destroy(&r->lock);
        free(r);
        return NULL;
    }
    return r;
}

void reaper_stop(reaper *r) {
    if (!r) return;
    pthread_mutex_lock(&r->lock);
    r->stop = true;
    pthread_cond_signal(&r->cond);
    pthread_mutex_unlock(&r->lock);
    pthread_join(r->thread, NULL);
    pthread_cond_destroy(&r->cond);
    pthread_mutex_destroy(&r->lock);
    free(r);
}
