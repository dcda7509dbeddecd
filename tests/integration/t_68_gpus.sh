#!/usr/bin/env bash
# t_68_gpus: the scheduler's GPU rule, claimed over HTTP as the workers.
# A job with resources.gpus = N goes only to a worker with N free GPUs: the
# GPUs it registered minus those of the jobs it runs now. A job asking for
# none goes to any worker, a busy GPU worker included. A real strata-worker
# on this machine (no GPU, or STRATA_GPUS=none) says so in one log line,
# registers "gpus": [] and is never handed a GPU job.
source "$(dirname "$0")/lib.sh"

it_db_create
it_server_env
start_server
npy gen "$TD/data/g.x.npy" "$TD/data/g.y.npy" --n 40 --dx 5 --dy 4 --seed 68 || it_abort "gen"
upload g.x.npy "$TD/data/g.x.npy"
x=$ART_ID
upload g.y.npy "$TD/data/g.y.npy"
y=$ART_ID
cka='"kind": "cka", "spec": {"x": {"artifact": '$x'}, "y": {"artifact": '$y'}}'

TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "gpu-node", "role": "worker"}'
W=$(jbody .token)
[[ $W == st_* ]] || it_abort "no worker token: $BODY"

# register NAME GPUS_JSON : sets WID.
register() {
    TOKEN=$W api_json POST /api/v1/workers \
        '{"name": "'"$1"'", "hostname": "h", "gpus": '"$2"', "queues": ["default"]}'
    expect_status "register $1" 201
    WID=$(jbody .id)
}

# claim WID : one claim without waiting; sets CLAIMED (the job id, or "none").
claim() {
    TOKEN=$W api POST "/api/v1/workers/$1/claim?wait=0"
    if [[ $STATUS == 200 ]]; then
        CLAIMED=$(jbody .id)
    elif [[ $STATUS == 204 ]]; then
        CLAIMED=none
    else
        CLAIMED="error $STATUS"
    fi
}

# complete JOB WID
complete() {
    TOKEN=$W api POST "/api/v1/jobs/$1/complete" -H 'Content-Type: application/json' \
        -H "Strata-Worker: $2" --data-binary '{"result": {"layers": []}}'
    expect_status "complete job $1" 200
}

# The GPU jobs have the highest priority, so a worker that could take them
# would be handed them first.
submit '{'"$cka"', "priority": 5, "resources": {"gpus": 1}}'
g1=$JOB_ID

register cpu-only '[]'
w0=$WID
claim "$w0"
expect_eq "a worker without GPUs is not handed a gpus:1 job" none "$CLAIMED"
job_get "$g1"
expect_eq "the gpus:1 job stays queued" queued "$(jbody .state)"
expect_eq "no attempt counted" 0 "$(jbody .attempt)"

register one-gpu '[{"index": 0, "name": "NVIDIA H200", "memory_gb": 139.8}]'
w1=$WID
expect_eq "registration keeps the GPU's name" "NVIDIA H200" "$(jbody '.gpus[0].name')"
claim "$w1"
expect_eq "the 1-GPU worker gets the gpus:1 job" "$g1" "$CLAIMED"

submit '{'"$cka"', "priority": 5, "resources": {"gpus": 1}}'
g2=$JOB_ID
submit '{'"$cka"', "priority": 0, "resources": {"gpus": 0}}'
c1=$JOB_ID
claim "$w1"
expect_eq "its GPU busy, the worker gets the CPU job, not the second GPU job" "$c1" "$CLAIMED"
claim "$w1"
expect_eq "still busy: nothing more for it" none "$CLAIMED"
claim "$w0"
expect_eq "the CPU worker never gets the gpus:1 job" none "$CLAIMED"
job_get "$g2"
expect_eq "the second GPU job waits" queued "$(jbody .state)"

# The CPU job ending frees no GPU; the GPU job ending does.
complete "$c1" "$w1"
claim "$w1"
expect_eq "a finished CPU job frees no GPU" none "$CLAIMED"
complete "$g1" "$w1"
claim "$w1"
expect_eq "its GPU free again, the worker gets the second GPU job" "$g2" "$CLAIMED"

# Two GPUs: a gpus:2 job needs both free; two gpus:1 jobs share them.
submit '{'"$cka"', "priority": 5, "resources": {"gpus": 2}}'
g3=$JOB_ID
claim "$w1"
expect_eq "a 1-GPU worker never gets a gpus:2 job" none "$CLAIMED"
register two-gpus '[{"index": 0, "name": "A", "memory_gb": 80}, {"index": 1, "name": "B", "memory_gb": 80}]'
w2=$WID
submit '{'"$cka"', "priority": 9, "resources": {"gpus": 1}}'
g4=$JOB_ID
claim "$w2"
expect_eq "the 2-GPU worker takes the higher-priority gpus:1 job" "$g4" "$CLAIMED"
claim "$w2"
expect_eq "one GPU left: not the gpus:2 job" none "$CLAIMED"
submit '{'"$cka"', "priority": 1, "resources": {"gpus": 1}}'
g5=$JOB_ID
claim "$w2"
expect_eq "one GPU left: a gpus:1 job" "$g5" "$CLAIMED"
complete "$g4" "$w2"
claim "$w2"
expect_eq "one of two GPUs free: still not the gpus:2 job" none "$CLAIMED"
complete "$g5" "$w2"
claim "$w2"
expect_eq "both GPUs free: the gpus:2 job" "$g3" "$CLAIMED"
complete "$g3" "$w2"
complete "$g2" "$w1"

# A real worker on this machine: one startup line about its GPUs, and the
# registration carries what it found (nothing, with STRATA_GPUS=none).
submit '{'"$cka"', "priority": 5, "resources": {"gpus": 1}}'
g6=$JOB_ID
submit '{'"$cka"'}'
c2=$JOB_ID
export STRATA_GPUS=none
start_worker real
unset STRATA_GPUS
wait_for_state "$c2" succeeded 60
log=$TD/logs/worker-real.log
expect_eq "one line about GPUs" 1 "$(grep -cE 'no GPU: |GPU [0-9]+: ' "$log")"
expect_true "it says why there is none and that jobs run on the CPU" \
    grep -qE 'no GPU: .+; jobs run on the CPU' "$log"
expect_eq "registered with no GPUs" "[]" "$(sql "$IT_DB" "SELECT gpus::text FROM workers WHERE name = 'real'")"
job_get "$g6"
expect_eq "the real CPU worker leaves the gpus:1 job queued" queued "$(jbody .state)"
stop_worker real
expect_eq "worker exits 0" 0 "$EXIT_CODE"

it_done
