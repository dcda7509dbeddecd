#!/usr/bin/env bash
# t_70_readme: runs the README's "API by example" commands exactly as written,
# against this test's server and a worker, and checks what they print against
# numpy. Keeps the README true: an example that stops working fails here.
source "$(dirname "$0")/lib.sh"

it_db_create
it_server_env
start_server
start_worker w1

# The shell blocks of the section "## The API by example", in order.
blocks=$(awk '/^## The API by example/ {on = 1; next}
              /^## / {on = 0}
              on && /^```sh$/ {inside = 1; next}
              on && inside && /^```$/ {inside = 0; next}
              on && inside {print}' "$IT_REPO/README.md")
expect_match "README has the example section" 'api/v1/jobs' "$blocks"

# The README's world: var/env in the current directory, the two matrices,
# strata-worker on PATH.
ex=$TD/readme
mkdir -p "$ex/var"
printf 'STRATA_URL=%s\nSTRATA_TOKEN=%s\n' "$URL" "$ADMIN" >"$ex/var/env"
npy gen "$ex/base.npy" "$ex/tuned.npy" --n 300 --dx 24 --dy 16 --dtype float32 --seed 70 \
    || it_abort "gen"
# A model folder the workers can read (the reference "chat" model) and prompts.
cp -r "$IT_REPO/tests/reference/fixtures/chat" "$ex/chat"
cp "$IT_REPO/tests/fixtures/predict/dataset.json" "$ex/prompts.json"
[[ $(id -u) -ne 0 ]] || chown -R strata "$ex"
want=$(npy ref "$ex/base.npy" "$ex/tuned.npy")
want_rbf=$(npy ref "$ex/base.npy" "$ex/tuned.npy" --kernel rbf)

out=$(cd "$ex" && PATH="$IT_BIN:$PATH" bash -euo pipefail -c "$blocks" 2>"$TD/readme.err")
rc=$?
expect_eq "README examples exit status (stderr: $(head -c 400 "$TD/readme.err"))" 0 "$rc"
printf '%s\n' "$out" | sed 's/^/    readme: /' | head -n 30

# The first JSON line is {state, result} of the linear job.
line=$(grep -m1 '"state"' <<<"$out")
expect_eq "README job state" succeeded "$(jq -r .state <<<"$line")"
expect_near "README linear CKA" "$(jq .cka <<<"$want")" "$(jq '.result.layers[0].cka' <<<"$line")" 1e-6
expect_eq "README n" 300 "$(jq '.result.layers[0].n' <<<"$line")"
# The problem example prints the status and the fields at fault.
expect_match "README bad request is a 400" '^400$' "$(grep -m1 -x '400' <<<"$out")"
expect_match "README bad request names spec.kernel and spec.y" 'spec.kernel.*spec.y|spec.y.*spec.kernel' \
    "$(grep -F '["spec.' <<<"$out")"
# The local run prints a result JSON with the rbf value.
local_line=$(grep '"kernel":"rbf"\|"kernel": "rbf"' <<<"$out" | tail -n 1)
expect_near "README local rbf CKA" "$(jq .cka <<<"$want_rbf")" "$(jq '.layers[0].cka' <<<"$local_line")" 1e-6
# The train job streamed one loss per step; the tuned predict job wrote every
# hidden state of the 2-layer model (0..2); LoRA on q_proj,v_proj leaves the
# embeddings (layer 0) as they were, so their CKA is 1 there.
losses=$(grep -F '[[' <<<"$out" | head -n 1)
expect_eq "README train loss series has every step" 4 "$(jq length <<<"$losses")"
expect_eq "README predict artifacts" '["hidden_states_0.npy","hidden_states_1.npy","hidden_states_2.npy","examples.jsonl"]' \
    "$(grep -F '"hidden_states_0.npy"' <<<"$out" | grep -v '"examples":' | head -n 1)"
layers=$(grep -F '[{"layer":0,' <<<"$out" | tail -n 1)
expect_eq "README CKA covers every layer" 3 "$(jq length <<<"$layers")"
expect_near "README CKA at the embeddings" 1 "$(jq '.[0].cka' <<<"$layers")" 1e-9
expect_true "README CKA base vs tuned within (0, 1] at every layer" \
    jq -e 'all(.[]; .cka > 0 and .cka <= 1.000001)' <<<"$layers"
# The local predict run wrote its artifacts into acts/.
expect_true "README local predict wrote hidden states" test -s "$ex/acts/hidden_states_0.npy"
expect_true "README local predict wrote examples.jsonl" test -s "$ex/acts/examples.jsonl"
expect_true "README local train wrote an adapter" test -s "$ex/tuned/adapter_model.safetensors"
# Nothing was created by the bad request: 2 cka + train, 2 predict, cka.
expect_eq "jobs created by the README" 6 "$(count_rows jobs)"

it_done
