#!/usr/bin/env bash
# t_67_spec_refs: the server checks what a cka spec points at before it
# accepts the job: unknown artifacts and jobs, a job that is not a predict job
# (only those have per-layer hidden states), and layers given for two single
# artifacts are 400s naming the field, and create nothing.
source "$(dirname "$0")/lib.sh"

it_db_create
it_server_env
start_server
npy gen "$TD/data/r.x.npy" "$TD/data/r.y.npy" --n 30 --dx 4 --dy 3 --seed 67 || it_abort "gen"
upload r.x.npy "$TD/data/r.x.npy"
x=$ART_ID
upload r.y.npy "$TD/data/r.y.npy"
y=$ART_ID
submit '{"kind": "cka", "spec": {"x": {"artifact": '$x'}, "y": {"artifact": '$y'}}}'
cka_job=$JOB_ID
jobs_before=$(count_rows jobs)

api_json POST /api/v1/jobs '{"kind": "cka", "spec": {"x": {"job": '$cka_job'}, "y": {"job": '$cka_job'}}}'
expect_problem "a cka job as per-layer input" 400 spec.x.job
expect_match "the message says why" 'is a cka job; per-layer inputs come from a predict job' \
    "$(jbody '.errors[0].message')"
api_json POST /api/v1/jobs '{"kind": "cka", "spec": {"x": {"job": 424242}, "y": {"artifact": '$y'}}}'
expect_problem "an unknown job as input" 400 spec.x.job
api_json POST /api/v1/jobs '{"kind": "cka", "spec": {"x": {"artifact": '$x'}, "y": {"artifact": 424242}}}'
expect_problem "an unknown artifact as input" 400 spec.y.artifact
api_json POST /api/v1/jobs '{"kind": "cka", "spec": {"x": {"artifact": '$x'}, "y": {"artifact": '$y'}, "layers": [1, 2]}}'
expect_problem "layers with two single artifacts" 400 spec.layers
expect_eq "no job created by the refused requests" "$jobs_before" "$(count_rows jobs)"

it_done
