#!/usr/bin/env bash
# t_90_train: train jobs through the server. The reference "chat" model
# (tests/reference/fixtures/chat) is registered by uploaded files and
# tests/fixtures/predict/dataset.json uploaded as an alpaca dataset.
# - A full and a LoRA train job (8 steps, save_steps 2) succeed: 8 losses in
#   the result, equal (1e-9) to the "loss" series of GET /metrics, the
#   outputs and checkpoints 2, 4, 6, 8 as artifacts, progress 8/8.
# - Crash: one worker runs a long LoRA job (5000 steps, save_steps 250; the result with every loss, lr and grad norm of 20000 steps would pass the server's 1 MiB body limit);
#   once a checkpoint artifact exists the worker is killed with SIGKILL and
#   another started: the job is requeued after its lease, resumes
#   (result.resumed_from > 0, "resumed from checkpoint" in its log) and ends
#   with the final loss of an uninterrupted local run of the same spec
#   (strata-worker run, path references) within 1e-5 relative.
# - A predict job naming the LoRA train job as its adapter succeeds.
# - A predict job naming the full train job as its model ({"job": ID})
#   succeeds; its hidden states (float32) differ from the base model's at
#   some layer by more than 1e-4 and equal, within 1e-6, a local
#   `strata-worker run --kind predict` on the job's downloaded config.json,
#   model.safetensors and tokenizer files. Naming the LoRA train job as a
#   model is a 400 on spec.model.job that says to name it as "adapter".
source "$(dirname "$0")/lib.sh"

FIX=$IT_REPO/tests/reference/fixtures/chat
DATA=$IT_REPO/tests/fixtures/predict/dataset.json

it_db_create
it_server_env
start_server
start_worker w1
TOKEN=$ADMIN

files='{}'
for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do
    upload "$f" "$FIX/$f"
    [[ -n $ART_ID ]] || it_abort "cannot upload $f"
    files=$(jq -c --arg n "$f" --argjson id "$ART_ID" '. + {($n): $id}' <<<"$files")
done
api_json POST /api/v1/models '{"name": "chat", "files": '"$files"'}'
expect_status "register the model" 201
m=$(jbody .id)
upload dataset.json "$DATA"
api_json POST /api/v1/datasets '{"name": "six", "format": "alpaca", "artifact": '"$ART_ID"'}'
expect_status "register the dataset" 201
d=$(jbody .id)

# train_spec METHOD STEPS SAVE_STEPS : a train spec over the registered model and dataset.
train_spec() {
    printf '{"base_model": {"model": %s}, "dataset": {"dataset": %s}, "template": "vanilla", "method": "%s", "learning_rate": 0.001, "lr_scheduler": "cosine", "batch_size": 2, "max_steps": %s, "save_steps": %s, "seed": 5}' \
        "$m" "$d" "$1" "$2" "$3"
}

# ---- a full and a LoRA train job
submit '{"kind": "train", "spec": '"$(train_spec full 8 2)"'}'
tf=$JOB_ID
expect_eq "a train job is accepted" queued "$(jbody .state)"
submit '{"kind": "train", "spec": '"$(train_spec lora 8 2)"'}'
tl=$JOB_ID
[[ -n $tf && -n $tl ]] || it_abort "train jobs not accepted"
for t in "$tf" "$tl"; do
    wait_for_state "$t" succeeded 180 || it_abort "train job $t did not succeed"
    expect_eq "job $t: 8 losses" 8 "$(jbody '.result.losses | length')"
    expect_eq "job $t: progress" "8/8" "$(jbody '"\(.progress.step)/\(.progress.total)"')"
    expect_eq "job $t: not resumed" 0 "$(jbody .result.resumed_from)"
    losses=$(jbody -c .result.losses)
    api GET "/api/v1/jobs/$t/metrics"
    expect_status "job $t: metrics" 200
    expect_eq "job $t: loss series steps 1..8" "[1,2,3,4,5,6,7,8]" "$(jbody -c '[.series.loss[][0]]')"
    expect_eq "job $t: loss series equals the result's losses (1e-9)" true \
        "$(jbody --argjson l "$losses" '[.series.loss[][1]] as $s | [range(8)] | all(($s[.] - $l[.]) | fabs < 1e-9 * (1 + ($l[.] | fabs)))')"
    expect_eq "job $t: learning_rate and grad_norm series" "8 8" \
        "$(jbody '"\(.series.learning_rate | length) \(.series.grad_norm | length)"')"
    api GET "/api/v1/jobs/$t/artifacts?limit=500"
    names=$(jbody '.items[].name' | sort | tr '\n' ' ')
    for s in 2 4 6 8; do
        expect_match "job $t: checkpoint $s" "checkpoint-$s-optimizer.bin .*checkpoint-$s-trainer_state.json" "$names"
    done
