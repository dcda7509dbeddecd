#!/usr/bin/env bash
# t_80_stack: deploy/stack.sh in a private home: `up` brings up PostgreSQL,
# the server and two workers and writes env; a second `up` changes nothing;
# a job submitted with the env's URL and token succeeds; `down` stops exactly
# what `up` started.
source "$(dirname "$0")/lib.sh"

unset STRATA_DATABASE_URL
export STRATA_HOME=$TD/stack
export STRATA_PORT=$(it_free_port)
export STRATA_WORKERS=2
export BUILD=$IT_BUILD
stack() { "$IT_REPO/deploy/stack.sh" "$@"; }

out=$(stack up 2>&1)
rc=$?
expect_eq "stack up exit status ($(tail -n 3 <<<"$out" | tr '\n' ' '))" 0 "$rc"
expect_true "env file written" test -s "$STRATA_HOME/env"
expect_eq "env STRATA_URL" "STRATA_URL=http://127.0.0.1:$STRATA_PORT" "$(grep '^STRATA_URL=' "$STRATA_HOME/env")"
expect_eq "env STRATA_TOKEN is the admin token" \
    "STRATA_TOKEN=$(tr -d '[:space:]' <"$STRATA_HOME/admin.token")" "$(grep '^STRATA_TOKEN=' "$STRATA_HOME/env")"
expect_eq "readyz" 200 "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$STRATA_PORT/readyz")"
pids=$(cat "$STRATA_HOME"/run/*.pid | sort | tr '\n' ' ')
expect_eq "pid files (server + 2 workers)" 3 "$(wc -w <<<"$pids")"
for p in $pids; do
    expect_true "process $p runs as the unprivileged user" \
        test "$(stat -c %U /proc/"$p")" = "$([[ $(id -u) -eq 0 ]] && echo strata || id -un)"
done
expect_match "PostgreSQL listens on no TCP port" "^listen_addresses = ''" \
    "$(grep -E "^listen_addresses" "$STRATA_HOME/pg/data/postgresql.conf" | tail -n 1)"
expect_eq "socket directory mode" 700 "$(stat -c %a "$STRATA_HOME/pg/run")"
env_mtime=$(stat -c %Y.%y "$STRATA_HOME/env")

out=$(stack up 2>&1)
expect_eq "second stack up exit status" 0 "$?"
expect_eq "second up keeps the same processes" "$pids" "$(cat "$STRATA_HOME"/run/*.pid | sort | tr '\n' ' ')"
expect_eq "second up leaves env alone" "$env_mtime" "$(stat -c %Y.%y "$STRATA_HOME/env")"

# The env file is all a user needs.
(
    set -a
    source "$STRATA_HOME/env"
    set +a
    URL=$STRATA_URL
    TOKEN=$STRATA_TOKEN
    npy gen "$TD/data/x.npy" "$TD/data/y.npy" --n 120 --dx 10 --dy 7 --seed 81
    ref=$(npy ref "$TD/data/x.npy" "$TD/data/y.npy")
    upload x.npy "$TD/data/x.npy"
    x=$ART_ID
    upload y.npy "$TD/data/y.npy"
    submit '{"kind": "cka", "spec": {"x": {"artifact": '"$x"'}, "y": {"artifact": '"$ART_ID"'}}}'
    ADMIN=$TOKEN
    wait_for_state "$JOB_ID" succeeded 60 &&
        expect_near "cka through the stack" "$(jq -r .cka <<<"$ref")" "$(jbody '.result.layers[0].cka')" 1e-6
    exit $((IT_FAILS > 0))
)
expect_eq "job through the stack's env" 0 "$?"

out=$(stack down 2>&1)
expect_eq "stack down exit status" 0 "$?"
# Gone, or a zombie its new parent has not reaped yet (stack.sh's processes
# are detached: when not root they are re-parented to init).
gone() {
    [[ ! -e /proc/$1 ]] || [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == Z ]] || [[ ! -e /proc/$1 ]]
}
for p in $pids; do
    expect_true "process $p stopped" gone "$p"
done
expect_eq "PostgreSQL stopped" 3 "$(STRATA_HOME=$STRATA_HOME "$IT_REPO/deploy/pg.sh" status >/dev/null 2>&1; echo $?)"
expect_eq "no pid files left" 0 "$(ls "$STRATA_HOME"/run/*.pid 2>/dev/null | wc -l)"
# Server and worker logs where run.sh looks for sanitizer reports.
cp "$STRATA_HOME"/log/*.log "$TD/logs/" 2>/dev/null

it_done
