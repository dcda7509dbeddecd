#!/usr/bin/env bash
# install-deps.sh - installs what strata needs to build, test and run on Debian.
#
# Fast and offline when everything is already there (dpkg-query only); runs
# `apt-get update` only when a package is missing. As root it also creates the
# unprivileged system user `strata` that runs PostgreSQL, the server and the
# workers (the server refuses to run as root).
set -euo pipefail

PACKAGES=(build-essential pkg-config libmicrohttpd-dev libpq-dev libjansson-dev
          libopenblas-dev libcurl4-openssl-dev libssl-dev libcmocka-dev postgresql
          curl jq python3 python3-numpy)

missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
    # "ii " = desired install, currently installed; anything else needs apt.
    if [[ "$status" != ii* ]]; then
        missing+=("$p")
    fi
done

if ((${#missing[@]} > 0)); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-deps: missing packages: ${missing[*]}" >&2
        echo "install-deps: run as root, or: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [[ $(id -u) -eq 0 ]] && ! getent passwd strata >/dev/null; then
    nologin=/usr/sbin/nologin
    [[ -x $nologin ]] || nologin=/bin/false
    # Another script may create it at the same moment: only a missing user is an error.
    useradd --system --no-create-home --home-dir /nonexistent --shell "$nologin" \
        --user-group strata || getent passwd strata >/dev/null
    echo "install-deps: created system user strata" >&2
fi
exit 0
