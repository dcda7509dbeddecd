#!/usr/bin/env bash
# t_20_api: health endpoints, tokens, artifact round trip, job create/get,
# list pagination and filters, all over HTTP with the values checked.
source "$(dirname "$0")/lib.sh"

it_db_create
it_server_env
start_server

# ---- health
TOKEN= api GET /healthz
expect_status "healthz" 200
expect_eq "healthz status" ok "$(jbody .status)"
TOKEN= api GET /readyz
expect_status "readyz" 200
TOKEN= api GET /metrics
expect_status "metrics" 200
expect_match "metrics is Prometheus text" '^text/plain' "$CTYPE"
expect_match "metrics has strata_http_requests_total" 'strata_http_requests_total' "$BODY"

# ---- tokens
TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "alice", "role": "user"}'
expect_status "create user token" 201
expect_eq "token user" alice "$(jbody .user)"
expect_eq "token role" user "$(jbody .role)"
ALICE=$(jbody .token)
expect_match "token format" '^st_[0-9a-f]{64}$' "$ALICE"
TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "bob", "role": "user"}'
expect_status "create second user token" 201
BOB=$(jbody .token)
TOKEN=$ADMIN api_json POST /api/v1/tokens '{"user": "w1", "role": "worker"}'
expect_status "create worker token" 201
expect_eq "worker token role" worker "$(jbody .role)"
W1=$(jbody .token)
expect_ne "tokens differ" "$ALICE" "$BOB"
TOKEN=$ALICE api GET /api/v1/jobs
expect_status "user token is accepted" 200
TOKEN=$ALICE api_json POST /api/v1/tokens '{"user": "mallory", "role": "admin"}'
expect_problem "user creating a token" 403

# ---- artifacts: upload, metadata, content
npy gen "$TD/data/a32.npy" "$TD/data/b32.npy" --n 50 --dx 8 --dy 6 --dtype float32 --seed 1
npy gen "$TD/data/a16.npy" "$TD/data/b64.npy" --n 50 --dx 4 --dy 3 --dtype float16 --seed 2
npy gen "$TD/data/c64.npy" "$TD/data/d64.npy" --n 20 --dx 5 --dy 5 --dtype float64 --seed 3
check_artifact() { # FILE NAME DTYPE SHAPE
    local f=$1 name=$2 dtype=$3 shape=$4
    TOKEN=$ALICE upload "$name" "$f"
    expect_status "upload $name" 201
    local id=$ART_ID sum size
    sum=$(sha256sum "$f" | cut -d' ' -f1)
    size=$(stat -c %s "$f")
    expect_eq "$name sha256" "$sum" "$(jbody .sha256)"
    expect_eq "$name size" "$size" "$(jbody .size)"
    expect_eq "$name name" "$name" "$(jbody .name)"
    expect_eq "$name kind" npy "$(jbody .kind)"
    expect_eq "$name job" null "$(jbody .job)"
    expect_eq "$name dtype" "$dtype" "$(jbody .meta.dtype)"
    expect_eq "$name shape" "$shape" "$(jbody -c .meta.shape)"
    TOKEN=$ALICE api GET "/api/v1/artifacts/$id"
    expect_status "artifact $id metadata" 200
    expect_eq "metadata sha256" "$sum" "$(jbody .sha256)"
    expect_eq "metadata id" "$id" "$(jbody .id)"
    curl -sS -o "$TD/data/download" -H "Authorization: Bearer $ALICE" "$URL/api/v1/artifacts/$id/content"
    expect_eq "content of $name round-trips (sha256)" "$sum" "$(sha256sum "$TD/data/download" | cut -d' ' -f1)"
    LAST_ART=$id
}
check_artifact "$TD/data/a32.npy" x32.npy float32 '[50,8]'
X=$LAST_ART
check_artifact "$TD/data/b32.npy" y32.npy float32 '[50,6]'
Y=$LAST_ART
check_artifact "$TD/data/a16.npy" x16.npy float16 '[50,4]'
check_artifact "$TD/data/d64.npy" x64.npy float64 '[20,5]'
printf 'plain notes\n' >"$TD/data/notes.txt"
TOKEN=$ALICE upload notes.txt "$TD/data/notes.txt"
expect_eq "non-npy artifact kind" file "$(jbody .kind)"
# Identical bytes under another name: a new artifact, same digest.
TOKEN=$ALICE upload again.npy "$TD/data/a32.npy"
expect_ne "second upload gets its own id" "$X" "$ART_ID"
expect_eq "second upload same sha256" "$(sha256sum "$TD/data/a32.npy" | cut -d' ' -f1)" "$(jbody .sha256)"

# A chunked upload (no Content-Length, as a streaming client sends it).
head -c 150000 /dev/urandom >"$TD/data/stream.bin"
TOKEN=$ALICE api POST "/api/v1/artifacts?name=stream.bin" -H 'Content-Type: application/octet-stream' \
    -H 'Transfer-Encoding: chunked' --data-binary "@$TD/data/stream.bin"
expect_status "chunked upload" 201
expect_eq "chunked upload sha256" "$(sha256sum "$TD/data/stream.bin" | cut -d' ' -f1)" "$(jbody .sha256)"
expect_eq "chunked upload size" 150000 "$(jbody .size)"

