#!/usr/bin/env bash
# t_10_migrations: `strata-server migrate` applies every file once, is a no-op
# the second time, leaves nothing behind when a file fails, is safe when two
# run at once, and start-up refuses a file changed after it was applied.
source "$(dirname "$0")/lib.sh"

it_db_create
it_server_env

files=$(ls "$IT_MIGRATIONS" | grep -E '^[0-9]{4}_[a-z0-9_]+\.sql$' | sort)
nfiles=$(wc -l <<<"$files")
expect_ne "migration files found" 0 "$nfiles"

# ---- first run on an empty database applies every file
out=$(server_cmd migrate 2>&1)
expect_eq "first migrate exit status" 0 "$?"
rows=$(sql "$IT_DB" "SELECT version, name, checksum FROM schema_migrations ORDER BY version")
expect_eq "schema_migrations rows after first migrate" "$nfiles" "$(grep -c . <<<"$rows")"
while read -r f; do
    v=$((10#${f:0:4}))
    sum=$(sha256sum "$IT_MIGRATIONS/$f" | cut -d' ' -f1)
    got=$(sql "$IT_DB" "SELECT name || ' ' || checksum FROM schema_migrations WHERE version = $v")
    expect_eq "row for $f (name, sha256)" "$f $sum" "$got"
done <<<"$files"
expect_eq "users table exists" "users" "$(sql "$IT_DB" "SELECT to_regclass('users')")"

# ---- a second run is a no-op: same rows, same applied_at
before=$(sql "$IT_DB" "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version")
out=$(server_cmd migrate 2>&1)
expect_eq "second migrate exit status" 0 "$?"
after=$(sql "$IT_DB" "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version")
expect_eq "schema_migrations unchanged by a second migrate" "$before" "$after"

# ---- a failing migration names the file and leaves nothing behind
bad=$TD/mig_bad
cp -r "$IT_MIGRATIONS" "$bad"
cat >"$bad/9999_bad.sql" <<'SQL'
CREATE TABLE it_half_done (id integer);
INSERT INTO it_half_done VALUES (1);
SELEC this is not sql;
SQL
out=$(STRATA_MIGRATIONS=$bad server_cmd migrate 2>&1)
rc=$?
expect_ne "failing migrate exit status" 0 "$rc"
expect_match "failing migrate names the file" '9999_bad\.sql' "$out"
expect_eq "no table left by the failed file" "" "$(sql "$IT_DB" "SELECT to_regclass('it_half_done')")"
expect_eq "no schema_migrations row for the failed file" 0 \
    "$(sql "$IT_DB" "SELECT count(*) FROM schema_migrations WHERE version = 9999")"
expect_eq "earlier rows untouched by the failed run" "$before" \
    "$(sql "$IT_DB" "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version")"

# ---- two migrate at once on a fresh database: both succeed, each file once
main_db=$IT_DB
it_db_create "it_t_10_race"
out1=$TD/logs/race1.out
out2=$TD/logs/race2.out
server_cmd migrate >"$out1" 2>&1 &
p1=$!
server_cmd migrate >"$out2" 2>&1 &
p2=$!
wait "$p1"
rc1=$?
wait "$p2"
rc2=$?
expect_eq "concurrent migrate #1 exit status ($(tr '\n' ' ' <"$out1" | cut -c1-200))" 0 "$rc1"
expect_eq "concurrent migrate #2 exit status ($(tr '\n' ' ' <"$out2" | cut -c1-200))" 0 "$rc2"
expect_eq "rows after concurrent migrate" "$nfiles" "$(sql "$IT_DB" "SELECT count(*) FROM schema_migrations")"
expect_eq "distinct versions after concurrent migrate" "$nfiles" \
    "$(sql "$IT_DB" "SELECT count(DISTINCT version) FROM schema_migrations")"
IT_DB=$main_db
export STRATA_DATABASE_URL="host=$IT_PG_SOCK dbname=$IT_DB user=$IT_PG_USER"

# ---- an applied file edited afterwards: start-up refuses, naming the checksum
changed=$TD/mig_changed
cp -r "$IT_MIGRATIONS" "$changed"
first=$(head -n 1 <<<"$files")
printf '\n-- edited after it was applied\n' >>"$changed/$first"
log=$TD/logs/server-changed.log
STRATA_MIGRATIONS=$changed spawn "$log" "$IT_BIN/strata-server" serve
if wait_exit "$SPAWN_PID" "$SPAWN_WRAP" 40; then
    expect_ne "serve with a changed migration exits non-zero" 0 "$EXIT_CODE"
else
    kill -KILL "$SPAWN_PID" 2>/dev/null
    it_fail "serve with a changed migration did not exit within 40 s"
fi
expect_match "start-up refusal mentions the checksum" '[Cc]hecksum' "$(cat "$log")"
expect_match "start-up refusal names the file" "$first" "$(cat "$log")"
out=$(STRATA_MIGRATIONS=$changed server_cmd migrate 2>&1)
expect_ne "migrate with a changed file exits non-zero" 0 "$?"
expect_eq "schema_migrations untouched by the refused start" "$before" \
    "$(sql "$IT_DB" "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version")"

it_done
