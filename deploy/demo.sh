#!/usr/bin/env bash
# demo.sh - `make demo`: the product in one command.
#
# Starts the local stack (deploy/stack.sh up), makes activations of 12 layers
# of a "base" and a "tuned" model (deploy/demo_data.py), uploads them, submits
# one linear CKA job per layer (plus a debiased one for the last layer), waits
# for all of them and prints the layer table. Leaves the stack running.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
export BUILD=${BUILD:-build}
export STRATA_HOME=$(realpath -m -- "${STRATA_HOME:-$REPO/var}")
LAYERS=${DEMO_LAYERS:-12}

"$REPO/deploy/stack.sh" up

# shellcheck disable=SC1091
source "$STRATA_HOME/env"
AUTH="Authorization: Bearer $STRATA_TOKEN"

# api METHOD PATH [CURL ARGS...] : prints the body; fails on HTTP >= 400.
api() {
    local method=$1 path=$2
    shift 2
    curl -sS --fail-with-body --max-time 120 -X "$method" -H "$AUTH" "$@" "$STRATA_URL$path"
}

data=$STRATA_HOME/demo
echo "demo: generating activations of $LAYERS layers (N=2000, D=256) in $data"
/usr/bin/python3 "$REPO/deploy/demo_data.py" "$data" --layers "$LAYERS"

declare -a JOBS
for ((l = 1; l <= LAYERS; l++)); do
    ll=$(printf '%02d' "$l")
    bx=$(api POST "/api/v1/artifacts?name=base_$ll.npy" -H 'Content-Type: application/octet-stream' \
        --data-binary "@$data/base_$ll.npy" | jq -r .id)
    ty=$(api POST "/api/v1/artifacts?name=tuned_$ll.npy" -H 'Content-Type: application/octet-stream' \
        --data-binary "@$data/tuned_$ll.npy" | jq -r .id)
    JOBS[l]=$(api POST /api/v1/jobs -H 'Content-Type: application/json' --data-binary \
        '{"kind": "cka", "name": "demo layer '"$l"'", "spec": {"x": {"artifact": '"$bx"'}, "y": {"artifact": '"$ty"'}, "kernel": "linear"}}' |
        jq -r .id)
    if ((l == LAYERS)); then
        DEBIASED=$(api POST /api/v1/jobs -H 'Content-Type: application/json' --data-binary \
            '{"kind": "cka", "name": "demo layer '"$l"' debiased", "spec": {"x": {"artifact": '"$bx"'}, "y": {"artifact": '"$ty"'}, "debiased": true}}' |
            jq -r .id)
    fi
done
echo "demo: submitted jobs ${JOBS[1]}..${JOBS[LAYERS]} and $DEBIASED (debiased); waiting"

# Waits for one job to finish; prints its final JSON.
wait_job() {
    local id=$1 i body state
    for ((i = 0; i < 3000; i++)); do
        body=$(api GET "/api/v1/jobs/$id")
        state=$(jq -r .state <<<"$body")
        case $state in
        succeeded | failed | cancelled)
            printf '%s\n' "$body"
            return 0
            ;;
        esac
        sleep 0.2
    done
    echo "demo: job $id did not finish in 10 minutes" >&2
    return 1
}

bar() { # a crude bar: 40 columns = CKA 1.0
    local v=$1 n
    n=$(awk -v v="$v" 'BEGIN { n = int(v * 40 + 0.5); if (n < 0) n = 0; if (n > 40) n = 40; print n }')
    printf '%*s' "$n" '' | tr ' ' '#'
}

echo
printf '%5s  %8s  %5s  %s\n' layer cka n ""
failed=0
for ((l = 1; l <= LAYERS; l++)); do
    body=$(wait_job "${JOBS[l]}")
    if [[ $(jq -r .state <<<"$body") != succeeded ]]; then
        printf '%5d  %s: %s\n' "$l" "$(jq -r .state <<<"$body")" "$(jq -r .error <<<"$body")"
        failed=1
        continue
    fi
    cka=$(jq -r '.result.layers[0].cka' <<<"$body")
    n=$(jq -r '.result.layers[0].n' <<<"$body")
    printf '%5d  %8.4f  %5d  %s\n' "$l" "$cka" "$n" "$(bar "$cka")"
done
body=$(wait_job "$DEBIASED")
if [[ $(jq -r .state <<<"$body") == succeeded ]]; then
    printf 'layer %d, debiased CKA: %.4f\n' "$LAYERS" "$(jq -r '.result.layers[0].cka' <<<"$body")"
else
    echo "debiased job: $(jq -r '.state + ": " + (.error // "")' <<<"$body")"
    failed=1
fi

stop="make down"
[[ $STRATA_HOME == "$REPO/var" ]] || stop="STRATA_HOME=$STRATA_HOME make down"
cat <<EOF

The base and tuned models agree in early layers and drift apart with depth.
The API is at $STRATA_URL; an admin token is in $STRATA_HOME/admin.token.
  source $STRATA_HOME/env
  curl -H "Authorization: Bearer \$STRATA_TOKEN" "\$STRATA_URL/api/v1/jobs?limit=5"
  curl -H "Authorization: Bearer \$STRATA_TOKEN" "\$STRATA_URL/api/v1/jobs/${JOBS[1]}"
The stack keeps running; \`$stop\` stops it.
EOF
exit "$failed"
