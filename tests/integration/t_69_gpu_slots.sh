#!/usr/bin/env bash
# t_69_gpu_slots: one job per GPU on a worker with several GPUs. A real
# worker whose GPUs are emulated (strata-worker-emu, STRATA_EMU_DEVICES=2)
# registers two GPUs and runs two gpus:1 predict jobs at once, one on GPU 0
# and one on GPU 1, while a third waits for a GPU to come free; a gpus:2 job
# reserves both GPUs and runs alone (a gpus:0 job submitted meanwhile starts
# only after it), and a gpus:2 job handed out while a gpus:0 job holds a
# GPU waits for it. The same binary with no GPU (STRATA_EMU_DEVICES=0) runs
# one job at a time on the CPU, as before. With a job on each GPU, a SIGTERM
# lets both finish; a second one hands both back to the queue.
source "$(dirname "$0")/lib.sh"

EMU=${IT_BUILD:-$IT_REPO/build}/strata-worker-emu
[[ -x $EMU ]] || it_abort "$EMU is missing (make integration builds it)"
cp "$EMU" "$IT_BIN/strata-worker-emu"
[[ $(id -u) -ne 0 ]] || chown strata:strata "$IT_BIN/strata-worker-emu"

FIX=$IT_REPO/tests/reference/fixtures/chat

# start_emu_worker NAME DEVICES : a strata-worker-emu with DEVICES emulated GPUs.
start_emu_worker() {
    local name=$1
    worker_token
    export STRATA_EMU_DEVICES=$2
    spawn "$TD/logs/worker-$name.log" "$IT_BIN/strata-worker-emu" --server "$URL" \
        --token "@$TD/worker.token" --name "$name" --heartbeat 1 --wait 2
    unset STRATA_EMU_DEVICES
    WPID[$name]=$SPAWN_PID
    WWRAP[$name]=$SPAWN_WRAP
}

# seconds ISO_TIME : the time as seconds since the epoch (fractions kept).
seconds() {
    "$PY" -c 'import sys, datetime
t = sys.argv[1].replace("Z", "+00:00")
print("%.6f" % datetime.datetime.fromisoformat(t).timestamp())' "$1"
}

# times JOB : sets START and END (seconds) from the job's started_at/finished_at.
times() {
    TOKEN=$ADMIN job_get "$1"
    START=$(seconds "$(jbody .started_at)")
    END=$(seconds "$(jbody .finished_at)")
}

# before A B : A <= B (seconds with fractions)
before() {
    "$PY" -c 'import sys; sys.exit(0 if float(sys.argv[1]) <= float(sys.argv[2]) else 1)' "$1" "$2"
}

# job_log JOB : the job's log text in LOG.
job_log() {
    TOKEN=$ADMIN api GET "/api/v1/jobs/$1/logs"
    LOG=$BODY
}

it_db_create
it_server_env
start_server
TOKEN=$ADMIN

# The tiny reference model on a path the workers read, and enough one-row
# batches that each job runs for a second or more on the emulated GPU.
mkdir -p "$TD/data/chat"
cp "$FIX"/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json} "$TD/data/chat/"
"$PY" - "$TD/data/prompts.json" "$TD/data/long.json" <<'EOF'
import json, sys
for path, n in (sys.argv[1], 100), (sys.argv[2], 300):
    rows = [{"instruction": "The model reads the text layer by layer, sentence %d." % i,
             "input": "one layer at a time", "output": "ok"} for i in range(n)]
    json.dump(rows, open(path, "w"))
EOF
[[ $(id -u) -ne 0 ]] || chown -R strata:strata "$TD/data"
api_json POST /api/v1/models '{"name": "chat", "path": "'"$TD/data/chat"'"}'
expect_status "register the model" 201
model=$(jbody .id)
api_json POST /api/v1/datasets \
    '{"name": "prompts", "format": "alpaca", "path": "'"$TD/data/prompts.json"'"}'
expect_status "register the dataset" 201
dataset=$(jbody .id)
api_json POST /api/v1/datasets \
    '{"name": "long", "format": "alpaca", "path": "'"$TD/data/long.json"'"}'
