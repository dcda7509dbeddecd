#!/usr/bin/env bash
# t_30_bad_requests: each kind of bad request gets the right status and an RFC
# 9457 problem naming the field at fault, and changes nothing (job and
# artifact counts stay the same); the server keeps answering afterwards.
source "$(dirname "$0")/lib.sh"

it_db_create
export STRATA_MAX_BODY=4096
export STRATA_MAX_UPLOAD=100000
it_server_env
start_server

TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "alice", "role": "user"}'
ALICE=$(jbody .token)
TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "bob", "role": "user"}'
BOB=$(jbody .token)
TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "w1", "role": "worker"}'
W1=$(jbody .token)
[[ $ALICE == st_* && $BOB == st_* && $W1 == st_* ]] || it_abort "cannot create tokens"

npy gen "$TD/data/x.npy" "$TD/data/y.npy" --n 30 --dx 4 --dy 4 --seed 7
TOKEN=$ALICE upload x.npy "$TD/data/x.npy"
X=$ART_ID
TOKEN=$ALICE upload y.npy "$TD/data/y.npy"
Y=$ART_ID
good_spec='{"x": {"artifact": '$X'}, "y": {"artifact": '$Y'}}'
TOKEN=$ALICE submit '{"kind": "cka", "spec": '"$good_spec"'}'
ALICE_JOB=$JOB_ID
TOKEN=$ALICE submit '{"kind": "cka", "spec": '"$good_spec"'}'
DONE_JOB=$JOB_ID
TOKEN=$ALICE api_json POST "/api/v1/jobs/$DONE_JOB/cancel" '{}'
expect_eq "setup: cancel a queued job" cancelled "$(jbody .state)"

jobs0=$(count_rows jobs)
arts0=$(count_rows artifacts)
expect_eq "setup: jobs" 2 "$jobs0"
expect_eq "setup: artifacts" 2 "$arts0"

# bad_job WHAT BODY CODE [FIELD] : POST /api/v1/jobs as alice.
bad_job() {
    TOKEN=$ALICE api_json POST /api/v1/jobs "$2"
    expect_problem "$1" "$3" "${4:-}"
}

# ---- 400: bodies and fields
bad_job "malformed JSON" '{"kind": "cka", "spec": ' 400
bad_job "not an object" '[1, 2]' 400
bad_job "unknown kind" '{"kind": "teleport", "spec": {}}' 400 kind
bad_job "missing kind" '{"spec": '"$good_spec"'}' 400 kind
bad_job "priority of the wrong type" '{"kind": "cka", "spec": '"$good_spec"', "priority": "high"}' 400 priority
bad_job "priority out of range" '{"kind": "cka", "spec": '"$good_spec"', "priority": 5000}' 400 priority
bad_job "max_attempts 0" '{"kind": "cka", "spec": '"$good_spec"', "max_attempts": 0}' 400 max_attempts
bad_job "missing spec.x" '{"kind": "cka", "spec": {"y": {"artifact": '$Y'}}}' 400 spec.x
bad_job "unknown spec field" '{"kind": "cka", "spec": {"x": {"artifact": '$X'}, "y": {"artifact": '$Y'}, "bogus": 1}}' 400 spec.bogus
bad_job "bad kernel" '{"kind": "cka", "spec": {"x": {"artifact": '$X'}, "y": {"artifact": '$Y'}, "kernel": "cubic"}}' 400 spec.kernel
bad_job "debiased not a boolean" '{"kind": "cka", "spec": {"x": {"artifact": '$X'}, "y": {"artifact": '$Y'}, "debiased": "yes"}}' 400 spec.debiased
bad_job "unknown artifact in spec" '{"kind": "cka", "spec": {"x": {"artifact": 999999}, "y": {"artifact": '$Y'}}}' 400 spec.x.artifact
bad_job "local path refused by the server" '{"kind": "cka", "spec": {"x": {"path": "/etc/passwd"}, "y": {"artifact": '$Y'}}}' 400 spec.x.path
bad_job "unknown top-level field" '{"kind": "cka", "spec": '"$good_spec"', "colour": "red"}' 400 colour
bad_job "depends_on an unknown job" '{"kind": "cka", "spec": '"$good_spec"', "depends_on": [999999]}' 400 'depends_on[0]'
bad_job "gpus out of range" '{"kind": "cka", "spec": '"$good_spec"', "resources": {"gpus": 1000}}' 400

# ---- 413: body over STRATA_MAX_BODY
big=$(head -c 8000 /dev/zero | tr '\0' 'a')
TOKEN=$ALICE api_json POST /api/v1/jobs '{"kind": "cka", "name": "'"$big"'", "spec": '"$good_spec"'}'
expect_problem "body over the limit" 413

# ---- 413: upload over STRATA_MAX_UPLOAD; the temp file goes away
head -c 300000 /dev/urandom >"$TD/data/big.bin"
TOKEN=$ALICE api POST "/api/v1/artifacts?name=big.bin" -H 'Content-Type: application/octet-stream' \
    --data-binary "@$TD/data/big.bin"
expect_problem "upload over the limit" 413
TOKEN=$ALICE api POST "/api/v1/artifacts?name=big.bin" -H 'Content-Type: application/octet-stream' \
    -H 'Transfer-Encoding: chunked' --data-binary "@$TD/data/big.bin"
expect_problem "chunked upload over the limit" 413

