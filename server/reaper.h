/* reaper.h - the thread that requeues (or fails, or cancels) running jobs
 * whose lease lapsed, every STRATA_REAPER_INTERVAL_S seconds, so a dead
 * worker's job runs again within about a lease and an interval. */
#ifndef STRATA_REAPER_H
#define STRATA_REAPER_H

#include "server/server.h"

typedef struct reaper reaper;

/* Starts the thread. NULL when it cannot be started. */
reaper *reaper_start(srv_t *srv);
/* Stops it (waking it from its sleep) and frees it. NULL is fine. */
void reaper_stop(reaper *r);

#endif
