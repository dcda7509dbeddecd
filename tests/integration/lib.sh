# lib.sh - helpers for the integration tests (sourced by each t_*.sh).
#
# run.sh prepares the environment this file relies on:
#   IT_TMP      the run's private temp dir (reachable by the unprivileged user)
#   IT_BIN      copies of strata-server and strata-worker
#   IT_MIGRATIONS  a copy of migrations/
#   IT_PG_SOCK  the private PostgreSQL's socket directory; IT_PG_USER its superuser
#   IT_REPO     the repository (for deploy/pg.sh and the python helper)
#   IT_TEST     the test's name (t_20_api); its files go to $IT_TMP/$IT_TEST
#
# Every test gets its own database and server home, so tests never see each
# other's jobs. Processes run as `strata` when we are root (the server refuses
# root). Each started process's real pid is recorded in $IT_TMP/all.pids so
# run.sh can kill leftovers even when a test dies half-way.
#
# Assertions never abort: they print what differed and count a failure; the
# test ends with it_done, whose exit status run.sh reports as PASS/FAIL.

set -uo pipefail

IT_FAILS=0
IT_CHECKS=0
PY=/usr/bin/python3
TD=$IT_TMP/$IT_TEST
mkdir -p "$TD/logs" "$TD/data" "$TD/pids"
if [[ $(id -u) -eq 0 ]]; then
    chown strata:strata "$TD" "$TD/logs" "$TD/data" "$TD/pids"
fi

# ---------------------------------------------------------------- reporting

it_log() { printf '  [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

it_fail() {
    IT_FAILS=$((IT_FAILS + 1))
    printf '  FAIL: %s\n' "$*"
}

it_ok() {
    IT_CHECKS=$((IT_CHECKS + 1))
}

# Ends the test: exit status 0 only if no assertion failed and at least one ran.
it_done() {
    it_stop_all
    if ((IT_FAILS > 0)); then
        printf '  %d of %d checks failed\n' "$IT_FAILS" "$((IT_FAILS + IT_CHECKS))"
        exit 1
    fi
    if ((IT_CHECKS == 0)); then
        printf '  no check ran\n'
        exit 1
    fi
    printf '  %d checks passed\n' "$IT_CHECKS"
    exit 0
}

# Aborts the test at once (the rest would only cascade).
it_abort() {
    it_fail "$*"
    it_done
}

# expect_eq WHAT EXPECTED ACTUAL
expect_eq() {
    if [[ "$2" == "$3" ]]; then
        it_ok
    else
        it_fail "$1: expected '$2', got '$3'"
    fi
}

expect_ne() {
    if [[ "$2" != "$3" ]]; then
        it_ok
    else
        it_fail "$1: expected something other than '$2'"
    fi
}

# expect_match WHAT REGEX ACTUAL
expect_match() {
    if [[ "$3" =~ $2 ]]; then
        it_ok
    else
        it_fail "$1: '$3' does not match /$2/"
    fi
}

# expect_true WHAT COMMAND... : the command must succeed.
expect_true() {
    local what=$1
    shift
    if "$@"; then
        it_ok
    else
        it_fail "$what (command failed: $*)"
    fi
}

# expect_near WHAT EXPECTED ACTUAL TOL : |expected - actual| <= tol.
expect_near() {
    if "$PY" -c 'import sys, math
e, a, t = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
sys.exit(0 if math.isfinite(a) and abs(e - a) <= t else 1)' "$2" "$3" "$4" 2>/dev/null; then
        it_ok
    else
        it_fail "$1: expected $2 (within $4), got '$3'"
    fi
}

# ---------------------------------------------------------------- database

# psql against the private cluster; sql DB QUERY prints unaligned tuples.
sql() {
    PGOPTIONS="-c client_min_messages=warning" psql "host=$IT_PG_SOCK user=$IT_PG_USER dbname=$1" -XtAq -v ON_ERROR_STOP=1 -c "$2"
}

# Creates a fresh database for this test and points STRATA_DATABASE_URL at it.
it_db_create() {
    local name=${1:-it_${IT_TEST}}
    sql postgres "DROP DATABASE IF EXISTS $name" >/dev/null
    sql postgres "CREATE DATABASE $name OWNER $IT_PG_USER" >/dev/null
    IT_DB=$name
    export STRATA_DATABASE_URL="host=$IT_PG_SOCK dbname=$name user=$IT_PG_USER"
}

# ---------------------------------------------------------------- processes

# Picks a free TCP port on 127.0.0.1 (the kernel's choice, released at once).
it_free_port() {
    "$PY" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# spawn LOG CMD... : starts CMD in the background as the unprivileged user,
# appending stdout and stderr to LOG. Sets SPAWN_PID (the program's own pid,
# for signals) and SPAWN_WRAP (the background job, for `wait`: its status is
# the program's).
spawn() {
    local log=$1
    shift
    local pidf
    pidf=$(mktemp "$TD/pids/p.XXXXXX")
    [[ $(id -u) -ne 0 ]] || chown strata "$pidf"
    if [[ $(id -u) -eq 0 ]]; then
        (cd "$TD" && exec runuser -u strata -- sh -c 'echo $$ >"$0"; exec "$@"' "$pidf" "$@") \
            </dev/null >>"$log" 2>&1 &
    else
        (cd "$TD" && exec sh -c 'echo $$ >"$0"; exec "$@"' "$pidf" "$@") </dev/null >>"$log" 2>&1 &
    fi
    SPAWN_WRAP=$!
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s $pidf ]] && break
        sleep 0.05
    done
    SPAWN_PID=$(cat "$pidf")
    echo "$SPAWN_PID" >>"$IT_TMP/all.pids"
}

