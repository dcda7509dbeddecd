#!/bin/sh
# bench/gpu/run.sh - strata's CUDA engine against PyTorch on the same GPU:
# LoRA train steps (7B- and 1B-shaped LLaMA, r 8 on q,v, batch 4 x 1024),
# predict (7B, batch 8 x 512), CKA (8000 x 4096, twice) and, first, the 7B
# step's matrix products through cublasGemmEx and cublasLt, each measured by
# bench_gpu (C) and then by peer.py (torch), results as JSON lines in
# $BENCH_OUT/bench.jsonl and a table in $BENCH_OUT/bench.md (report.py).
# Run from anywhere:  BUILD=build bench/gpu/run.sh   (make bench-gpu does)
# Env: BUILD (build), BENCH_GPU_BIN ($BUILD/gpu/bench_gpu), PYTHON (python3, with
#      torch), BENCH_OUT ($BUILD/bench-gpu), BENCH_SECONDS (420: the whole run's
#      budget; each measurement gets at most its share and is skipped, with a
#      note, when the budget is spent), BENCH_RUN (a prefix for the binary, e.g.
#      the loader tests/gpu/device.sh uses).
set -u
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
BIN=${BENCH_GPU_BIN:-$BUILD/gpu/bench_gpu}
PYTHON=${PYTHON:-python3}
OUT=${BENCH_OUT:-$BUILD/bench-gpu}
BUDGET=${BENCH_SECONDS:-420}
RUNPFX=${BENCH_RUN:-}
mkdir -p "$OUT"
: > "$OUT/bench.jsonl"
deadline=$(( $(date +%s) + BUDGET ))

# step CAP NAME COMMAND...: runs COMMAND with at most CAP seconds (less when
# the budget runs short), its JSON lines to bench.jsonl, stderr to NAME.log.
step() {
    cap=$1 name=$2
    shift 2
    left=$(( deadline - $(date +%s) ))
    [ "$cap" -gt "$left" ] && cap=$left
    if [ "$cap" -lt 20 ]; then
        echo "{\"bench\": \"$name\", \"skipped\": \"time budget spent\"}" >> "$OUT/bench.jsonl"
        echo "bench-gpu: $name skipped (budget spent)"
        return
    fi
    echo "bench-gpu: $name (at most ${cap}s)"
    t0=$(date +%s)
    timeout -k 5 "$cap" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
    rc=$?
    grep '^{' "$OUT/$name.out" >> "$OUT/bench.jsonl"
    [ $rc -eq 0 ] || echo "{\"bench\": \"$name\", \"error\": \"exit $rc after $(( $(date +%s) - t0 ))s; see $name.log\"}" >> "$OUT/bench.jsonl"
    tail -n 2 "$OUT/$name.log" | sed 's/^/    /'
}

# First: the gemm paths' numbers decide STRATA_GEMM's default (gemm.h).
step 60 gemm-strata $RUNPFX "$BIN" gemm --shape 7b --tokens 4096
step 45 gemm-torch "$PYTHON" bench/gpu/peer.py gemm --tokens 4096
step 150 train7b-strata $RUNPFX "$BIN" train --shape 7b --batch 4 --seq 1024 --rank 8 --warmup 1 --steps 3
step 120 train7b-torch "$PYTHON" bench/gpu/peer.py train --shape 7b --batch 4 --seq 1024 --rank 8 --warmup 1 --steps 3
step 90 predict7b-strata $RUNPFX "$BIN" predict --shape 7b --batch 8 --seq 512 --warmup 1 --steps 3
step 70 predict7b-torch "$PYTHON" bench/gpu/peer.py predict --shape 7b --batch 8 --seq 512 --warmup 1 --steps 3
step 90 train1b-strata $RUNPFX "$BIN" train --shape 1b --batch 4 --seq 1024 --rank 8 --warmup 1 --steps 5
step 60 train1b-torch "$PYTHON" bench/gpu/peer.py train --shape 1b --batch 4 --seq 1024 --rank 8 --warmup 1 --steps 5
step 90 cka-strata $RUNPFX "$BIN" cka --rows 8000 --dim 4096
step 60 cka-torch "$PYTHON" bench/gpu/peer.py cka --rows 8000 --dim 4096
"$PYTHON" bench/gpu/report.py "$OUT/bench.jsonl" > "$OUT/bench.md"
cat "$OUT/bench.md"
