#!/usr/bin/env bash
# t_85_predict: predict jobs through the server. The reference "chat" model
# (tests/reference/fixtures/chat) is registered twice, by uploaded files and
# by a path the worker shares; a small alpaca dataset is uploaded. Two
# predict jobs (float32, last_token, template vanilla) must write
# hidden_states_0..L.npy and examples.jsonl, agree with each other exactly and
# with the PyTorch reference (tests/reference/llama_ref.py, tokenizer_ref.py)
# within 1e-4 relative; a CKA job over them gives 1 at every layer (1e-9).
# A model with perturbed layer weights gives CKA 1 at layer 0 (same
# embeddings) and below 1 elsewhere. The same prompts as Flan JSONL on a
# shared path give identical rows. A model path this worker cannot see, an
# adapter given as one artifact and remapped alpaca columns fail at once, not
# retried, saying why.
source "$(dirname "$0")/lib.sh"

FIX=$IT_REPO/tests/reference/fixtures/chat
REF=$IT_REPO/tests/integration/predict_ref.py
L=2 # chat's num_hidden_layers

it_db_create
it_server_env
start_server
start_worker w1
TOKEN=$ADMIN

# ---- the model, by uploaded files
files='{}'
for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do
    upload "$f" "$FIX/$f"
    [[ -n $ART_ID ]] || it_abort "cannot upload $f"
    files=$(jq -c --arg n "$f" --argjson id "$ART_ID" '. + {($n): $id}' <<<"$files")
done
api_json POST /api/v1/models '{"name": "chat-uploaded", "files": '"$files"'}'
expect_status "register the uploaded model" 201
m_up=$(jbody .id)

# ---- the same model by a path the worker reads (a copy the strata user can read)
mkdir -p "$TD/data/chat" "$TD/data/chat-perturbed"
cp "$FIX"/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json} "$TD/data/chat/"
cp "$FIX"/{config.json,tokenizer.json,tokenizer_config.json} "$TD/data/chat-perturbed/"
"$PY" "$REF" perturb "$FIX/model.safetensors" "$TD/data/chat-perturbed/model.safetensors" \
    || it_abort "cannot write the perturbed model"
[[ $(id -u) -ne 0 ]] || chown -R strata:strata "$TD/data"
api_json POST /api/v1/models '{"name": "chat-shared", "path": "'"$TD/data/chat"'"}'
expect_status "register the model by path" 201
m_path=$(jbody .id)
api_json POST /api/v1/models '{"name": "chat-perturbed", "path": "'"$TD/data/chat-perturbed"'"}'
expect_status "register the perturbed model" 201
m_pert=$(jbody .id)
api_json POST /api/v1/models '{"name": "nowhere", "path": "/nonexistent/strata-t85/model"}'
expect_status "register a model at a path no worker has" 201
m_none=$(jbody .id)

# ---- a small alpaca dataset, uploaded
cat >"$TD/data/tiny.json" <<'EOF'
[
 {"instruction": "Hello world", "input": "", "output": "hi"},
 {"instruction": "The model reads the text layer by layer.", "output": "yes"},
 {"instruction": "Read the text", "input": "one layer at a time", "output": "ok"},
 {"instruction": "naïve café", "input": "", "output": "x"},
 {"instruction": "line one\nline two", "input": "", "output": "two"},
 {"instruction": "a", "input": "", "output": "b"},
 {"instruction": "The text is read by the model.", "input": "", "output": "read"},
 {"instruction": "world", "input": "hello", "output": "hello world"}
]
EOF
upload tiny.json "$TD/data/tiny.json"
api_json POST /api/v1/datasets '{"name": "tiny-alpaca", "format": "alpaca", "artifact": '"$ART_ID"'}'
expect_status "register the dataset" 201
d=$(jbody .id)

# the same queries as Flan JSONL on the shared filesystem (vanilla: the same prompts)
jq -c '.[] | {inputs: (.instruction + (if (.input // "") != "" then "\n" + .input else "" end)),
              targets: .output, task: "t85"}' "$TD/data/tiny.json" >"$TD/data/tiny.jsonl"
[[ $(id -u) -ne 0 ]] || chown strata:strata "$TD/data/tiny.jsonl"
api_json POST /api/v1/datasets '{"name": "tiny-flan", "format": "flan", "path": "'"$TD/data/tiny.jsonl"'"}'
expect_status "register a flan dataset by path" 201
d_flan=$(jbody .id)
api_json POST /api/v1/datasets '{"name": "remapped", "format": "alpaca", "path": "'"$TD/data/tiny.json"'", "dataset_info": {"columns": {"prompt": "question"}}}'
expect_status "register an alpaca dataset with remapped columns" 201
d_cols=$(jbody .id)

spec() { # spec MODEL_ID [EXTRA [DATASET_ID]]
    printf '{"model": {"model": %s}, "dataset": {"dataset": %s}, "template": "vanilla", "pool": "last_token", "dtype": "float32", "batch_size": 4%s}' \
        "$1" "${3:-$d}" "${2:-}"
}