# ---- jobs: create, get
spec='{"x": {"artifact": '$X'}, "y": {"artifact": '$Y'}, "kernel": "linear", "debiased": false}'
TOKEN=$ALICE api_json POST /api/v1/jobs '{"kind": "cka", "name": "first", "spec": '"$spec"', "priority": 5}'
expect_status "create job" 201
J1=$(jbody .id)
expect_eq "Location header" "/api/v1/jobs/$J1" "$(header Location)"
expect_eq "new job state" queued "$(jbody .state)"
expect_eq "new job kind" cka "$(jbody .kind)"
expect_eq "new job name" first "$(jbody .name)"
expect_eq "new job owner" alice "$(jbody .owner)"
expect_eq "new job priority" 5 "$(jbody .priority)"
expect_eq "new job attempt" 0 "$(jbody .attempt)"
expect_eq "new job max_attempts default" 3 "$(jbody .max_attempts)"
expect_eq "new job depends_on" '[]' "$(jbody -c .depends_on)"
expect_eq "new job result" null "$(jbody .result)"
expect_eq "new job error" null "$(jbody .error)"
expect_eq "new job worker" null "$(jbody .worker)"
expect_eq "new job started_at" null "$(jbody .started_at)"
expect_match "created_at is RFC 3339 UTC" '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|\+00:00)$' "$(jbody .created_at)"
TOKEN=$BOB api GET "/api/v1/jobs/$J1"
expect_status "another user reads the job" 200
expect_eq "GET returns the same id" "$J1" "$(jbody .id)"
expect_eq "GET returns the spec as submitted" "$(jq -cS . <<<"$spec")" "$(jq -cS .spec <<<"$BODY")"
TOKEN=$ALICE api_json POST /api/v1/jobs '{"kind": "cka", "spec": '"$spec"'}'
expect_status "create job without a name" 201
expect_eq "name defaults to null" null "$(jbody .name)"

# ---- list: more jobs than one page
for i in 1 2 3 4 5; do
    TOKEN=$ALICE submit '{"kind": "cka", "name": "a'$i'", "spec": '"$spec"'}'
done
for i in 1 2; do
    TOKEN=$BOB submit '{"kind": "cka", "name": "b'$i'", "spec": '"$spec"'}'
done
total=$(count_rows jobs)
expect_eq "jobs in the database" 9 "$total"
ids=()
cursor=
pages=0
while :; do
    q="/api/v1/jobs?limit=4"
    [[ -z $cursor ]] || q="$q&cursor=$(jq -rn --arg c "$cursor" '$c|@uri')"
    TOKEN=$ALICE api GET "$q"
    [[ $STATUS == 200 ]] || { it_fail "list page: $STATUS $BODY"; break; }
    n=$(jbody '.items | length')
    ((n <= 4)) || it_fail "page has $n items, limit 4"
    mapfile -t -O "${#ids[@]}" ids < <(jbody '.items[].id')
    pages=$((pages + 1))
    cursor=$(jbody '.next_cursor // empty')
    [[ -n $cursor && $pages -lt 10 ]] || break
done
expect_eq "pages for 9 jobs at limit 4" 3 "$pages"
expect_eq "ids listed across pages" 9 "${#ids[@]}"
expect_eq "no id listed twice" 9 "$(printf '%s\n' "${ids[@]}" | sort -u | wc -l)"
expect_eq "newest first" "$(printf '%s\n' "${ids[@]}" | sort -rn | tr '\n' ' ')" "$(printf '%s\n' "${ids[@]}" | tr '\n' ' ')"
TOKEN=$ALICE api GET "/api/v1/jobs?limit=500"
expect_eq "limit=500 returns all" 9 "$(jbody '.items | length')"
expect_eq "last page has no cursor" null "$(jbody .next_cursor)"
TOKEN=$ALICE api GET "/api/v1/jobs"
expect_eq "default limit lists all 9" 9 "$(jbody '.items | length')"

# ---- filters
TOKEN=$ALICE api GET "/api/v1/jobs?owner=bob"
expect_eq "owner=bob count" 2 "$(jbody '.items | length')"
expect_eq "owner=bob owners" bob "$(jbody '[.items[].owner] | unique | join(",")')"
TOKEN=$ALICE api_json POST "/api/v1/jobs/$J1/cancel" '{}'
expect_status "cancel a queued job" 200
expect_eq "cancelled at once" cancelled "$(jbody .state)"
TOKEN=$ALICE api GET "/api/v1/jobs?state=cancelled"
expect_eq "state=cancelled ids" "$J1" "$(jbody '[.items[].id] | join(",")')"
TOKEN=$ALICE api GET "/api/v1/jobs?state=queued&owner=alice"
expect_eq "state=queued&owner=alice count" 6 "$(jbody '.items | length')"
TOKEN=$ALICE api GET "/api/v1/jobs?kind=cka&limit=2"
expect_eq "kind=cka&limit=2 count" 2 "$(jbody '.items | length')"
expect_ne "kind=cka&limit=2 has a cursor" null "$(jbody .next_cursor)"
TOKEN=$ALICE api GET "/api/v1/jobs?kind=train"
expect_eq "kind=train count" 0 "$(jbody '.items | length')"

TOKEN= api GET /metrics
expect_match "metrics counts queued cka jobs" 'strata_jobs\{[^}]*state="queued"[^}]*\} 8(\.0+)?([^0-9.]|$)' "$BODY"

expect_match "/metrics labels routes by pattern" 'route="/api/v1/jobs/\{id\}"' "$BODY"
if grep -qE "route=\"/api/v1/jobs/$J1\"" <<<"$BODY"; then
    it_fail "/metrics has a raw path as a route label"
else
    it_ok
fi

stop_server
it_done