expect_status "register the longer dataset" 201
long=$(jbody .id)

# predict GPUS [PRIORITY [DATASET]] : submits a predict job asking for GPUS
# GPUs; JOB_ID.
predict() {
    submit '{"kind": "predict", "priority": '"${2:-0}"', "resources": {"gpus": '"$1"'},
             "spec": {"model": {"model": '"$model"'}, "dataset": {"dataset": '"${3:-$dataset}"'},
                      "template": "vanilla", "pool": "last_token", "dtype": "float32",
                      "precision": "fp32", "batch_size": 1}}'
    [[ -n $JOB_ID ]] || it_abort "predict job not accepted: $BODY"
}

# ---- two emulated GPUs: registration
start_emu_worker two 2
log2=$TD/logs/worker-two.log
for ((i = 0; i < 100; i++)); do
    n=$(sql "$IT_DB" "SELECT jsonb_array_length(gpus) FROM workers WHERE name = 'two'")
    [[ -n $n ]] && break
    sleep 0.1
done
expect_eq "the worker registers 2 GPUs" 2 "$n"
# gpu_field FIELD : that field of each GPU the worker "two" registered, as JSON.
gpu_field() {
    sql "$IT_DB" "SELECT jsonb_path_query_array(gpus, '\$[*].$1')::text FROM workers
                  WHERE name = 'two'"
}
expect_eq "each with its name" '["strata CUDA emulator", "strata CUDA emulator"]' \
    "$(gpu_field name)"
expect_eq "and its index" '[0, 1]' "$(gpu_field index)"
expect_eq "and its memory" '[8.0, 8.0]' "$(gpu_field memory_gb)"
expect_eq "one startup line about its GPUs" 1 \
    "$(grep -cE 'GPU 0: strata CUDA emulator.*; GPU 1: ' "$log2")"

# ---- three gpus:1 jobs: two at once on different GPUs, the third after
predict 1
j1=$JOB_ID
predict 1
j2=$JOB_ID
predict 1
j3=$JOB_ID
for j in "$j1" "$j2" "$j3"; do
    wait_for_state "$j" succeeded 60 || it_abort "predict job $j did not succeed"
done
declare -A S E G
for j in "$j1" "$j2" "$j3"; do
    times "$j"
    S[$j]=$START
    E[$j]=$END
    job_log "$j"
    G[$j]=$(grep -oE 'running on GPU [0-9]+' <<<"$LOG" | grep -oE '[0-9]+$')
    [[ $(grep -c 'running on GPU' <<<"$LOG") == 1 ]] || it_log "job $j's log: $LOG"
    expect_match "job $j ran on an emulated GPU in fp32" \
        'running on GPU [01] \(strata CUDA emulator\) in fp32' "$LOG"
done
# order by start
order=$(for j in "$j1" "$j2" "$j3"; do echo "${S[$j]} $j"; done | sort -n | awk '{print $2}')
read -r a b c <<<"$(echo $order)"
for j in "$a" "$b" "$c"; do it_log "job $j: ${S[$j]} .. ${E[$j]} on GPU ${G[$j]}"; done
expect_true "the first two ran at the same time" before "${S[$b]}" "${E[$a]}"
expect_ne "on different GPUs" "${G[$a]}" "${G[$b]}"
first_end=${E[$a]}
before "${E[$b]}" "$first_end" && first_end=${E[$b]}
expect_true "the third started only once one of them had finished" before "$first_end" "${S[$c]}"
expect_match "the third ran on a GPU" '^[01]$' "${G[$c]}"

# ---- a gpus:2 job reserves both GPUs and runs alone
predict 2 5
big=$JOB_ID
wait_for_state "$big" running 30
predict 0
small=$JOB_ID
wait_for_state "$big" succeeded 60
wait_for_state "$small" succeeded 60
job_log "$big"
expect_match "the gpus:2 job reserved both GPUs and computes on one" \
    'job asked for 2 GPUs: reserved GPUs (0,1|1,0); the engine runs on GPU [01]' "$LOG"