done
api GET "/api/v1/jobs/$tf/artifacts?limit=500"
expect_match "full: config.json and model.safetensors" "config.json.*model.safetensors" \
    "$(jbody '.items[].name' | sort | tr '\n' ' ')"
api GET "/api/v1/jobs/$tl/artifacts?limit=500"
expect_match "lora: adapter_config.json and adapter_model.safetensors" \
    "adapter_config.json adapter_model.safetensors" "$(jbody '.items[].name' | sort | tr '\n' ' ')"

# ---- crash: SIGKILL after a checkpoint, resumed on another worker
LONG=5000
submit '{"kind": "train", "name": "killed-train", "max_attempts": 3, "spec": '"$(train_spec lora $LONG 250)"'}'
K=$JOB_ID
wait_for_state "$K" running 60 || it_abort "long train job did not start"
ck=
for ((i = 0; i < 600; i++)); do
    api GET "/api/v1/jobs/$K/artifacts?limit=500"
    ck=$(jbody '[.items[].name | select(test("^checkpoint-[0-9]+-trainer_state.json$"))] | first // empty')
    [[ -n $ck ]] && break
    sleep 0.1
done
[[ -n $ck ]] || it_abort "no checkpoint of job $K appeared"
kill -KILL "${WPID[w1]}"
wait_exit "${WPID[w1]}" "${WWRAP[w1]}" 10
unset 'WPID[w1]'
job_get "$K"
expect_eq "killed before the end" running "$(jbody .state)"
it_log "worker w1 killed holding job $K after $ck"
start_worker w2
wait_for_state "$K" succeeded 240 || it_abort "the killed train job did not succeed"
expect_eq "requeued train job: attempt" 2 "$(jbody .attempt)"
resumed=$(jbody .result.resumed_from)
expect_eq "the retried job resumed from a checkpoint" true "$([[ $resumed -gt 0 ]] && echo true || echo false)"
expect_eq "all losses in the result" "$LONG" "$(jbody '.result.losses | length')"
final=$(jbody .result.final_loss)
api GET "/api/v1/jobs/$K/logs"
expect_match "its log says it resumed" "resumed from checkpoint step $resumed" "$BODY"

local_spec=$(train_spec lora $LONG 0 | jq -c --arg m "$FIX" --arg d "$DATA" \
    '.base_model = {path: $m} | .dataset = {path: $d} | del(.save_steps)')
ref=$("$IT_BIN/strata-worker" run --kind train --spec "$local_spec" --out "$TD/local-train" 2>/dev/null \
    | jq .final_loss)
[[ -n $ref ]] || it_abort "the uninterrupted local run failed"
expect_near "resumed final loss equals an uninterrupted run (1e-5)" "$ref" "$final" 1e-5

# ---- predict with the LoRA train job as adapter
submit '{"kind": "predict", "spec": {"model": {"model": '"$m"'}, "dataset": {"dataset": '"$d"'}, "template": "vanilla", "adapter": {"job": '"$tl"'}}}'
p=$JOB_ID
wait_for_state "$p" succeeded 120
expect_eq "predict with a train job's adapter" succeeded "$(jbody .state)"

