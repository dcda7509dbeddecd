#!/usr/bin/env bash
# t_66_worker_identity: a worker token speaks only for the workers it
# registered. Another worker token can neither claim for them nor act on the
# jobs they hold (403), and nothing changes; the owner's calls still work.
source "$(dirname "$0")/lib.sh"

it_db_create
it_server_env
start_server
npy gen "$TD/data/i.x.npy" "$TD/data/i.y.npy" --n 40 --dx 5 --dy 4 --seed 66 || it_abort "gen"
upload i.x.npy "$TD/data/i.x.npy"
x=$ART_ID
upload i.y.npy "$TD/data/i.y.npy"
submit '{"kind": "cka", "spec": {"x": {"artifact": '$x'}, "y": {"artifact": '$ART_ID'}}}'
job=$JOB_ID

TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "node-a", "role": "worker"}'
A=$(jbody .token)
TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "node-b", "role": "worker"}'
B=$(jbody .token)

TOKEN=$A api_json POST /api/v1/workers '{"name": "a1", "hostname": "a", "gpus": [], "queues": ["default"]}'
expect_status "register a1" 201
wa=$(jbody .id)

TOKEN=$B api POST "/api/v1/workers/$wa/claim?wait=0"
expect_problem "claim for another user's worker" 403
job_get "$job"
expect_eq "job still queued after the refused claim" queued "$(jbody .state)"

TOKEN=$A api POST "/api/v1/workers/$wa/claim?wait=0"
expect_status "owner claims" 200
expect_eq "claimed the job" "$job" "$(jbody .id)"

TOKEN=$B api POST "/api/v1/jobs/$job/heartbeat" -H 'Content-Type: application/json' -H "Strata-Worker: $wa" --data-binary '{}'
expect_problem "heartbeat for another user's worker" 403
TOKEN=$B api POST "/api/v1/jobs/$job/complete" -H 'Content-Type: application/json' -H "Strata-Worker: $wa" --data-binary '{"result": {"cka": 1}}'
expect_problem "complete for another user's worker" 403
job_get "$job"
expect_eq "job still running after the refused complete" running "$(jbody .state)"
expect_eq "no result stored" null "$(jbody .result)"

TOKEN=$A api POST "/api/v1/jobs/$job/heartbeat" -H 'Content-Type: application/json' -H "Strata-Worker: $wa" --data-binary '{"progress": {"step": 1, "total": 2}}'
expect_status "owner heartbeat" 200
expect_eq "not cancelled" false "$(jbody .cancel_requested)"
TOKEN=$A api POST "/api/v1/jobs/$job/heartbeat" -H 'Content-Type: application/json' -H "Strata-Worker: 999999" --data-binary '{}'
expect_problem "heartbeat as an unknown worker" 409

# A long train job's result (every step's loss) is larger than STRATA_MAX_BODY
# (1 MiB here): the completion body has its own limit, STRATA_MAX_RESULT.
"$PY" -c 'import json; print(json.dumps({"result": {"losses": [1.0 + i / 1e6 for i in range(150000)]}}))' \
    >"$TD/big_result.json"
expect_true "the result is over 1 MiB" test "$(stat -c %s "$TD/big_result.json")" -gt 1048576
TOKEN=$A api POST "/api/v1/jobs/$job/complete" -H 'Content-Type: application/json' \
    -H "Strata-Worker: $wa" --data-binary "@$TD/big_result.json"
expect_status "complete with a 2 MB result" 200
job_get "$job"
expect_eq "job succeeded" succeeded "$(jbody .state)"
expect_eq "every loss stored" 150000 "$(jbody '.result.losses | length')"
# Other JSON bodies keep the small limit.
TOKEN=$ADMIN api POST /api/v1/jobs -H 'Content-Type: application/json' --data-binary "@$TD/big_result.json"
expect_problem "a 2 MB job submission" 413

it_done
