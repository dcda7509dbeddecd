/* agent.h - the strata-worker daemon: registers with a server, long-polls for
 * jobs, runs each through runner_run with callbacks that fetch inputs and
 * upload outputs over HTTP, heartbeats from a second thread, and reports the
 * outcome.
 *
 * Survival rules: a server or database outage (connection refused, 503) is
 * waited out with capped backoff, never given up; a lost lease (409) drops
 * the job silently; a cancel request stops the engine through ctx->cancel.
 *
 * GPUs: one job slot per GPU (one slot without GPUs or with --once), each
 * claiming and running jobs on its own thread; GPUs are assigned from the
 * worker's pool (agent.c says how).
 *
 * Shutdown: the first SIGTERM/SIGINT (agent_signal) stops claiming and lets
 * the running jobs finish and be reported; a second one cancels the running
 * jobs and hands them back to the queue (POST .../release). */
#ifndef STRATA_AGENT_H
#define STRATA_AGENT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

typedef struct {
    const char *server_url; /* http(s)://host:port */
    const char *token;      /* worker (or admin) API token */
    const char *name;       /* shown in the server's worker list; NULL: the hostname */
    const char *queues;     /* comma-separated queue names; NULL: ["default"] */
    int heartbeat_s;        /* seconds between heartbeats while a job runs (>= 1) */
    int wait_s;             /* claim long-poll, 1..60 seconds */
    const char *work_dir;   /* parent of the per-job scratch directories */
    bool remove_work_dir;   /* remove work_dir itself at exit (it was made for us) */
    bool once;              /* exit after one job (one slot, whatever the GPUs) */
} agent_config;

/* Records a SIGTERM/SIGINT. Async-signal-safe: call it from the handler. */
void agent_signal(void);

/* Runs the agent until shutdown. Returns 0 after a clean shutdown (signals or
 * --once), -1 with err set on a fatal error (bad token, rejected
 * registration, unusable work directory). */
int agent_run(const agent_config *cfg, char *err, size_t errlen);

/* Parses a comma-separated queue list ("a,b") into a JSON array of strings
 * (caller owns). Empty names and names other than [A-Za-z0-9_.-]{1,64} are
 * rejected. Returns 0, or -1 with err set. */
int agent_parse_queues(const char *list, json_t **out, char *err, size_t errlen);

#endif
