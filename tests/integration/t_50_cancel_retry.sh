#!/usr/bin/env bash
# t_50_cancel_retry: cancel of queued and running jobs, retry of a failed job,
# a retryable failure retried with backoff until it succeeds, and depends_on
# (a blocked job runs after its dependency succeeds, fails when it fails).
source "$(dirname "$0")/lib.sh"

it_db_create
it_server_env
start_server
TOKEN=$ADMIN

npy gen "$TD/data/q.x.npy" "$TD/data/q.y.npy" --n 200 --dx 16 --dy 12 --seed 31
Q_REF=$(npy ref "$TD/data/q.x.npy" "$TD/data/q.y.npy")
upload q.x.npy "$TD/data/q.x.npy"
QX=$ART_ID
upload q.y.npy "$TD/data/q.y.npy"
QY=$ART_ID
quick='{"x": {"artifact": '$QX'}, "y": {"artifact": '$QY'}}'
npy gen "$TD/data/m.x.npy" "$TD/data/unused.npy" --n 100 --dx 8 --dy 8 --seed 32
npy gen "$TD/data/unused2.npy" "$TD/data/m.y.npy" --n 90 --dx 8 --dy 8 --seed 33
upload m.x.npy "$TD/data/m.x.npy"
MX=$ART_ID
upload m.y.npy "$TD/data/m.y.npy"
mismatch='{"x": {"artifact": '$MX'}, "y": {"artifact": '$ART_ID'}}'

# ---- no worker yet: cancel of a queued job is immediate
submit '{"kind": "cka", "name": "to-cancel", "spec": '"$quick"'}'
C=$JOB_ID
api_json POST "/api/v1/jobs/$C/cancel" '{}'
expect_status "cancel queued job" 200
expect_eq "cancelled at once" cancelled "$(jbody .state)"
job_get "$C"
expect_eq "GET after cancel" cancelled "$(jbody .state)"
expect_ne "cancelled job has finished_at" null "$(jbody .finished_at)"

# ---- dependencies, set up while nothing can run
submit '{"kind": "cka", "name": "parent", "spec": '"$quick"'}'
P=$JOB_ID
submit '{"kind": "cka", "name": "child", "spec": '"$quick"', "depends_on": ['"$P"']}'
B=$JOB_ID
expect_eq "job with an unfinished dependency is blocked" blocked "$(jbody .state)"
expect_eq "depends_on echoed" "[$P]" "$(jbody -c .depends_on)"
submit '{"kind": "cka", "name": "bad-parent", "spec": '"$mismatch"'}'
F=$JOB_ID
submit '{"kind": "cka", "name": "orphan", "spec": '"$quick"', "depends_on": ['"$F"', '"$P"']}'
O=$JOB_ID
expect_eq "job with two dependencies is blocked" blocked "$(jbody .state)"
# A cancelled dependency fails its dependents too.
submit '{"kind": "cka", "name": "cancelled-parent", "spec": '"$quick"'}'
CP=$JOB_ID
submit '{"kind": "cka", "name": "cancelled-child", "spec": '"$quick"', "depends_on": ['"$CP"']}'
CC=$JOB_ID
api_json POST "/api/v1/jobs/$CP/cancel" '{}'
wait_for_state "$CC" failed 10
expect_match "dependent of a cancelled job: error names the dependency" "$CP" "$(jbody .error)"

# Priority: submitted later but higher, it is claimed first.
submit '{"kind": "cka", "name": "low", "spec": '"$quick"', "priority": -5}'
LOW=$JOB_ID
submit '{"kind": "cka", "name": "high", "spec": '"$quick"', "priority": 10}'
HIGH=$JOB_ID

start_worker w1

wait_for_state "$P" succeeded 60
p_finished=$(jbody .finished_at)
wait_for_state "$B" succeeded 60
expect_near "child cka" "$(jq -r .cka <<<"$Q_REF")" "$(jbody '.result.layers[0].cka')" 1e-6
b_started=$(jbody .started_at)
expect_true "child started ($b_started) after its parent finished ($p_finished)" \
    test "$(date -d "$b_started" +%s.%N)" '>' "$(date -d "$p_finished" +%s.%N)"
wait_for_state "$F" failed 60
wait_for_state "$O" failed 60
expect_match "dependent of a failed job: error names the dependency" "dependenc.*$F|$F.*dependenc" "$(jbody .error)"
expect_eq "dependent of a failed job never ran" null "$(jbody .started_at)"