# ---- predict with the full train job as model
# fetch JOB DIR NAME... : downloads the job's artifacts of those names into DIR.
fetch() {
    local job=$1 dir=$2 id name
    shift 2
    mkdir -p "$dir"
    api GET "/api/v1/jobs/$job/artifacts?limit=500"
    for name in "$@"; do
        id=$(jbody --arg n "$name" '[.items[] | select(.name == $n) | .id] | max // empty')
        [[ -n $id ]] || continue
        curl -sS -H "Authorization: Bearer $TOKEN" -o "$dir/$name" \
            "$URL/api/v1/artifacts/$id/content" || it_fail "download $name of job $job"
    done
}
# maxdiff A B : the number of hidden_states_*.npy files of A (all also in B)
# and the largest absolute difference between the two over all of them.
maxdiff() {
    "$PY" - "$1" "$2" <<'PYEOF'
import glob, os, sys
import numpy as np
a, b = sys.argv[1], sys.argv[2]
names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(a, "hidden_states_*.npy")))
worst = 0.0
for n in names:
    x = np.load(os.path.join(a, n)).astype(np.float64)
    y = np.load(os.path.join(b, n)).astype(np.float64)
    if x.shape != y.shape:
        print(len(names), "inf")
        sys.exit(0)
    worst = max(worst, float(np.max(np.abs(x - y))))
print(len(names), worst)
PYEOF
}
pspec() {
    printf '{"model": %s, "dataset": {"dataset": %s}, "template": "vanilla", "dtype": "float32"}' \
        "$1" "$d"
}
submit '{"kind": "predict", "spec": '"$(pspec '{"job": '"$tf"'}')"'}'
pf=$JOB_ID
submit '{"kind": "predict", "spec": '"$(pspec '{"model": '"$m"'}')"'}'
pb=$JOB_ID
[[ -n $pf && -n $pb ]] || it_abort "predict jobs over the trained and base models not accepted"
wait_for_state "$pf" succeeded 120
expect_eq "predict with a full train job as model" succeeded "$(jbody .state)"
wait_for_state "$pb" succeeded 120
expect_eq "predict with the base model" succeeded "$(jbody .state)"
hs=$(for ((l = 0; l < 64; l++)); do printf 'hidden_states_%d.npy ' "$l"; done)
# shellcheck disable=SC2086
fetch "$pf" "$TD/pred-full" $hs
# shellcheck disable=SC2086
fetch "$pb" "$TD/pred-base" $hs
fetch "$tf" "$TD/full-model" config.json model.safetensors tokenizer.json tokenizer_config.json \
    special_tokens_map.json
read -r nl diff_base < <(maxdiff "$TD/pred-full" "$TD/pred-base")
it_log "trained vs base model: $nl layers, max |diff| $diff_base"
expect_eq "predict outputs: hidden states of every layer" true \
    "$([[ $nl -ge 2 ]] && echo true || echo false)"
expect_eq "the trained model's hidden states differ from the base model's (> 1e-4)" true \
    "$("$PY" -c 'import sys; print("true" if float(sys.argv[1]) > 1e-4 else "false")' "$diff_base")"
local_pspec=$(jq -nc --arg m "$TD/full-model" --arg d "$DATA" \
    '{model: {path: $m}, dataset: {path: $d}, template: "vanilla", dtype: "float32"}')
"$IT_BIN/strata-worker" run --kind predict --spec "$local_pspec" --out "$TD/pred-local" \
    >"$TD/pred-local.json" 2>"$TD/pred-local.err" || it_fail "local predict on the downloaded model: $(tail -3 "$TD/pred-local.err")"
read -r nl2 diff_local < <(maxdiff "$TD/pred-local" "$TD/pred-full")
it_log "job vs local predict on the downloaded model: $nl2 layers, max |diff| $diff_local"
expect_eq "local predict: as many layers" "$nl" "$nl2"
expect_eq "the job's hidden states equal a local predict on the downloaded model (1e-6)" true \
    "$("$PY" -c 'import sys; print("true" if float(sys.argv[1]) <= 1e-6 else "false")' "$diff_local")"

api_json POST /api/v1/jobs '{"kind": "predict", "spec": '"$(pspec '{"job": '"$tl"'}')"'}'
expect_problem "a LoRA train job as model is refused" 400 spec.model.job
expect_match "the message says to name it as adapter" 'lora train job; models come from a "full" train job.*adapter' \
    "$(jbody -r '.errors[] | select(.field == "spec.model.job") | .message')"

it_done
