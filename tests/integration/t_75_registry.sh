#!/usr/bin/env bash
# t_75_registry: models and datasets registered with the server, by path on a
# shared filesystem and by uploaded artifacts; list (paged, by name) and get;
# duplicate names 409; bad fields and unknown artifacts 400 naming the field;
# a worker token reads but cannot create (403); refused requests create
# nothing; and predict jobs naming them are accepted (unknown ids refused).
source "$(dirname "$0")/lib.sh"

it_db_create
it_server_env
start_server

TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "alice", "role": "user"}'
ALICE=$(jbody .token)
TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "node", "role": "worker"}'
W=$(jbody .token)
[[ $ALICE == st_* && $W == st_* ]] || it_abort "cannot create tokens: $BODY"
TOKEN=$ALICE

# counts of everything a refused request might have written
rows() {
    sql "$IT_DB" "SELECT (SELECT count(*) FROM models) || ' ' || (SELECT count(*) FROM model_files)
                  || ' ' || (SELECT count(*) FROM datasets)"
}

# ---- a model by path
api_json POST /api/v1/models '{"name": "llama2-7b-chat", "path": "/shared/models/llama-2-7b-chat"}'
expect_status "register a model by path" 201
m1=$(jbody .id)
expect_eq "Location of the model" "/api/v1/models/$m1" "$(header Location)"
expect_eq "model name" llama2-7b-chat "$(jbody .name)"
expect_eq "model format defaults to hf" hf "$(jbody .format)"
expect_eq "model path" /shared/models/llama-2-7b-chat "$(jbody .path)"
expect_eq "model owner" alice "$(jbody .owner)"
expect_eq "a path model has no files" false "$(jbody 'has("files") or has("file")')"
expect_match "created_at" '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z$' "$(jbody .created_at)"

# ---- a model by uploaded files
printf '{"hidden_size": 8, "num_hidden_layers": 1}\n' >"$TD/data/config.json"
head -c 1000 /dev/urandom >"$TD/data/model.safetensors"
printf '{"model": {"type": "BPE"}}\n' >"$TD/data/tokenizer.json"
upload config.json "$TD/data/config.json"
cfg=$ART_ID
upload model.safetensors "$TD/data/model.safetensors"
wts=$ART_ID
upload tokenizer.json "$TD/data/tokenizer.json"
tok=$ART_ID
api_json POST /api/v1/models '{"name": "tiny/uploaded", "files": {"config.json": '$cfg', "model.safetensors": '$wts', "tokenizer.json": '$tok'}}'
expect_status "register a model by files" 201
m2=$(jbody .id)
expect_eq "files map back to the artifacts" \
    "{\"config.json\":$cfg,\"model.safetensors\":$wts,\"tokenizer.json\":$tok}" "$(jbody -c .files)"
expect_eq "an uploaded model has no path" null "$(jbody .path)"

# ---- llama2c: one uploaded file, or a path to a .bin
head -c 256 /dev/urandom >"$TD/data/stories15M.bin"
upload stories15M.bin "$TD/data/stories15M.bin"
bin=$ART_ID
api_json POST /api/v1/models '{"name": "stories15M", "format": "llama2c", "file": '$bin'}'
expect_status "register a llama2c model by file" 201
m3=$(jbody .id)
expect_eq "llama2c format" llama2c "$(jbody .format)"
expect_eq "llama2c file" "$bin" "$(jbody .file)"
api_json POST /api/v1/models '{"name": "stories42M", "format": "llama2c", "path": "/shared/llama2c/stories42M.bin"}'
expect_status "register a llama2c model by path" 201
m4=$(jbody .id)