wait_for_state "$HIGH" succeeded 30
high_started=$(jbody .started_at)
wait_for_state "$LOW" succeeded 30
low_started=$(jbody .started_at)
expect_true "priority 10 ($high_started) started before priority -5 ($low_started)" \
    test "$(date -d "$high_started" +%s.%N)" '<' "$(date -d "$low_started" +%s.%N)"

# ---- non-retryable failure, then POST retry: queued again, fails again
wait_for_state "$F" failed 5
first_error=$(jbody .error)
expect_ne "failed job keeps its error" "" "$first_error"
expect_eq "non-retryable failure used one attempt" 1 "$(jbody .attempt)"
api_json POST "/api/v1/jobs/$F/retry" '{}'
expect_status "retry a failed job" 200
expect_eq "retry: state" queued "$(jbody .state)"
expect_eq "retry: attempt reset" 0 "$(jbody .attempt)"
expect_eq "retry: error cleared" null "$(jbody .error)"
wait_for_state "$F" failed 60
expect_eq "retried job fails again with the same error" "$first_error" "$(jbody .error)"
api_json POST "/api/v1/jobs/$C/retry" '{}'
expect_status "retry a cancelled job" 200
wait_for_state "$C" succeeded 60

# ---- a retryable failure: the input's stored file vanishes, the attempt
# fails (download error), the job is requeued with backoff; once the file is
# back, a later attempt succeeds.
npy gen "$TD/data/r.x.npy" "$TD/data/r.y.npy" --n 150 --dx 12 --dy 10 --seed 34
R_REF=$(npy ref "$TD/data/r.x.npy" "$TD/data/r.y.npy")
upload r.x.npy "$TD/data/r.x.npy"
RX=$ART_ID
rsum=$(jbody .sha256)
upload r.y.npy "$TD/data/r.y.npy"
RY=$ART_ID
stored=$(find "$STRATA_HOME/artifacts" -type f -name "*$rsum*" | head -n 1)
if [[ -z $stored ]]; then
    it_fail "cannot find the stored file of artifact $RX (sha256 $rsum) under $STRATA_HOME/artifacts"
else
    mv "$stored" "$TD/aside"
    submit '{"kind": "cka", "name": "flaky", "spec": {"x": {"artifact": '"$RX"'}, "y": {"artifact": '"$RY"'}}, "max_attempts": 5}'
    R=$JOB_ID
    seen=
    for ((i = 0; i < 150; i++)); do
        job_get "$R"
        st=$(jbody .state)
        if [[ $(jbody .error) != null && $st != failed ]]; then
            seen=$st
            break
        fi
        [[ $st != failed && $st != succeeded ]] || break
        sleep 0.2
    done
    expect_ne "flaky job: a failed attempt is requeued (state was $(jbody .state), error $(jbody .error))" "" "$seen"
    mv "$TD/aside" "$stored"
    if wait_for_state "$R" succeeded 60; then
        expect_near "flaky job cka after retry" "$(jq -r .cka <<<"$R_REF")" "$(jbody '.result.layers[0].cka')" 1e-6
        attempt=$(jbody .attempt)
        expect_true "flaky job needed more than one attempt (attempt $attempt)" test "$attempt" -ge 2
    fi
fi

# ---- cancel of a running job: 202, the worker stops at its next heartbeat.
# The job is sized to run well past a heartbeat even on a fast machine (it is
# never allowed to finish, so it needs no reference value).
slow_pair big 51 7000 1024 noref
submit '{"kind": "cka", "name": "to-stop", "spec": '"$SLOW_SPEC"'}'
S=$JOB_ID
wait_for_state "$S" running 60
api_json POST "/api/v1/jobs/$S/cancel" '{}'
expect_status "cancel a running job" 202
expect_eq "cancel of a running job: still running" running "$(jbody .state)"
t0=$(date +%s)
wait_for_state "$S" cancelled 60
expect_eq "cancelled running job has no result" null "$(jbody .result)"
it_log "running job cancelled after $(($(date +%s) - t0)) s"
expect_true "worker still alive after the cancel" it_alive "${WPID[w1]}"
submit '{"kind": "cka", "name": "after-cancel", "spec": '"$quick"'}'
wait_for_state "$JOB_ID" succeeded 60
expect_near "job after a cancel" "$(jq -r .cka <<<"$Q_REF")" "$(jbody '.result.layers[0].cka')" 1e-6

stop_worker w1
expect_eq "worker exit status after SIGTERM" 0 "$EXIT_CODE"
stop_server
it_done