times "$big"
big_end=$END
times "$small"
expect_true "a gpus:0 job submitted meanwhile started only after it" before "$big_end" "$START"
job_log "$small"
expect_match "and then ran on its slot's GPU" 'running on GPU [01] ' "$LOG"

# ---- a gpus:2 job handed out while a gpus:0 job holds one of the GPUs
# (the server counts only the gpus of running jobs) waits for it
predict 0 0 "$long"
hold=$JOB_ID
wait_for_state "$hold" running 30
predict 2
both=$JOB_ID
wait_for_state "$both" running 30
wait_for_state "$hold" succeeded 60
wait_for_state "$both" succeeded 60
job_log "$hold"
expect_match "the gpus:0 job ran on its slot's GPU" 'running on GPU [01] ' "$LOG"
job_log "$both"
expect_match "the gpus:2 job waited for the GPU the gpus:0 job held" \
    'waiting for 2 free GPUs \(1 free now' "$LOG"
expect_match "then reserved both" 'reserved GPUs (0,1|1,0); the engine runs on GPU [01]' "$LOG"
stop_worker two
expect_eq "the 2-GPU worker exits 0 on SIGTERM" 0 "$EXIT_CODE"
expect_eq "it said it runs a job per GPU" 1 \
    "$(grep -c 'running up to 2 jobs at once, one per GPU' "$log2")"

# ---- no GPU: one job at a time on the CPU, as before
start_emu_worker none 0
predict 0
c1=$JOB_ID
predict 0
c2=$JOB_ID
wait_for_state "$c1" succeeded 60
wait_for_state "$c2" succeeded 60
times "$c1"
s1=$START e1=$END
times "$c2"
s2=$START e2=$END
if before "$s1" "$s2"; then
    expect_true "without GPUs the second job starts after the first ends" before "$e1" "$s2"
else
    expect_true "without GPUs the second job starts after the first ends" before "$e2" "$s1"
fi
job_log "$c1"
expect_match "it ran on the CPU" 'running on the CPU' "$LOG"
expect_eq "registered with no GPUs" "[]" \
    "$(sql "$IT_DB" "SELECT gpus::text FROM workers WHERE name = 'none'")"
expect_true "it says it has no GPU" \
    grep -qE 'no GPU: .+; jobs run on the CPU' "$TD/logs/worker-none.log"
stop_worker none
expect_eq "the CPU worker exits 0 on SIGTERM" 0 "$EXIT_CODE"

# ---- shutdown with a job on each GPU: the first SIGTERM lets both finish
start_emu_worker again 2
predict 1 0 "$long"
f1=$JOB_ID
predict 1 0 "$long"
f2=$JOB_ID
wait_for_state "$f1" running 30
wait_for_state "$f2" running 30
stop_worker again
expect_eq "SIGTERM: the worker exits 0" 0 "$EXIT_CODE"
for j in "$f1" "$f2"; do
    TOKEN=$ADMIN job_get "$j"
    expect_eq "SIGTERM: job $j finished first" succeeded "$(jbody .state)"
done

# ---- a second SIGTERM cancels both and hands them back
start_emu_worker last 2
predict 1 0 "$long"
r1=$JOB_ID
predict 1 0 "$long"
r2=$JOB_ID
wait_for_state "$r1" running 30
wait_for_state "$r2" running 30
kill -TERM "${WPID[last]}"
# Two signals sent at once may arrive as one: the second goes once the first
# has been seen by both jobs.
for ((i = 0; i < 100; i++)); do
    (($(grep -c 'shutdown requested: finishing job' "$TD/logs/worker-last.log") == 2)) && break
    sleep 0.1
done
stop_worker last
expect_eq "second SIGTERM: the worker exits 0" 0 "$EXIT_CODE"
for j in "$r1" "$r2"; do
    TOKEN=$ADMIN job_get "$j"
    expect_eq "second SIGTERM: job $j handed back" "queued 0" "$(jbody '"\(.state) \(.attempt)"')"
done

it_done
