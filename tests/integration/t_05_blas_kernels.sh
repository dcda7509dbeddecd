#!/usr/bin/env bash
# t_05_blas_kernels: the worker's OpenBLAS kernel selection (worker/engine/blas.c).
# Debian 12's OpenBLAS falls back to "Prescott" kernels on CPUs newer than it
# knows. A preloaded shim makes openblas_get_corename() answer "Prescott" (or
# the core named by OPENBLAS_CORETYPE, as OpenBLAS would after a re-exec), so
# the test sees what a worker does on such a CPU: re-execute once with the
# right OPENBLAS_CORETYPE, and leave a user's own choice alone. Needs no server.
source "$(dirname "$0")/lib.sh"

cat >"$TD/fake_core.c" <<'C'
#include <stdlib.h>
/* OpenBLAS's answer on a CPU it does not recognise, unless told a core. */
char *openblas_get_corename(void) {
    char *forced = getenv("OPENBLAS_CORETYPE");
    return forced && *forced ? forced : (char *)"Prescott";
}
C
cc -shared -fPIC -o "$TD/fake_core.so" "$TD/fake_core.c" || it_abort "cannot build the shim"
npy gen "$TD/data/b.x.npy" "$TD/data/b.y.npy" --n 50 --dx 6 --dy 4 --seed 5 || it_abort "gen"
spec='{"x": {"path": "'$TD/data/b.x.npy'"}, "y": {"path": "'$TD/data/b.y.npy'"}}'
want=$(npy ref "$TD/data/b.x.npy" "$TD/data/b.y.npy" | jq .cka)

# What the CPU can run decides the expected choice.
flags=$(grep -m1 '^flags' /proc/cpuinfo)
expected=
if [[ $flags == *avx512f* && $flags == *avx512dq* && $flags == *avx512bw* && $flags == *avx512vl* ]]; then
    expected=SkylakeX
elif [[ $flags == *avx2* && $flags == *fma* ]]; then
    expected=Haswell
fi

# ASan insists on being first in the library list; the shim is harmless.
run_worker() {
    env -u OPENBLAS_CORETYPE LD_PRELOAD="$TD/fake_core.so" \
        ASAN_OPTIONS="${ASAN_OPTIONS:-}:verify_asan_link_order=0" "$@" \
        "$IT_BIN/strata-worker" run --kind cka --spec "$spec" 2>"$TD/err" >"$TD/out"
}

run_worker
expect_eq "worker exit status" 0 "$?"
expect_near "cka after the kernel choice" "$want" "$(jq '.layers[0].cka' "$TD/out")" 1e-9
if [[ -n $expected ]]; then
    expect_eq "re-executed once with the right kernels" 1 \
        "$(grep -c "re-executing with OPENBLAS_CORETYPE=$expected" "$TD/err")"
    expect_match "logs the kernels in use after the re-exec" \
        "OpenBLAS uses the $expected kernels \\(OPENBLAS_CORETYPE=$expected, chosen for this CPU\\)" \
        "$(cat "$TD/err")"
    expect_eq "the result names the kernels" "$expected" "$(jq -r .blas_core "$TD/out")"
else
    expect_eq "no re-exec on a CPU without AVX2" 0 "$(grep -c 're-executing' "$TD/err")"
fi

# A user's own choice is kept, whatever the CPU.
run_worker OPENBLAS_CORETYPE=Nehalem
expect_eq "worker exit status with a user choice" 0 "$?"
expect_eq "no re-exec when the user chose" 0 "$(grep -c 're-executing' "$TD/err")"
expect_match "logs the user's choice" 'OPENBLAS_CORETYPE=Nehalem set by the user' "$(cat "$TD/err")"
expect_eq "the result names the user's kernels" Nehalem "$(jq -r .blas_core "$TD/out")"

it_done