# Is this pid still one of our programs (guards against pid reuse)?
it_alive() {
    local pid=$1
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' 2>/dev/null </proc/"$pid"/cmdline | grep -qF "$IT_BIN/"
}

# wait_exit PID WRAP TIMEOUT : waits for the program to exit; sets EXIT_CODE
# (124 when it did not exit in time).
wait_exit() {
    local pid=$1 wrap=$2 timeout=$3 t=0
    while it_alive "$pid" && ((t < timeout * 10)); do
        sleep 0.1
        t=$((t + 1))
    done
    if it_alive "$pid"; then
        EXIT_CODE=124
        return 1
    fi
    wait "$wrap" 2>/dev/null
    EXIT_CODE=$?
    return 0
}

# ---------------------------------------------------------------- server

# Configures (not starts) this test's server: home, database, port, short
# leases and retry backoff so crash recovery is observable in seconds.
it_server_env() {
    export STRATA_HOME=$TD/home
    mkdir -p "$STRATA_HOME"
    [[ $(id -u) -ne 0 ]] || chown strata:strata "$STRATA_HOME"
    export STRATA_BIND=127.0.0.1
    export STRATA_PORT=${STRATA_PORT:-$(it_free_port)}
    export STRATA_LEASE_S=${STRATA_LEASE_S:-4}
    export STRATA_REAPER_INTERVAL_S=${STRATA_REAPER_INTERVAL_S:-1}
    export STRATA_RETRY_BASE_S=${STRATA_RETRY_BASE_S:-1}
    export STRATA_RETRY_MAX_S=${STRATA_RETRY_MAX_S:-2}
    export STRATA_MIGRATIONS=${STRATA_MIGRATIONS:-$IT_MIGRATIONS}
    URL=http://127.0.0.1:$STRATA_PORT
}

# server_cmd ARGS... : runs strata-server (e.g. migrate, token create) in the
# foreground as the unprivileged user; output to stdout/stderr, stderr also
# kept in logs/ so run.sh sees sanitizer reports of subcommands too.
server_cmd() {
    if [[ $(id -u) -eq 0 ]]; then
        (cd "$TD" && runuser -u strata -- "$IT_BIN/strata-server" "$@") \
            2> >(tee -a "$TD/logs/server-cmd.log" >&2)
    else
        (cd "$TD" && "$IT_BIN/strata-server" "$@") 2> >(tee -a "$TD/logs/server-cmd.log" >&2)
    fi
}

# Starts the server and waits until /readyz answers 200 (30 s). Sets
# SERVER_PID/SERVER_WRAP and ADMIN (the bootstrap admin token).
start_server() {
    local log=$TD/logs/server.log i
    echo "---- start $(date +%T)" >>"$log"
    spawn "$log" "$IT_BIN/strata-server" serve
    SERVER_PID=$SPAWN_PID
    SERVER_WRAP=$SPAWN_WRAP
    for ((i = 0; i < 300; i++)); do
        if [[ $(curl -s -o /dev/null -w '%{http_code}' "$URL/readyz") == 200 ]]; then
            break
        fi
        if ! it_alive "$SERVER_PID"; then
            tail -n 20 "$log" | sed 's/^/    server: /'
            it_abort "server exited during start-up"
        fi
        sleep 0.1
    done
    if ((i == 300)); then
        tail -n 20 "$log" | sed 's/^/    server: /'
        it_abort "server not ready after 30 s"
    fi
    for ((i = 0; i < 50; i++)); do
        [[ -s $STRATA_HOME/admin.token ]] && break
        sleep 0.1
    done
    ADMIN=$(tr -d '[:space:]' <"$STRATA_HOME/admin.token" 2>/dev/null)
    [[ -n $ADMIN ]] || it_abort "no admin token in $STRATA_HOME/admin.token"
    TOKEN=$ADMIN
}