# ---- datasets: by path with dataset_info, by artifact
api_json POST /api/v1/datasets '{"name": "alpaca_en", "format": "alpaca", "path": "/shared/data/alpaca_en.json", "dataset_info": {"file_name": "alpaca_en.json", "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}'
expect_status "register an alpaca dataset by path" 201
d1=$(jbody .id)
expect_eq "Location of the dataset" "/api/v1/datasets/$d1" "$(header Location)"
expect_eq "dataset format" alpaca "$(jbody .format)"
expect_eq "dataset path" /shared/data/alpaca_en.json "$(jbody .path)"
expect_eq "dataset_info kept" instruction "$(jbody .dataset_info.columns.prompt)"
printf '{"inputs": "Q?", "targets": "A.", "task": "t"}\n' >"$TD/data/flan.jsonl"
upload flan.jsonl "$TD/data/flan.jsonl"
fl=$ART_ID
api_json POST /api/v1/datasets '{"name": "flan-sample", "format": "flan", "artifact": '$fl'}'
expect_status "register a flan dataset by artifact" 201
d2=$(jbody .id)
expect_eq "dataset artifact" "$fl" "$(jbody .artifact)"
expect_eq "no dataset_info" null "$(jbody .dataset_info)"

# ---- reading: get, list, pages, by name; a worker may read
TOKEN=$W api GET "/api/v1/models/$m2"
expect_status "worker reads a model" 200
expect_eq "worker sees its files" "$cfg" "$(jbody '.files["config.json"]')"
TOKEN=$W api GET "/api/v1/datasets/$d1"
expect_status "worker reads a dataset" 200
expect_eq "worker sees the dataset path" /shared/data/alpaca_en.json "$(jbody .path)"
api GET /api/v1/models/424242
expect_problem "unknown model" 404
expect_eq "404 detail" "no model 424242" "$(jbody .detail)"
api GET /api/v1/datasets/424242
expect_problem "unknown dataset" 404
api GET /api/v1/models
expect_status "list models" 200
expect_eq "models newest first" "$m4 $m3 $m2 $m1" "$(jbody '[.items[].id] | map(tostring) | join(" ")')"
expect_eq "one page" null "$(jbody .next_cursor)"
api GET "/api/v1/models?limit=3"
expect_eq "first page of 3" "$m4 $m3 $m2" "$(jbody '[.items[].id] | map(tostring) | join(" ")')"
cursor=$(jbody .next_cursor)
expect_ne "a next cursor" null "$cursor"
api GET "/api/v1/models?limit=3&cursor=$cursor"
expect_eq "second page" "$m1" "$(jbody '[.items[].id] | map(tostring) | join(" ")')"
expect_eq "last page" null "$(jbody .next_cursor)"
TOKEN=$W api GET "/api/v1/datasets?name=flan-sample"
expect_status "worker lists datasets by name" 200
expect_eq "found by name" "$d2" "$(jbody '[.items[].id] | map(tostring) | join(" ")')"
api GET "/api/v1/models?name=nothing-like-it"
expect_eq "no model by that name" 0 "$(jbody '.items | length')"
api GET "/api/v1/models?limit=0"
expect_problem "limit 0" 400 limit
api GET "/api/v1/datasets?cursor=xyz"
expect_problem "bad cursor" 400 cursor

before=$(rows)

# ---- a worker cannot register
TOKEN=$W api_json POST /api/v1/models '{"name": "by-worker", "path": "/m"}'
expect_problem "worker registers a model" 403
TOKEN=$W api_json POST /api/v1/datasets '{"name": "by-worker", "format": "flan", "path": "/d.jsonl"}'
expect_problem "worker registers a dataset" 403

# ---- duplicate names (per kind: a dataset may share a model's name)
api_json POST /api/v1/models '{"name": "llama2-7b-chat", "path": "/elsewhere"}'
expect_problem "duplicate model name" 409 name
expect_match "409 detail" 'already exists' "$(jbody .detail)"
api_json POST /api/v1/datasets '{"name": "alpaca_en", "format": "flan", "path": "/x.jsonl"}'
expect_problem "duplicate dataset name" 409 name

