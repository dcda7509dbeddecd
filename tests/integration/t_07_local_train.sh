#!/usr/bin/env bash
# t_07_local_train: `strata-worker run --kind train` from scratch on a local
# dataset with the byte-level tokenizer (an empty tokenizer directory), then
# `strata-worker run --kind predict` on what it wrote. Needs no server: this
# is how a user scripts the engine on one machine.
source "$(dirname "$0")/lib.sh"

mkdir -p "$TD/bytetok" "$TD/out" "$TD/acts"
"$PY" -c 'import json, sys
rows = [{"instruction": w + "=", "output": w[::-1]} for w in ["abcd", "hello", "layer", "strata"]] * 4
json.dump(rows, open(sys.argv[1], "w"))' "$TD/data/rev.json"
spec='{"base_model": {"init": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
 "num_attention_heads": 2, "vocab_size": 259, "max_position_embeddings": 64},
 "tokenizer": {"path": "'$TD/bytetok'"}}, "dataset": {"path": "'$TD/data/rev.json'"},
 "template": "vanilla", "method": "full", "max_steps": 3, "batch_size": 4, "learning_rate": 0.001}'
"$IT_BIN/strata-worker" run --kind train --out "$TD/out" --spec "$spec" >"$TD/train.json" 2>"$TD/train.err"
expect_eq "train exit status ($(tail -n 1 "$TD/train.err"))" 0 "$?"
expect_eq "one loss per step" 3 "$(jq '.losses | length' "$TD/train.json")"
# A fresh model's first loss is close to ln(259) = 5.557.
expect_near "first loss of a fresh byte-level model" 5.557 "$(jq '.losses[0]' "$TD/train.json")" 0.1
expect_true "config.json written" test -s "$TD/out/config.json"
expect_true "model.safetensors written" test -s "$TD/out/model.safetensors"

pspec='{"model": {"path": "'$TD/out'"}, "dataset": {"path": "'$TD/data/rev.json'"},
 "template": "vanilla", "dtype": "float32", "max_samples": 5}'
"$IT_BIN/strata-worker" run --kind predict --out "$TD/acts" --spec "$pspec" >"$TD/predict.json" 2>"$TD/predict.err"
expect_eq "predict on the trained model exit status ($(tail -n 1 "$TD/predict.err"))" 0 "$?"
expect_eq "predict examples" 5 "$(jq .examples "$TD/predict.json")"
expect_true "hidden states of the last layer" test -s "$TD/acts/hidden_states_2.npy"

it_done