# stop_server : SIGTERM, waits (35 s) and checks it exited 0.
stop_server() {
    [[ -n ${SERVER_PID:-} ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null
    wait_exit "$SERVER_PID" "$SERVER_WRAP" 35
    expect_eq "server exit status after SIGTERM" 0 "$EXIT_CODE"
    SERVER_PID=
}

# A worker token, created once per test through the API.
worker_token() {
    if [[ -z ${WORKER_TOKEN:-} ]]; then
        TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "it-worker", "role": "worker"}'
        WORKER_TOKEN=$(jq -r .token <<<"$BODY")
        [[ $STATUS == 201 && $WORKER_TOKEN == st_* ]] || it_abort "cannot create a worker token: $STATUS $BODY"
        printf '%s\n' "$WORKER_TOKEN" >"$TD/worker.token"
        chmod 0600 "$TD/worker.token"
        [[ $(id -u) -ne 0 ]] || chown strata "$TD/worker.token"
    fi
}

# start_worker NAME [ARGS...] : starts a worker (heartbeat 1 s, long-poll 2 s).
# Sets WPID[NAME] and WWRAP[NAME].
declare -A WPID WWRAP
start_worker() {
    local name=$1
    shift
    worker_token
    spawn "$TD/logs/worker-$name.log" "$IT_BIN/strata-worker" --server "$URL" \
        --token "@$TD/worker.token" --name "$name" --heartbeat 1 --wait 2 "$@"
    WPID[$name]=$SPAWN_PID
    WWRAP[$name]=$SPAWN_WRAP
}

# stop_worker NAME [SIGNAL] : signals it (TERM by default) and waits (60 s).
stop_worker() {
    local name=$1 sig=${2:-TERM}
    [[ -n ${WPID[$name]:-} ]] || return 0
    kill "-$sig" "${WPID[$name]}" 2>/dev/null
    wait_exit "${WPID[$name]}" "${WWRAP[$name]}" 60
    unset "WPID[$name]"
}

# Stops everything this test started (used by it_done and on abort).
it_stop_all() {
    local n
    for n in "${!WPID[@]}"; do
        it_alive "${WPID[$n]}" && kill -TERM "${WPID[$n]}" 2>/dev/null
    done
    for n in "${!WPID[@]}"; do
        wait_exit "${WPID[$n]}" "${WWRAP[$n]}" 20 || kill -KILL "${WPID[$n]}" 2>/dev/null
        unset "WPID[$n]"
    done
    if [[ -n ${SERVER_PID:-} ]] && it_alive "$SERVER_PID"; then
        kill -TERM "$SERVER_PID"
        wait_exit "$SERVER_PID" "$SERVER_WRAP" 35 || kill -KILL "$SERVER_PID" 2>/dev/null
    fi
    SERVER_PID=
}

# ---------------------------------------------------------------- HTTP

# api METHOD PATH [CURL ARGS...] : one request with "Authorization: Bearer
# $TOKEN" (no header when TOKEN is empty). Sets STATUS, BODY, CTYPE, HEADERS.
api() {
    local method=$1 path=$2
    shift 2
    local auth=()
    [[ -z ${TOKEN:-} ]] || auth=(-H "Authorization: Bearer $TOKEN")
    STATUS=$(curl -sS -o "$TD/body" -D "$TD/headers" -w '%{http_code}' --max-time 60 \
        -X "$method" "${auth[@]}" "$@" "$URL$path" 2>"$TD/curl.err")
    BODY=$(cat "$TD/body" 2>/dev/null)
    HEADERS=$(tr -d '\r' <"$TD/headers" 2>/dev/null)
    CTYPE=$(grep -i '^content-type:' <<<"$HEADERS" | tail -n 1 | sed 's/^[^:]*: *//')
}

# api_json METHOD PATH JSON
api_json() {
    api "$1" "$2" -H 'Content-Type: application/json' --data-binary "$3"
}

# upload NAME FILE : POST /api/v1/artifacts; sets ART_ID (empty on failure).
upload() {
    local qname
    qname=$(jq -rn --arg n "$1" '$n|@uri')
    api POST "/api/v1/artifacts?name=$qname" -H 'Content-Type: application/octet-stream' \
        --data-binary "@$2"
    ART_ID=
    if [[ $STATUS == 201 ]]; then
        ART_ID=$(jq -r .id <<<"$BODY")
    else
        it_fail "upload $1: status $STATUS: $BODY"
    fi
}

# submit JSON : POST /api/v1/jobs; sets JOB_ID (empty on failure).
submit() {
    api_json POST /api/v1/jobs "$1"
    JOB_ID=
    if [[ $STATUS == 201 ]]; then
        JOB_ID=$(jq -r .id <<<"$BODY")
    else
        it_fail "submit $1: status $STATUS: $BODY"
    fi
}

# header NAME : a response header's value from the last api call.
header() {
    grep -i "^$1:" <<<"$HEADERS" | tail -n 1 | sed 's/^[^:]*: *//'
}

# jbody [JQ OPTIONS] FILTER : jq -r over the last response body.
jbody() {
    jq -r "$@" <<<"$BODY" 2>/dev/null
}

# expect_status WHAT CODE
expect_status() {
    if [[ $STATUS == "$2" ]]; then
        it_ok
    else
        it_fail "$1: expected HTTP $2, got $STATUS: ${BODY:0:300}"
    fi
}

# expect_problem WHAT CODE [FIELD] : an RFC 9457 error with this status and,
# when FIELD is given, an errors[] entry naming it.
expect_problem() {
    local what=$1 code=$2 field=${3:-}
    expect_status "$what" "$code"
    expect_match "$what: content type" '^application/problem\+json' "$CTYPE"
    expect_eq "$what: problem status" "$code" "$(jbody .status)"
    expect_ne "$what: problem title" "" "$(jbody '.title // empty')"
    if [[ -n $field ]]; then
        local fields
        fields=$(jbody '[.errors[]?.field] | join(",")')
        if grep -qxF -- "$field" <<<"$(jbody '.errors[]?.field')"; then
            it_ok
        else
            it_fail "$what: no errors[] entry for field '$field' (fields: '$fields'; body ${BODY:0:300})"
        fi
    fi
}

# job_get ID : sets BODY to the job; echoes nothing.
job_get() {
    api GET "/api/v1/jobs/$1"
}

# wait_for_state ID STATE [TIMEOUT_S] : polls the job until it is in STATE.
# Gives up early when it reaches a different final state. Returns 1 (and
# counts a failure) on timeout or on the wrong final state.
wait_for_state() {
    local id=$1 want=$2 timeout=${3:-60} t=0 state=
    while ((t < timeout * 5)); do
        TOKEN=$ADMIN job_get "$id"
        state=$(jbody .state)
        if [[ $state == "$want" ]]; then
            it_ok
            return 0
        fi
        case $state in
        succeeded | failed | cancelled)
            it_fail "job $id ended $state, expected $want: ${BODY:0:500}"
            return 1
            ;;
        esac
        sleep 0.2
        t=$((t + 1))
    done
    it_fail "job $id still '$state' after ${timeout}s, expected $want: ${BODY:0:500}"
    return 1
}