# ---- worker protocol misuse
TOKEN=$W1 api_json POST /api/v1/workers '{"name": "probe", "hostname": "h", "gpus": [], "queues": []}'
expect_status "register a worker" 201
WID=$(jbody .id)
TOKEN=$W1 api POST "/api/v1/workers/$WID/claim?wait=100"
expect_problem "claim with wait over 60" 400 wait
TOKEN=$W1 api POST "/api/v1/workers/999999/claim?wait=0"
expect_problem "claim as an unknown worker" 404
TOKEN=$W1 api_json POST "/api/v1/jobs/$ALICE_JOB/heartbeat" '{}' -H "Strata-Worker: $WID"
expect_problem "heartbeat on a job this worker does not hold" 409
TOKEN=$W1 api_json POST "/api/v1/jobs/$ALICE_JOB/complete" '{"result": {"cka": 1}}' -H "Strata-Worker: $WID"
expect_problem "complete a job this worker does not hold" 409
TOKEN=$W1 api_json POST "/api/v1/jobs/$DONE_JOB/fail" '{"error": "x", "retryable": false}' -H "Strata-Worker: $WID"
expect_problem "fail a finished job" 409
TOKEN=$ALICE api_json POST "/api/v1/jobs/$ALICE_JOB/complete" '{"result": {}}' -H "Strata-Worker: $WID"
expect_problem "a user token on the worker protocol" 403
TOKEN=$ALICE api DELETE "/api/v1/jobs/$ALICE_JOB"
expect_problem "a method the route does not have" 405

# ---- 401: no token, bad token
TOKEN= api_json POST /api/v1/jobs '{"kind": "cka", "spec": '"$good_spec"'}'
expect_problem "no token" 401
TOKEN=st_0000000000000000000000000000000000000000000000000000000000000000 api GET /api/v1/jobs
expect_problem "bad token" 401
TOKEN=garbage api_json POST /api/v1/jobs '{"kind": "cka", "spec": '"$good_spec"'}'
expect_problem "malformed token" 401

# ---- 403: another user's job, worker submitting a job
TOKEN=$BOB api_json POST "/api/v1/jobs/$ALICE_JOB/cancel" '{}'
expect_problem "cancel another user's job" 403
TOKEN=$BOB api_json POST "/api/v1/jobs/$DONE_JOB/retry" '{}'
expect_problem "retry another user's job" 403
TOKEN=$W1 api_json POST /api/v1/jobs '{"kind": "cka", "spec": '"$good_spec"'}'
expect_problem "worker token submitting a job" 403
TOKEN=$ALICE api_json POST /api/v1/workers '{"name": "fake", "hostname": "h", "gpus": [], "queues": []}'
expect_problem "user token registering a worker" 403

# ---- 400 on "name": bad artifact names
bad_name() {
    TOKEN=$ALICE api POST "/api/v1/artifacts?name=$2" -H 'Content-Type: application/octet-stream' \
        --data-binary "@$TD/data/x.npy"
    expect_problem "$1" 400 name
}
bad_name "artifact name with a slash" 'a%2Fb.npy'
bad_name "artifact name .." '..'
bad_name "artifact name with a control character" 'x%01y.npy'
bad_name "empty artifact name" ''
TOKEN=$ALICE api POST "/api/v1/artifacts" -H 'Content-Type: application/octet-stream' --data-binary "@$TD/data/x.npy"
expect_problem "artifact without a name" 400 name
printf 'not an npy file' >"$TD/data/fake.npy"
TOKEN=$ALICE api POST "/api/v1/artifacts?name=fake.npy" -H 'Content-Type: application/octet-stream' \
    --data-binary "@$TD/data/fake.npy"
expect_problem "a .npy name with content that is not npy" 400

# ---- 404: unknown ids and routes
TOKEN=$ALICE api GET /api/v1/jobs/999999
expect_problem "unknown job" 404
TOKEN=$ALICE api GET /api/v1/artifacts/999999
expect_problem "unknown artifact" 404
TOKEN=$ALICE api GET /api/v1/artifacts/999999/content
expect_problem "unknown artifact content" 404
TOKEN=$ALICE api_json POST /api/v1/jobs/999999/cancel '{}'
expect_problem "cancel an unknown job" 404
TOKEN=$ALICE api GET /api/v1/nothing-here
expect_problem "unknown route" 404

# ---- 400 on "limit" / "cursor": bad pagination
for q in 'limit=0' 'limit=501' 'limit=x' 'limit=-1' 'limit=10abc' 'limit=%2010' 'limit=+10'; do
    TOKEN=$ALICE api GET "/api/v1/jobs?$q"
    expect_problem "list with $q" 400 limit
done
TOKEN=$ALICE api GET "/api/v1/jobs?cursor=garbage%21%21"
expect_problem "list with a garbage cursor" 400 cursor
TOKEN=$ALICE api GET "/api/v1/jobs?state=sleeping"
expect_problem "list with an unknown state" 400 state
TOKEN=$ALICE api GET "/api/v1/jobs?kind=bogus"
expect_problem "list with an unknown kind" 400 kind

# ---- 409: state conflicts
TOKEN=$ALICE api_json POST "/api/v1/jobs/$DONE_JOB/cancel" '{}'
expect_problem "cancel a finished job" 409
TOKEN=$ALICE api_json POST "/api/v1/jobs/$ALICE_JOB/retry" '{}'
expect_problem "retry a queued job" 409

# ---- nothing changed, and the server still answers
expect_eq "jobs unchanged by bad requests" "$jobs0" "$(count_rows jobs)"
expect_eq "artifacts unchanged by bad requests" "$arts0" "$(count_rows artifacts)"
TOKEN=$ALICE job_get "$ALICE_JOB"
expect_eq "alice's job still queued" queued "$(jbody .state)"
expect_eq "no temp upload left behind" 0 "$(find "$STRATA_HOME/artifacts/tmp" -type f 2>/dev/null | wc -l)"
TOKEN= api GET /healthz
expect_status "healthz after the bad requests" 200
TOKEN=$ALICE api GET /api/v1/jobs
expect_status "list after the bad requests" 200

stop_server
it_done
