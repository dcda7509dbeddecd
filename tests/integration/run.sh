#!/usr/bin/env bash
# run.sh - the integration suite: real PostgreSQL, real server and workers, curl.
#
#   BUILD=build SANITIZER= tests/integration/run.sh [t_20_api ...]
#
# Starts a private PostgreSQL cluster (deploy/pg.sh) in a fresh temp dir, runs
# each tests/integration/t_*.sh (or the ones named) in order, prints PASS/FAIL
# per test and the line "N passed, M failed". Never touches var/ (the user's
# stack). Cleans up on any exit, failure or Ctrl-C: kills what the tests
# started, stops PostgreSQL, removes the temp dir (kept with KEEP=1).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-build}
case $BUILD in /*) ;; *) BUILD=$REPO/$BUILD ;; esac
SANITIZER=${SANITIZER:-}
PER_TEST_TIMEOUT=${IT_TIMEOUT:-240}

for b in strata-server strata-worker; do
    if [[ ! -x $BUILD/$b ]]; then
        echo "run.sh: $BUILD/$b is missing (run make first)" >&2
        exit 1
    fi
done
for tool in psql jq curl /usr/bin/python3; do
    command -v "$tool" >/dev/null || { echo "run.sh: $tool is missing (deploy/install-deps.sh)" >&2; exit 1; }
done
if ! /usr/bin/python3 -c 'import numpy' 2>/dev/null; then
    echo "run.sh: /usr/bin/python3 has no numpy (deploy/install-deps.sh installs python3-numpy)" >&2
    exit 1
fi
if [[ $(id -u) -eq 0 ]] && ! getent passwd strata >/dev/null; then
    echo "run.sh: running as root needs the system user strata (deploy/install-deps.sh creates it)" >&2
    exit 1
fi

IT_TMP=$(mktemp -d /tmp/strata-it.XXXXXX)
chmod 0755 "$IT_TMP"
[[ $(id -u) -ne 0 ]] || chown strata:strata "$IT_TMP"
: >"$IT_TMP/all.pids"

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    # Whatever a test left behind: only pids of our own copies of the binaries.
    while read -r pid; do
        [[ -n $pid && -r /proc/$pid/cmdline ]] || continue
        if tr '\0' ' ' 2>/dev/null </proc/"$pid"/cmdline | grep -qF "$IT_TMP/bin/"; then
            kill -KILL "$pid" 2>/dev/null
        fi
    done <"$IT_TMP/all.pids"
    STRATA_HOME=$IT_TMP "$REPO/deploy/pg.sh" stop >/dev/null 2>&1
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "run.sh: kept $IT_TMP" >&2
    else
        rm -rf -- "$IT_TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
child=
on_signal() {
    echo "run.sh: interrupted" >&2
    # The test runs in the background (under timeout, in its own process
    # group) so that this trap runs at once; stop it, then clean up.
    [[ -z $child ]] || kill -TERM "$child" 2>/dev/null
    [[ -z $child ]] || wait "$child" 2>/dev/null
    exit 130
}
trap on_signal INT TERM

# The tree may sit under a directory the unprivileged user cannot reach (CI
# clones anywhere): run copies of the binaries and migrations from the temp dir.
mkdir -p "$IT_TMP/bin"
cp "$BUILD/strata-server" "$BUILD/strata-worker" "$IT_TMP/bin/"
cp -r "$REPO/migrations" "$IT_TMP/migrations"
[[ $(id -u) -ne 0 ]] || chown -R strata:strata "$IT_TMP/bin" "$IT_TMP/migrations"

unset STRATA_DATABASE_URL STRATA_URL STRATA_TOKEN STRATA_PORT STRATA_HOME
if ! STRATA_HOME=$IT_TMP "$REPO/deploy/pg.sh" start; then
    echo "run.sh: cannot start PostgreSQL" >&2
    exit 1
fi

export IT_TMP IT_REPO=$REPO IT_BIN=$IT_TMP/bin IT_MIGRATIONS=$IT_TMP/migrations IT_BUILD=$BUILD
export IT_PG_SOCK=$IT_TMP/pg/run
if [[ $(id -u) -eq 0 ]]; then IT_PG_USER=strata; else IT_PG_USER=$(id -un); fi
export IT_PG_USER
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
if [[ -n $SANITIZER ]]; then
    # Leaks are errors; reports go to the process's stderr (its log).
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=23
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    export LSAN_OPTIONS=${LSAN_OPTIONS:-}
fi

if (($# > 0)); then
    tests=()
    for t in "$@"; do tests+=("$REPO/tests/integration/${t%.sh}.sh"); done
else
    tests=("$REPO"/tests/integration/t_*.sh)
fi

passed=0
failed=0
for t in "${tests[@]}"; do
    name=$(basename "$t" .sh)
    out=$IT_TMP/$name.out
    start=$(date +%s)
    IT_TEST=$name timeout -k 10 "$PER_TEST_TIMEOUT" bash "$t" >"$out" 2>&1 &
    child=$!
    wait "$child"
    rc=$?
    child=
    secs=$(($(date +%s) - start))
    verdict=PASS
    ((rc == 0)) || verdict=FAIL
    ((rc == 124)) && echo "  timed out after ${PER_TEST_TIMEOUT}s" >>"$out"
    # A sanitizer report in any server/worker log fails the test.
    if [[ -n $SANITIZER && -d $IT_TMP/$name/logs ]]; then
        reports=$(grep -lE 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|SUMMARY: (Address|Leak|Undefined)' \
            "$IT_TMP/$name"/logs/* 2>/dev/null)
        if [[ -n $reports ]]; then
            verdict=FAIL
            for f in $reports; do
                echo "  sanitizer report in $(basename "$f"):" >>"$out"
                grep -m 1 -A 30 -E 'ERROR: (Address|Leak)Sanitizer|runtime error:' "$f" | sed 's/^/    /' >>"$out"
            done
        fi
    fi
    if [[ $verdict == PASS ]]; then
        passed=$((passed + 1))
        printf 'PASS %s (%ds)\n' "$name" "$secs"
        [[ ${VERBOSE:-0} != 1 ]] || sed 's/^/  /' "$out"
    else
        failed=$((failed + 1))
        printf 'FAIL %s (%ds)\n' "$name" "$secs"
        sed 's/^/  /' "$out" | tail -n 80
        for f in "$IT_TMP/$name"/logs/*; do
            [[ -f $f ]] || continue
            echo "  --- last lines of $(basename "$f")"
            tail -n 15 "$f" | sed 's/^/    /'
        done
    fi
done

echo "$passed passed, $failed failed"
((failed == 0))
