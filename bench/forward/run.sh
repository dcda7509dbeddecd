#!/bin/sh
# bench/forward: tokens/s of hidden-state extraction, strata's C forward pass
# against the same ~100M-parameter model in PyTorch, in one run. Run from the
# repo root:   bench/forward/run.sh
# Builds the driver (bench/forward/forward_bench.c, linked with the worker's
# libraries, the Makefile's flags) into $BUILD/bench/forward_bench, then runs
# bench_forward.py, which writes the model into a temporary directory (about
# 400 MB; BENCH_KEEP=DIR keeps and reuses it), runs both sides and compares.
# Env: BUILD (build), BENCH_THREADS (nproc), BENCH_ITERS (3), BENCH_ROUNDS (2), BENCH_B (8),
#      BENCH_T (256), BENCH_NKV (4), BENCH_KEEP. Needs Debian's /usr/bin/python3
#      with numpy and python3-torch.
set -eu
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-/usr/bin/python3}
PKGS="libmicrohttpd libpq jansson libcurl openblas libcrypto"
make --no-print-directory "$BUILD/libworker.a" "$BUILD/libcommon.a"
mkdir -p "$BUILD/bench"
# The Makefile's CFLAGS (-O2 -g and its warnings), so the driver is built as
# the worker is.
cc -O2 -g -std=c11 -D_GNU_SOURCE -pthread -Wall -Wextra -Werror -Wshadow -Wformat=2 \
    -Wstrict-prototypes -Wmissing-prototypes -fno-strict-aliasing -I. \
    $(pkg-config --cflags $PKGS) -o "$BUILD/bench/forward_bench" bench/forward/forward_bench.c \
    "$BUILD/libworker.a" "$BUILD/libcommon.a" $(pkg-config --libs $PKGS) -lpthread -lm
exec "$PYTHON" bench/forward/bench_forward.py "$BUILD/bench/forward_bench"
