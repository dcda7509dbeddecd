/* server.h - the state one running strata-server shares between its HTTP
 * threads, the reaper and the listener. Filled by main before the daemon
 * starts; the pointers stay valid until after it stops. */
#ifndef STRATA_SERVER_H
#define STRATA_SERVER_H

#include <stdatomic.h>
#include <stdbool.h>

#include "server/config.h"
#include "server/db.h"
#include "server/job.h"
#include "server/notify.h"

typedef struct {
    const cfg_t *cfg;
    db_pool *pool;
    notify_hub *hub;
    job_policy policy;
    atomic_int in_flight;  /* requests between their first call and completion */
    atomic_bool stopping;  /* shutdown has begun */
} srv_t;

#endif