# ---- bad fields, each named
api_json POST /api/v1/models '{}'
expect_problem "empty model" 400 name
expect_problem "empty model: source" 400 path
api_json POST /api/v1/models '{"name": "../etc", "path": "relative/dir"}'
expect_problem "bad name" 400 name
expect_problem "relative path" 400 path
api_json POST /api/v1/models '{"name": "m", "path": "/a/../b"}'
expect_problem "path with .." 400 path
api_json POST /api/v1/models '{"name": "m", "path": "/a\u0001b"}'
expect_problem "path with a control character" 400 path
api_json POST /api/v1/models '{"name": "m", "path": "/a", "files": {"config.json": 1}}'
expect_problem "path and files" 400 path
api_json POST /api/v1/models '{"name": "m", "format": "gguf", "path": "/a"}'
expect_problem "unknown format" 400 format
api_json POST /api/v1/models '{"name": "m", "path": "/a", "weights": "x"}'
expect_problem "unknown model field" 400 weights
api_json POST /api/v1/models '{"name": "m", "files": {"model.safetensors": '$wts'}}'
expect_problem "files without config.json" 400 files
expect_match "says config.json" 'config.json' "$(jbody '.errors[0].message')"
api_json POST /api/v1/models '{"name": "m", "files": {"config.json": '$cfg', "model.safetensors": 0, "../x": 3}}'
expect_problem "bad artifact id in files" 400 files.model.safetensors
expect_problem "bad file name in files" 400 files.../x
api_json POST /api/v1/models '{"name": "m", "file": '$bin'}'
expect_problem "file for an hf model" 400 file
api_json POST /api/v1/models '{"name": "m", "format": "llama2c", "path": "/shared/m.safetensors"}'
expect_problem "llama2c path not a .bin" 400 path
api_json POST /api/v1/models '{"name": "m", "format": "llama2c", "files": {"config.json": '$cfg'}}'
expect_problem "files for a llama2c model" 400 files
api_json POST /api/v1/datasets '{"name": "d", "path": "/d.json"}'
expect_problem "dataset without format" 400 format
api_json POST /api/v1/datasets '{"name": "d", "format": "sharegpt", "path": "/d.json"}'
expect_problem "unknown dataset format" 400 format
api_json POST /api/v1/datasets '{"name": "d", "format": "flan"}'
expect_problem "dataset without source" 400 path
api_json POST /api/v1/datasets '{"name": "d", "format": "flan", "path": "/d", "artifact": '$fl'}'
expect_problem "path and artifact" 400 path
api_json POST /api/v1/datasets '{"name": "d", "format": "flan", "path": "/d", "dataset_info": {}}'
expect_problem "dataset_info for flan" 400 dataset_info
api_json POST /api/v1/datasets '{"name": "d", "format": "alpaca", "path": "/d", "dataset_info": {"columns": {"prompt": 3, "answer": "a"}}}'
expect_problem "bad column" 400 dataset_info.columns.prompt
expect_problem "unknown column" 400 dataset_info.columns.answer
api_json POST /api/v1/datasets '{"name": "d", "format": "alpaca", "path": "/d", "dataset_info": [1]}'
expect_problem "dataset_info not an object" 400 dataset_info

# ---- unknown artifacts
api_json POST /api/v1/models '{"name": "m", "files": {"config.json": '$cfg', "model.safetensors": 424242}}'
expect_problem "unknown artifact in files" 400 files.model.safetensors
expect_eq "names the id" "no artifact 424242" "$(jbody '.errors[0].message')"
api_json POST /api/v1/models '{"name": "m", "format": "llama2c", "file": 424243}'
expect_problem "unknown llama2c artifact" 400 file
api_json POST /api/v1/datasets '{"name": "d", "format": "flan", "artifact": 424244}'
expect_problem "unknown dataset artifact" 400 artifact

expect_eq "nothing created by the refused requests" "$before" "$(rows)"

# a name that was refused is still free
api_json POST /api/v1/datasets '{"name": "llama2-7b-chat", "format": "flan", "path": "/shared/data/f.jsonl"}'
expect_status "a dataset may share a model's name" 201

# ---- predict jobs name registered models and datasets (t_85 runs them)
api_json POST /api/v1/jobs '{"kind": "predict", "spec": {"model": {"model": '$m1'}, "dataset": {"dataset": '$d1'}}}'
expect_status "a predict job naming a registered model and dataset" 201
expect_eq "it waits for a worker" queued "$(jbody .state)"
jobs_before=$(count_rows jobs)
api_json POST /api/v1/jobs '{"kind": "predict", "spec": {"model": {"model": 424242}, "dataset": {"dataset": 424243}}}'
expect_problem "unknown model" 400 spec.model.model
expect_problem "unknown dataset" 400 spec.dataset.dataset
expect_eq "no job created" "$jobs_before" "$(count_rows jobs)"

it_done
