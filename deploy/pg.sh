#!/usr/bin/env bash
# pg.sh - the private PostgreSQL cluster of a strata home.
#
#   deploy/pg.sh start|stop|status|url
#
# The cluster lives in $STRATA_HOME/pg (STRATA_HOME defaults to $PWD/var): data/
# (created on first start: initdb with trust auth), run/ (the only way in: a
# unix socket, mode 0700, no TCP) and log. It holds the database "strata".
# As root, the cluster belongs to and runs as the system user `strata`
# (see install-deps.sh); otherwise as the invoking user. `start` is idempotent.
# When STRATA_DATABASE_URL is set the database is external and `start`/`stop`
# do nothing.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status|url" >&2; exit 2; }
(($# == 1)) || usage
cmd=$1

STRATA_HOME=$(realpath -m -- "${STRATA_HOME:-$PWD/var}")
PGROOT=$STRATA_HOME/pg
DATA=$PGROOT/data
RUN=$PGROOT/run
LOG=$PGROOT/log

if [[ $(id -u) -eq 0 ]]; then
    OWNER=strata
else
    OWNER=$(id -un)
fi

# The newest installed server version, e.g. /usr/lib/postgresql/15/bin.
pg_bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [[ -z $d || ! -x $d/initdb ]]; then
        echo "pg.sh: no PostgreSQL server found under /usr/lib/postgresql (run deploy/install-deps.sh)" >&2
        exit 1
    fi
    echo "$d"
}

# Runs a command as the cluster owner, from / so that an unreadable current
# directory (e.g. /root) does not upset initdb or postgres.
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        (cd / && runuser -u strata -- "$@")
    else
        (cd / && "$@")
    fi
}

# As root: every directory above STRATA_HOME must be traversable by strata,
# or postgres (and the server) cannot reach their files. Grants only the
# search bit, and says so.
ensure_reachable() {
    [[ $(id -u) -eq 0 ]] || return 0
    if ! getent passwd strata >/dev/null; then
        echo "pg.sh: system user strata is missing (run deploy/install-deps.sh as root)" >&2
        exit 1
    fi
    local d=$STRATA_HOME parents=()
    while [[ $d != / ]]; do
        d=$(dirname -- "$d")
        parents=("$d" "${parents[@]}")
    done
    for d in "${parents[@]}"; do
        [[ -d $d ]] || continue
        if ! runuser -u strata -- test -x "$d" 2>/dev/null; then
            if command -v setfacl >/dev/null; then
                setfacl -m u:strata:x -- "$d"
                echo "pg.sh: granted user strata search access to $d (setfacl -m u:strata:x)" >&2
            else
                chmod o+x -- "$d"
                echo "pg.sh: made $d traversable by others (chmod o+x) so user strata can reach $STRATA_HOME" >&2
            fi
        fi
    done
}

is_running() {
    [[ -f $DATA/PG_VERSION ]] || return 1
    as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

# Creates STRATA_HOME/pg and the cluster, configured for the private socket only.
init_cluster() {
    mkdir -p -- "$STRATA_HOME"
    if [[ $(id -u) -eq 0 ]]; then
        # The server writes its token and artifacts here as strata.
        chown strata:strata -- "$STRATA_HOME"
    fi
    ensure_reachable
    mkdir -p -- "$PGROOT"
    [[ $(id -u) -ne 0 ]] || chown strata:strata -- "$PGROOT"
    chmod 0700 -- "$PGROOT"
    if [[ -f $DATA/PG_VERSION ]]; then
        return 0
    fi
    local sock=$RUN/.s.PGSQL.5432
    if ((${#sock} > 107)); then
        echo "pg.sh: socket path $sock is longer than the 107 bytes a unix socket allows; use a shorter STRATA_HOME" >&2
        exit 1
    fi
    echo "pg.sh: creating PostgreSQL cluster in $DATA (owner $OWNER)" >&2
    as_owner mkdir -p -m 0700 -- "$RUN"
    as_owner "$BIN/initdb" -D "$DATA" -U "$OWNER" --auth=trust -E UTF8 --locale=C.UTF-8 \
        >"$PGROOT/initdb.log" 2>&1 || {
        echo "pg.sh: initdb failed; see $PGROOT/initdb.log:" >&2
        tail -n 20 "$PGROOT/initdb.log" >&2
        exit 1
    }
    as_owner tee -a "$DATA/postgresql.conf" >/dev/null <<CONF

# strata: private cluster, reachable only through its unix socket.
listen_addresses = ''
unix_socket_directories = '$RUN'
unix_socket_permissions = 0700
CONF
}

start() {
    if [[ -n ${STRATA_DATABASE_URL:-} ]]; then
        echo "pg.sh: STRATA_DATABASE_URL is set; using that database, not starting one" >&2
        return 0
    fi
    init_cluster
    if is_running; then
        return 0
    fi
    as_owner mkdir -p -m 0700 -- "$RUN"
    as_owner touch -- "$LOG"
    if ! as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start >/dev/null; then
        echo "pg.sh: PostgreSQL did not start; last lines of $LOG:" >&2
        tail -n 20 "$LOG" >&2
        exit 1
    fi
    local have
    have=$(as_owner "$BIN/psql" -h "$RUN" -U "$OWNER" -d postgres -XtAq \
        -c "SELECT 1 FROM pg_database WHERE datname = 'strata'")
    if [[ $have != 1 ]]; then
        as_owner "$BIN/createdb" -h "$RUN" -U "$OWNER" strata
    fi
}

stop() {
    if [[ -n ${STRATA_DATABASE_URL:-} ]]; then
        return 0
    fi
    if is_running; then
        as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null
    fi
}

BIN=$(pg_bindir)
case $cmd in
start) start ;;
stop) stop ;;
status)
    if is_running; then
        echo "running: $DATA (socket $RUN)"
    else
        echo "not running: $DATA"
        exit 3
    fi
    ;;
url) echo "host=$RUN dbname=strata user=$OWNER" ;;
*) usage ;;
esac
