#!/usr/bin/env bash
# t_60_crash: nothing accepted is lost when things die. A worker killed with
# SIGKILL mid-job: the job is requeued after its lease and succeeds elsewhere.
# The server restarted (SIGTERM, drain) with jobs queued and running: all end
# succeeded. PostgreSQL restarted with a worker idle and with a job running:
# /readyz goes 503 then 200 with no manual step, later jobs succeed. A worker
# sent SIGTERM mid-job finishes the job and exits 0; sent it twice, it hands
# the job back and another worker runs it.
source "$(dirname "$0")/lib.sh"

it_db_create
it_server_env
start_server
TOKEN=$ADMIN

npy gen "$TD/data/q.x.npy" "$TD/data/q.y.npy" --n 200 --dx 16 --dy 12 --seed 41
Q_REF=$(npy ref "$TD/data/q.x.npy" "$TD/data/q.y.npy")
Q_CKA=$(jq -r .cka <<<"$Q_REF")
upload q.x.npy "$TD/data/q.x.npy"
QX=$ART_ID
upload q.y.npy "$TD/data/q.y.npy"
quick='{"x": {"artifact": '$QX'}, "y": {"artifact": '$ART_ID'}}'
slow_pair big
SLOW_CKA=$(jq -r .cka <<<"$SLOW_REF")

# readyz_becomes CODE TIMEOUT : polls /readyz until it answers CODE.
readyz_becomes() {
    local want=$1 timeout=$2 i code=
    for ((i = 0; i < timeout * 5; i++)); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$URL/readyz")
        [[ $code == "$want" ]] && return 0
        sleep 0.2
    done
    echo "    /readyz answered $code, expected $want" >&2
    return 1
}
# The shared cluster (STRATA_DATABASE_URL would make pg.sh leave it alone).
pg() { STRATA_DATABASE_URL= STRATA_HOME=$IT_TMP "$IT_REPO/deploy/pg.sh" "$@"; }

# ---- SIGKILL of the worker holding a job
start_worker w1
submit '{"kind": "cka", "name": "killed-worker", "spec": '"$SLOW_SPEC"', "max_attempts": 3}'
K=$JOB_ID
wait_for_state "$K" running 60
w_first=$(jbody .worker)
kill -KILL "${WPID[w1]}"
wait_exit "${WPID[w1]}" "${WWRAP[w1]}" 10
unset 'WPID[w1]'
it_log "worker w1 killed holding job $K"
start_worker w2
wait_for_state "$K" succeeded 120
expect_eq "requeued job: attempt" 2 "$(jbody .attempt)"
expect_ne "requeued job ran on the other worker" "$w_first" "$(jbody .worker)"
expect_near "requeued job cka" "$SLOW_CKA" "$(jbody '.result.layers[0].cka')" 1e-6

# ---- server restart with jobs queued and running
jobs_before=$(count_rows jobs)
submit '{"kind": "cka", "name": "restart-running", "spec": '"$SLOW_SPEC"'}'
RUNNING=$JOB_ID
queued=()
for i in 1 2 3; do
    submit '{"kind": "cka", "name": "restart-queued-'$i'", "spec": '"$quick"'}'
    queued+=("$JOB_ID")
done
wait_for_state "$RUNNING" running 60
stop_server
expect_eq "jobs kept across the server restart" $((jobs_before + 4)) "$(count_rows jobs)"
start_server
TOKEN=$ADMIN
wait_for_state "$RUNNING" succeeded 120
expect_near "job running across the restart: cka" "$SLOW_CKA" "$(jbody '.result.layers[0].cka')" 1e-6
for id in "${queued[@]}"; do
    wait_for_state "$id" succeeded 60
    expect_near "job queued across the restart: cka" "$Q_CKA" "$(jbody '.result.layers[0].cka')" 1e-6
done

# ---- database restart while the worker is idle
pg stop
expect_true "/readyz is 503 while PostgreSQL is down" readyz_becomes 503 15
TOKEN=$ADMIN api GET /api/v1/jobs
expect_problem "a request while the database is down" 503
TOKEN= api GET /healthz
expect_status "healthz while the database is down" 200
pg start
expect_true "/readyz is 200 again after PostgreSQL is back" readyz_becomes 200 30
submit '{"kind": "cka", "name": "after-db-restart", "spec": '"$quick"'}'
wait_for_state "$JOB_ID" succeeded 60
expect_near "job after the database restart: cka" "$Q_CKA" "$(jbody '.result.layers[0].cka')" 1e-6

# ---- database restart while a job runs
submit '{"kind": "cka", "name": "db-restart-running", "spec": '"$SLOW_SPEC"'}'
D=$JOB_ID
wait_for_state "$D" running 60
pg stop
expect_true "/readyz is 503 during the second outage" readyz_becomes 503 15
sleep 2
pg start
expect_true "/readyz is 200 after the second outage" readyz_becomes 200 30
wait_for_state "$D" succeeded 120
expect_near "job running across the database restart: cka" "$SLOW_CKA" "$(jbody '.result.layers[0].cka')" 1e-6
submit '{"kind": "cka", "name": "after-second-db-restart", "spec": '"$quick"'}'
wait_for_state "$JOB_ID" succeeded 60

# ---- SIGTERM of a worker mid-job: it finishes the job, then exits 0
submit '{"kind": "cka", "name": "drained", "spec": '"$SLOW_SPEC"'}'
G=$JOB_ID
wait_for_state "$G" running 60
kill -TERM "${WPID[w2]}"
wait_exit "${WPID[w2]}" "${WWRAP[w2]}" 120
expect_eq "worker exit status after SIGTERM mid-job" 0 "$EXIT_CODE"
unset 'WPID[w2]'
job_get "$G"
expect_eq "job finished by the draining worker" succeeded "$(jbody .state)"
expect_eq "drained job: one attempt" 1 "$(jbody .attempt)"
expect_near "drained job cka" "$SLOW_CKA" "$(jbody '.result.layers[0].cka')" 1e-6

# ---- a second SIGTERM: the worker cancels its job, hands it back (release,
# no attempt counted) and exits 0; another worker then runs it.
start_worker w3
submit '{"kind": "cka", "name": "released", "spec": '"$SLOW_SPEC"'}'
H=$JOB_ID
wait_for_state "$H" running 60
kill -TERM "${WPID[w3]}"
sleep 0.5
kill -TERM "${WPID[w3]}"
wait_exit "${WPID[w3]}" "${WWRAP[w3]}" 60
expect_eq "worker exit status after a second SIGTERM" 0 "$EXIT_CODE"
unset 'WPID[w3]'
job_get "$H"
expect_eq "released job is queued again" queued "$(jbody .state)"
start_worker w4
wait_for_state "$H" succeeded 120
expect_eq "released job: the hand-back did not count as an attempt" 1 "$(jbody .attempt)"
expect_near "released job cka" "$SLOW_CKA" "$(jbody '.result.layers[0].cka')" 1e-6

stop_server
it_done
