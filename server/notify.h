/* notify.h - wakes long-polling claims as soon as there is work.
 *
 * A dedicated listener thread holds its own database connection and LISTENs
 * on NOTIFY_CHANNEL; statements that queue a job NOTIFY it (delivered when
 * their transaction commits). Waiting claims sleep on a condition variable
 * with a short timeout, so they still poll if a notification is missed (a
 * database restart, another server's NOTIFY lost with the connection). */
#ifndef STRATA_NOTIFY_H
#define STRATA_NOTIFY_H

#include <stdbool.h>

#include "server/db.h"

#define NOTIFY_CHANNEL "strata_jobs"

typedef struct notify_hub notify_hub;

/* Starts the listener thread on its own connection to conninfo; pool is told
 * when that connection drops (the database restarted). NULL on failure. */
notify_hub *notify_start(const char *conninfo, db_pool *pool);
/* Stops the listener and frees the hub (no waiter may remain). */
void notify_stop(notify_hub *hub);

/* Sleeps until a notification, shutdown, or timeout_ms. Returns false once
 * shutdown has begun (the caller should answer at once). */
bool notify_wait(notify_hub *hub, int timeout_ms);
/* Wakes every waiter (a job was queued by this process). */
void notify_wake_all(notify_hub *hub);
/* Begins shutdown: every waiter returns at once, now and later. */
void notify_shutdown(notify_hub *hub);

#endif
