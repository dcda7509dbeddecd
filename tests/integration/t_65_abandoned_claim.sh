#!/usr/bin/env bash
# t_65_abandoned_claim: a worker that leaves while long-polling is never handed
# a job. The server notices the closed connection before claiming, so a job
# submitted right after the worker stopped stays queued (attempt 0) for the
# next worker instead of waiting out a lease on a worker that is gone.
source "$(dirname "$0")/lib.sh"

it_db_create
it_server_env
start_server
npy gen "$TD/data/a.x.npy" "$TD/data/a.y.npy" --n 60 --dx 6 --dy 5 --seed 65 || it_abort "gen"
upload a.x.npy "$TD/data/a.x.npy"
x=$ART_ID
upload a.y.npy "$TD/data/a.y.npy"
spec='{"kind": "cka", "spec": {"x": {"artifact": '$x'}, "y": {"artifact": '$ART_ID'}}}'

for round in 1 2 3; do
    # A long poll of 20 s that the worker abandons on SIGTERM.
    start_worker "idle$round" --wait 20
    sleep 1.5
    stop_worker "idle$round"
    expect_eq "idle worker $round exits 0 on SIGTERM" 0 "$EXIT_CODE"
    submit "$spec"
    id=$JOB_ID
    sleep 2.5
    job_get "$id"
    expect_eq "round $round: job not handed to the worker that left" queued "$(jbody .state)"
    expect_eq "round $round: no attempt counted" 0 "$(jbody .attempt)"
done

start_worker live
for id in $(TOKEN=$ADMIN api GET '/api/v1/jobs?state=queued' >/dev/null; jbody '.items[].id'); do
    wait_for_state "$id" succeeded 30
    job_get "$id"
    expect_eq "job $id ran once" 1 "$(jbody .attempt)"
done

it_done
