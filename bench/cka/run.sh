#!/bin/sh
# Linear CKA: strata-worker vs the seed's numpy formula, side by side in one
# run. Run from the repo root after `make`:   bench/cka/run.sh
# Env: WORKER (default $BUILD/strata-worker), BENCH_N (10000),
#      BENCH_DIMS (1024,4096). Needs Debian's /usr/bin/python3 with numpy.
set -eu
BUILD=${BUILD:-build}
WORKER=${WORKER:-$BUILD/strata-worker}
PYTHON=${PYTHON:-/usr/bin/python3}
if [ ! -x "$WORKER" ]; then
    echo "bench/cka: $WORKER not found; run make first" >&2
    exit 1
fi
# Both sides get the kernels blas_setup picks for this CPU: ask the worker
# which core it ends up on, and hand numpy the same OPENBLAS_CORETYPE (unless
# the user chose one).
if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
    dir=$(mktemp -d "${TMPDIR:-/tmp}/strata-bench-core-XXXXXX")
    trap 'rm -rf "$dir"' EXIT
    "$PYTHON" -c "import numpy as np; np.save('$dir/a.npy', np.random.default_rng(0).standard_normal((8, 2)))"
    core=$("$WORKER" run --kind cka --spec "{\"x\": {\"path\": \"$dir/a.npy\"}, \"y\": {\"path\": \"$dir/a.npy\"}}" 2>/dev/null |
        "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["blas_core"])')
    OPENBLAS_CORETYPE=$core
    export OPENBLAS_CORETYPE
fi
exec "$PYTHON" "$(dirname "$0")/bench_cka.py" "$WORKER"