# ---- two predict jobs over the same weights
submit '{"kind": "predict", "spec": '"$(spec "$m_up")"'}'
p1=$JOB_ID
expect_eq "a predict job is accepted" queued "$(jbody .state)"
submit '{"kind": "predict", "spec": '"$(spec "$m_path")"'}'
p2=$JOB_ID
submit '{"kind": "predict", "spec": '"$(spec "$m_pert")"'}'
p3=$JOB_ID
submit '{"kind": "predict", "spec": '"$(spec "$m_up" "" "$d_flan")"'}'
p4=$JOB_ID
[[ -n $p1 && -n $p2 && -n $p3 && -n $p4 ]] || it_abort "predict jobs not accepted"
for p in "$p1" "$p2" "$p3" "$p4"; do
    wait_for_state "$p" succeeded 180 || it_abort "predict job $p did not succeed"
done

# download JOB DIR : fetches every artifact of the job into DIR by its name.
download() {
    mkdir -p "$2"
    api GET "/api/v1/jobs/$1/artifacts"
    local id name
    while read -r id name; do
        curl -sS -H "Authorization: Bearer $TOKEN" -o "$2/$name" \
            "$URL/api/v1/artifacts/$id/content" || it_fail "download $name of job $1"
    done < <(jbody '.items[] | "\(.id) \(.name)"')
}
want=$(for ((l = 0; l <= L; l++)); do printf 'hidden_states_%d.npy\n' "$l"; done
       echo examples.jsonl)
for p in "$p1" "$p2" "$p4"; do
    download "$p" "$TD/out-$p"
    api GET "/api/v1/jobs/$p/artifacts"
    expect_eq "job $p: artifact names" "$(sort <<<"$want")" "$(jbody '.items[].name' | sort)"
done
for ((l = 0; l <= L; l++)); do
    expect_true "layer $l: the same model gives identical rows (files vs path)" \
        cmp -s "$TD/out-$p1/hidden_states_$l.npy" "$TD/out-$p2/hidden_states_$l.npy"
    expect_true "layer $l: the same prompts from Flan JSONL by path give identical rows" \
        cmp -s "$TD/out-$p1/hidden_states_$l.npy" "$TD/out-$p4/hidden_states_$l.npy"
done
expect_eq "examples.jsonl: one line per record" 8 "$(grep -c . "$TD/out-$p1/examples.jsonl")"
out=$("$PY" "$REF" check "$FIX" "$TD/data/tiny.json" "$TD/out-$p1" --tol 1e-4)
rc=$?
it_log "reference check: $out"
expect_eq "hidden states match the PyTorch reference within 1e-4 (and input_ids)" 0 "$rc"
TOKEN=$ADMIN job_get "$p1"
expect_eq "progress: every example done" "8/8" "$(jbody '"\(.progress.step)/\(.progress.total)"')"

# ---- CKA over the per-layer outputs
submit '{"kind": "cka", "spec": {"x": {"job": '"$p1"'}, "y": {"job": '"$p2"'}}}'
c1=$JOB_ID
submit '{"kind": "cka", "spec": {"x": {"job": '"$p1"'}, "y": {"job": '"$p3"'}}}'
c2=$JOB_ID
wait_for_state "$c1" succeeded 120
expect_eq "same model: a CKA entry per layer" "0 1 2" "$(jbody '[.result.layers[].layer] | map(tostring) | join(" ")')"
for ((l = 0; l <= L; l++)); do
    expect_near "same model: cka at layer $l" 1 "$(jbody ".result.layers[$l].cka")" 1e-9
    expect_eq "same model: n at layer $l" 8 "$(jbody ".result.layers[$l].n")"
done
wait_for_state "$c2" succeeded 120
expect_near "perturbed model: layer 0 (same embeddings)" 1 "$(jbody '.result.layers[0].cka')" 1e-9
expect_eq "perturbed model: some layer has cka < 0.99" true \
    "$(jbody '[.result.layers[1:][].cka] | any(. < 0.99)')"

# ---- failures that no retry can fix: one attempt, a clear error
submit '{"kind": "predict", "max_attempts": 3, "spec": '"$(spec "$m_none")"'}'
f1=$JOB_ID
wait_for_state "$f1" failed 60
expect_match "a missing shared path is named" 'nonexistent/strata-t85/model.*on this worker' \
    "$(jbody .error)"
expect_eq "a missing shared path is not retried" 1 "$(jbody .attempt)"
upload adapter.bin "$TD/data/tiny.json"
submit '{"kind": "predict", "max_attempts": 3, "spec": '"$(spec "$m_up" ', "adapter": {"artifact": '"$ART_ID"'}')"'}'
f2=$JOB_ID
wait_for_state "$f2" failed 60
expect_match "an adapter artifact is refused, saying where adapters come from" \
    'adapter cannot be one artifact.*train job' "$(jbody .error)"
expect_eq "the adapter refusal is not retried" 1 "$(jbody .attempt)"
submit '{"kind": "predict", "max_attempts": 3, "spec": '"$(spec "$m_up" "" "$d_cols")"'}'
f3=$JOB_ID
wait_for_state "$f3" failed 60
expect_match "remapped alpaca columns are refused by name" \
    'maps column "prompt" to "question"' "$(jbody .error)"
expect_eq "the column refusal is not retried" 1 "$(jbody .attempt)"

# ---- an unknown model or dataset is refused at submission
api_json POST /api/v1/jobs '{"kind": "predict", "spec": {"model": {"model": 424242}, "dataset": {"dataset": '"$d"'}}}'
expect_problem "unknown model" 400 spec.model.model
api GET "/api/v1/jobs?kind=predict"
expect_status "predict is a kind jobs can be listed by" 200
expect_eq "seven predict jobs listed" 7 "$(jbody '.items | length')"

it_done
