#!/bin/sh
# bench/train: milliseconds per optimizer step and tokens/s of strata's train
# job against the same model, batch and optimizer in PyTorch, full
# fine-tuning and LoRA, in one run. Run from anywhere:   bench/train/run.sh
# Builds the worker ($BUILD/strata-worker, the Makefile's flags), then runs
# bench_train.py (what is measured and how: its docstring and README.md).
# Env: BUILD (build), BENCH_THREADS (2), BENCH_STEPS (5), BENCH_ROUNDS (3), BENCH_B (4), BENCH_T (128),
#      BENCH_KEEP. Needs Debian's /usr/bin/python3 with numpy and python3-torch.
set -eu
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-/usr/bin/python3}
make --no-print-directory "$BUILD/strata-worker"
exec "$PYTHON" bench/train/bench_train.py "$BUILD/strata-worker"
