/* local.h - `strata-worker run`: one job on this machine, no server.
 *
 *   strata-worker run --kind cka --spec JSON [--out DIR]
 *   strata-worker run --kind cka --spec @spec.json --out results/
 *
 * Inputs are {"path": "x.npy"} (relative to the current directory) or, for
 * per-layer inputs, {"path": "dir"} holding hidden_states_{layer}.npy files.
 * The result JSON is printed on stdout as one compact line; progress and log
 * lines go to stderr; artifacts are moved or copied into DIR. SIGINT cancels
 * the running job. */
#ifndef STRATA_LOCAL_H
#define STRATA_LOCAL_H

/* argv[0] is "run". Returns the process exit status: 0 success, 2 bad
 * arguments, spec or input, 1 any other failure. */
int local_main(int argc, char **argv);

#endif
