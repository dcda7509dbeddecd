#!/usr/bin/env bash
# stack.sh - the local strata stack: private PostgreSQL, server, workers.
#
#   deploy/stack.sh up|down|status
#
# up: installs what is missing, starts PostgreSQL (deploy/pg.sh), the server
# and STRATA_WORKERS (default 2) workers in the background, and writes
# $STRATA_HOME/env with STRATA_URL and STRATA_TOKEN (an admin token).
# Everything lives in STRATA_HOME (default <repo>/var): log/ (server.log,
# worker-N.log), run/ (pid files), pg/, artifacts/. A second `up` with
# everything running changes nothing. down: stops what up started (workers,
# server, PostgreSQL), nothing else.
#
# As root the processes run as the system user strata (the server refuses
# root); they run copies of the binaries and migrations in $STRATA_HOME so the
# checkout may sit where strata cannot read.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
BUILD=${BUILD:-build}
case $BUILD in /*) ;; *) BUILD=$REPO/$BUILD ;; esac
export STRATA_HOME=$(realpath -m -- "${STRATA_HOME:-$REPO/var}")
LOGDIR=$STRATA_HOME/log
RUNDIR=$STRATA_HOME/run
WORKERS=${STRATA_WORKERS:-2}
ROOT=0
[[ $(id -u) -ne 0 ]] || ROOT=1

say() { echo "stack: $*" >&2; }

# Is the pid in FILE alive and running PROGRAM (guards against stale files
# and pid reuse)?
alive() {
    local file=$1 program=$2 pid
    [[ -s $file ]] || return 1
    pid=$(cat "$file")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' 2>/dev/null </proc/"$pid"/cmdline | grep -qF "$program"
}

# launch PIDFILE LOG CMD... : starts CMD detached (own session, survives this
# script and the terminal) as the unprivileged user; the program's own pid
# goes to PIDFILE.
launch() {
    local pidfile=$1 log=$2
    shift 2
    rm -f -- "$pidfile"
    if ((ROOT)); then
        (cd "$STRATA_HOME" && exec setsid runuser -u strata -- sh -c 'echo $$ >"$0"; exec "$@"' \
            "$pidfile" "$@") </dev/null >>"$log" 2>&1 &
    else
        (cd "$STRATA_HOME" && exec setsid sh -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@") \
            </dev/null >>"$log" 2>&1 &
    fi
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s $pidfile ]] && return 0
        sleep 0.05
    done
    say "could not start $1 (see $log)"
    return 1
}

# as_strata CMD... : runs CMD in the foreground as the unprivileged user.
as_strata() {
    if ((ROOT)); then
        (cd "$STRATA_HOME" && runuser -u strata -- "$@")
    else
        (cd "$STRATA_HOME" && "$@")
    fi
}

# The binaries and migrations the stack runs: copies in $STRATA_HOME when
# root, the build tree otherwise. Copies are refreshed only while the server
# is down, each by rename so a still-running worker's binary is never
# overwritten in place (that would fail with "text file busy").
prepare_binaries() {
    if ((ROOT)); then
        if ! alive "$RUNDIR/server.pid" strata-server; then
            mkdir -p "$STRATA_HOME/bin"
            local b
            for b in strata-server strata-worker; do
                cp "$BUILD/$b" "$STRATA_HOME/bin/.$b.new"
                mv -f "$STRATA_HOME/bin/.$b.new" "$STRATA_HOME/bin/$b"
            done
            rm -rf "$STRATA_HOME/migrations.new"
            cp -r "$REPO/migrations" "$STRATA_HOME/migrations.new"
            rm -rf "$STRATA_HOME/migrations"
            mv "$STRATA_HOME/migrations.new" "$STRATA_HOME/migrations"
            chown -R strata:strata "$STRATA_HOME/bin" "$STRATA_HOME/migrations"
        fi
        BIN=$STRATA_HOME/bin
        MIGRATIONS=$STRATA_HOME/migrations
    else
        BIN=$BUILD
        MIGRATIONS=$REPO/migrations
    fi
}

server_env() {
    if [[ -z ${STRATA_DATABASE_URL:-} ]]; then
        STRATA_DATABASE_URL=$("$REPO/deploy/pg.sh" url)
    fi
    export STRATA_DATABASE_URL STRATA_MIGRATIONS=$MIGRATIONS
}

up() {
    "$REPO/deploy/install-deps.sh"
    for b in strata-server strata-worker; do
        [[ -x $BUILD/$b ]] || { say "$BUILD/$b is missing: run make first"; exit 1; }
    done
    "$REPO/deploy/pg.sh" start
    mkdir -p "$LOGDIR" "$RUNDIR"
    ((ROOT == 0)) || chown strata:strata "$STRATA_HOME" "$LOGDIR" "$RUNDIR"
    prepare_binaries
    server_env

    local port
    if alive "$RUNDIR/server.pid" strata-server; then
        port=$(cat "$RUNDIR/server.port")
    else
        port=${STRATA_PORT:-8080}
        if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$port/healthz"; then
            say "port $port is already in use by another program; set STRATA_PORT"
            exit 1
        fi
        echo "$port" >"$RUNDIR/server.port"
        say "starting strata-server on port $port (log $LOGDIR/server.log)"
        STRATA_PORT=$port STRATA_BIND=${STRATA_BIND:-127.0.0.1} \
            launch "$RUNDIR/server.pid" "$LOGDIR/server.log" "$BIN/strata-server" serve
    fi
    local url=http://127.0.0.1:$port i
    for ((i = 0; i < 600; i++)); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url/readyz") == 200 ]] && break
        if ! alive "$RUNDIR/server.pid" strata-server; then
            say "strata-server exited; last lines of $LOGDIR/server.log:"
            tail -n 20 "$LOGDIR/server.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    ((i < 600)) || { say "strata-server not ready after 60 s (see $LOGDIR/server.log)"; exit 1; }

    # The bootstrap admin token appears on the first start with an empty database.
    for ((i = 0; i < 50; i++)); do
        [[ -s $STRATA_HOME/admin.token ]] && break
        sleep 0.1
    done
    [[ -s $STRATA_HOME/admin.token ]] || { say "no $STRATA_HOME/admin.token"; exit 1; }

    if [[ ! -s $STRATA_HOME/worker.token ]]; then
        local tok
        tok=$(as_strata "$BIN/strata-server" token create --user local-workers --role worker \
            2>>"$LOGDIR/server.log")
        [[ $tok == st_* ]] || { say "could not create a worker token: $tok"; exit 1; }
        (umask 077 && printf '%s\n' "$tok" >"$STRATA_HOME/worker.token.tmp")
        ((ROOT == 0)) || chown strata:strata "$STRATA_HOME/worker.token.tmp"
        mv "$STRATA_HOME/worker.token.tmp" "$STRATA_HOME/worker.token"
    fi

    local n
    for ((n = 1; n <= WORKERS; n++)); do
        if ! alive "$RUNDIR/worker-$n.pid" strata-worker; then
            say "starting worker $n (log $LOGDIR/worker-$n.log)"
            launch "$RUNDIR/worker-$n.pid" "$LOGDIR/worker-$n.log" "$BIN/strata-worker" \
                --server "$url" --token "@$STRATA_HOME/worker.token" --name "local-$n"
        fi
    done

    local env_text
    env_text="STRATA_URL=$url
STRATA_TOKEN=$(tr -d '[:space:]' <"$STRATA_HOME/admin.token")"
    if [[ ! -f $STRATA_HOME/env || $(cat "$STRATA_HOME/env") != "$env_text" ]]; then
        (umask 077 && printf '%s\n' "$env_text" >"$STRATA_HOME/env")
    fi

    local stop="make down"
    [[ $STRATA_HOME == "$REPO/var" ]] || stop="STRATA_HOME=$STRATA_HOME make down"
    cat <<EOF
strata is up: $url ($WORKERS workers, PostgreSQL in $STRATA_HOME/pg)
  source $STRATA_HOME/env     # sets STRATA_URL and STRATA_TOKEN (admin)
  curl -H "Authorization: Bearer \$STRATA_TOKEN" \$STRATA_URL/api/v1/jobs
  logs: $LOGDIR/    stop: $stop
EOF
}

# stop_pid FILE PROGRAM TIMEOUT : SIGTERM, wait; a second SIGTERM at half
# time (a worker then cancels and releases its job); SIGKILL at the end.
stop_pid() {
    local file=$1 program=$2 timeout=$3 pid i
    if ! alive "$file" "$program"; then
        rm -f -- "$file"
        return 0
    fi
    pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
        alive "$file" "$program" || break
        ((i != timeout * 5)) || kill -TERM "$pid" 2>/dev/null || true
        sleep 0.1
    done
    if alive "$file" "$program"; then
        say "$program (pid $pid) did not stop in ${timeout}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f -- "$file"
}

down() {
    local f
    for f in "$RUNDIR"/worker-*.pid; do
        [[ -e $f ]] || continue
        alive "$f" strata-worker && say "stopping $(basename "$f" .pid)"
        stop_pid "$f" strata-worker 60 &
    done
    wait
    if alive "$RUNDIR/server.pid" strata-server; then say "stopping strata-server"; fi
    stop_pid "$RUNDIR/server.pid" strata-server 40
    if [[ -z ${STRATA_DATABASE_URL:-} && -d $STRATA_HOME/pg/data ]]; then
        say "stopping PostgreSQL"
        "$REPO/deploy/pg.sh" stop
    fi
}

status() {
    local f rc=0
    if alive "$RUNDIR/server.pid" strata-server; then
        echo "server: running (pid $(cat "$RUNDIR/server.pid"), port $(cat "$RUNDIR/server.port"))"
    else
        echo "server: stopped"
        rc=3
    fi
    for f in "$RUNDIR"/worker-*.pid; do
        [[ -e $f ]] || continue
        if alive "$f" strata-worker; then
            echo "$(basename "$f" .pid): running (pid $(cat "$f"))"
        else
            echo "$(basename "$f" .pid): stopped"
        fi
    done
    echo "postgresql: $("$REPO/deploy/pg.sh" status || true)"
    return $rc
}

case ${1:-} in
up) up ;;
down) down ;;
status) status ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