# Counts rows of a table in this test's database.
count_rows() {
    sql "$IT_DB" "SELECT count(*) FROM $1"
}

# ---------------------------------------------------------------- numpy

# cka_ref.py wrapper (gen / ref); see that file.
npy() {
    "$PY" "$IT_REPO/tests/integration/cka_ref.py" "$@"
}

trap 'it_stop_all' EXIT

# slow_pair NAME [SEED [N D [noref]]] : uploads an input pair big enough that
# an rbf CKA job over it runs for several seconds (N x D, default IT_SLOW_N x
# IT_SLOW_D), so tests can act on a job while it is running. Sets SLOW_SPEC
# (the job spec) and SLOW_REF (the numpy reference {"cka", "n",
# "dropped_rows"}; not computed with noref).
slow_pair() {
    local name=$1 seed=${2:-99}
    local n=${3:-${IT_SLOW_N:-5000}} d=${4:-${IT_SLOW_D:-1024}}
    npy gen "$TD/data/$name.x.npy" "$TD/data/$name.y.npy" --n "$n" --dx "$d" --dy "$d" \
        --dtype float32 --seed "$seed" || it_abort "gen $name"
    SLOW_REF=
    if [[ ${5:-} != noref ]]; then
        SLOW_REF=$(npy ref "$TD/data/$name.x.npy" "$TD/data/$name.y.npy" --kernel rbf) || it_abort "ref $name"
    fi
    upload "$name.x.npy" "$TD/data/$name.x.npy"
    local x=$ART_ID
    upload "$name.y.npy" "$TD/data/$name.y.npy"
    SLOW_SPEC='{"x": {"artifact": '$x'}, "y": {"artifact": '$ART_ID'}, "kernel": "rbf"}'
    rm -f "$TD/data/$name.x.npy" "$TD/data/$name.y.npy"
}
