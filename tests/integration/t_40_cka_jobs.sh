#!/usr/bin/env bash
# t_40_cka_jobs: CKA jobs end to end with two workers: random .npy inputs of
# every dtype and shape class, linear / debiased / rbf, NaN rows; each result
# checked against numpy reference values (cka_ref.py) within 1e-6, plus n and
# dropped_rows; a row-count mismatch fails clearly and is not retried; job
# logs, job metrics and /metrics answer.
source "$(dirname "$0")/lib.sh"

it_db_create
it_server_env
start_server
start_worker w1
start_worker w2

TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "alice", "role": "user"}'
ALICE=$(jbody .token)

# case NAME GEN_ARGS... -- REF_ARGS... -- SPEC_EXTRA
# Generates the pair, uploads it, submits a job and remembers what to expect.
declare -a C_NAME C_JOB C_REF C_KERNEL C_DEB
add_case() {
    local name=$1 gen=$2 ref=$3 extra=$4 kernel=$5 deb=$6
    # shellcheck disable=SC2086
    npy gen "$TD/data/$name.x.npy" "$TD/data/$name.y.npy" $gen || it_abort "gen $name"
    # shellcheck disable=SC2086
    local expected
    expected=$(npy ref "$TD/data/$name.x.npy" "$TD/data/$name.y.npy" $ref) || it_abort "ref $name"
    TOKEN=$ALICE upload "$name.x.npy" "$TD/data/$name.x.npy"
    local x=$ART_ID
    TOKEN=$ALICE upload "$name.y.npy" "$TD/data/$name.y.npy"
    local y=$ART_ID
    TOKEN=$ALICE submit '{"kind": "cka", "name": "'"$name"'", "spec": {"x": {"artifact": '"$x"'}, "y": {"artifact": '"$y"'}'"$extra"'}}'
    C_NAME+=("$name")
    C_JOB+=("$JOB_ID")
    C_REF+=("$expected")
    C_KERNEL+=("$kernel")
    C_DEB+=("$deb")
}

add_case f32_tall "--n 400 --dx 32 --dy 24 --dtype float32 --seed 11" "" "" linear false
add_case f16_wide "--n 64 --dx 150 --dy 120 --dtype float16 --seed 12" "" "" linear false
add_case f64_nan "--n 300 --dx 40 --dy 30 --dtype float64 --seed 13 --nan-x 3,10,250 --nan-y 10,20" \
    "" ', "kernel": "linear"' linear false
add_case f32_massive "--n 500 --dx 64 --dy 48 --dtype float32 --seed 14 --massive" "" "" linear false
add_case deb_tall "--n 300 --dx 20 --dy 20 --dtype float64 --seed 15 --nan-x 7" "--debiased" \
    ', "debiased": true' linear true
add_case deb_wide "--n 50 --dx 100 --dy 80 --dtype float32 --seed 16" "--debiased" \
    ', "debiased": true' linear true
add_case rbf_f32 "--n 150 --dx 20 --dy 16 --dtype float32 --seed 17" "--kernel rbf" \
    ', "kernel": "rbf"' rbf false
add_case rbf_half_deb "--n 120 --dx 10 --dy 12 --dtype float64 --seed 18 --nan-y 5" \
    "--kernel rbf --threshold 0.5 --debiased" ', "kernel": "rbf", "rbf_threshold": 0.5, "debiased": true' rbf true
add_case rbf_f16_wide "--n 60 --dx 90 --dy 70 --dtype float16 --seed 19" "--kernel rbf" \
    ', "kernel": "rbf"' rbf false

# A row-count mismatch: must fail, once, with a message about the rows.
npy gen "$TD/data/m.x.npy" "$TD/data/m.tmp.npy" --n 100 --dx 8 --dy 8 --seed 20
npy gen "$TD/data/m.tmp2.npy" "$TD/data/m.y.npy" --n 90 --dx 8 --dy 8 --seed 21
TOKEN=$ALICE upload m.x.npy "$TD/data/m.x.npy"
MX=$ART_ID
TOKEN=$ALICE upload m.y.npy "$TD/data/m.y.npy"
MY=$ART_ID
TOKEN=$ALICE submit '{"kind": "cka", "name": "mismatch", "spec": {"x": {"artifact": '"$MX"'}, "y": {"artifact": '"$MY"'}}, "max_attempts": 3}'
MISMATCH=$JOB_ID

for i in "${!C_JOB[@]}"; do
    name=${C_NAME[$i]}
    id=${C_JOB[$i]}
    [[ -n $id ]] || continue
    wait_for_state "$id" succeeded 120 || continue
    exp=${C_REF[$i]}
    expect_near "$name cka" "$(jq -r .cka <<<"$exp")" "$(jbody '.result.layers[0].cka')" 1e-6
    expect_eq "$name n" "$(jq -r .n <<<"$exp")" "$(jbody '.result.layers[0].n')"
    expect_eq "$name dropped_rows" "$(jq -r .dropped_rows <<<"$exp")" "$(jbody '.result.layers[0].dropped_rows')"
    expect_eq "$name layer" null "$(jbody '.result.layers[0].layer')"
    expect_eq "$name layers" 1 "$(jbody '.result.layers | length')"
    expect_eq "$name result kernel" "${C_KERNEL[$i]}" "$(jbody .result.kernel)"
    expect_eq "$name result debiased" "${C_DEB[$i]}" "$(jbody .result.debiased)"
    expect_eq "$name attempt" 1 "$(jbody .attempt)"
    expect_ne "$name worker" null "$(jbody .worker)"
    expect_ne "$name finished_at" null "$(jbody .finished_at)"
    expect_eq "$name error" null "$(jbody .error)"
done

wait_for_state "$MISMATCH" failed 60
expect_eq "mismatch: attempts used (not retried)" 1 "$(jbody .attempt)"
expect_match "mismatch: error mentions the row counts" '100.*90|90.*100' "$(jbody .error)"
expect_eq "mismatch: no result" null "$(jbody .result)"

# ---- logs and metrics of a finished job
first=${C_JOB[0]}
TOKEN=$ALICE api GET "/api/v1/jobs/$first/logs"
expect_status "job logs" 200
expect_match "job logs are text" '^text/plain' "$CTYPE"
expect_ne "job logs have lines" 0 "$(grep -c . <<<"$BODY")"
TOKEN=$ALICE api GET "/api/v1/jobs/$first/metrics"
expect_status "job metrics" 200
expect_eq "job metrics has series" object "$(jbody '.series | type')"
TOKEN=$ALICE api GET "/api/v1/jobs/$first/artifacts"
expect_status "job artifacts" 200
expect_eq "job artifacts is a list" array "$(jbody '.items | type')"

# Both workers registered with the server.
expect_eq "workers registered" 2 "$(count_rows workers)"

TOKEN= api GET /metrics
ok=${#C_JOB[@]}
expect_match "/metrics counts $ok succeeded cka jobs" \
    "strata_jobs\\{[^}]*state=\"succeeded\"[^}]*\\} $ok(\\.0+)?([^0-9.]|\$)" "$BODY"
expect_match "/metrics counts 1 failed cka job" \
    'strata_jobs\{[^}]*state="failed"[^}]*\} 1(\.0+)?([^0-9.]|$)' "$BODY"
expect_match "/metrics has workers alive" 'strata_workers_alive 2(\.0+)?([^0-9.]|$)' "$BODY"

stop_worker w1
expect_eq "worker w1 exit status after SIGTERM" 0 "$EXIT_CODE"
stop_worker w2
expect_eq "worker w2 exit status after SIGTERM" 0 "$EXIT_CODE"
stop_server
it_done
