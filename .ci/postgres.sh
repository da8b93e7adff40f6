#!/usr/bin/env bash
# Installs Debian's PostgreSQL server for tests/test_postgres_store.py, which starts its own
# throwaway cluster (initdb + pg_ctl in a temporary directory, on a free loopback port, as the
# `postgres` user when run as root) and removes it. Nothing else: no cluster is set up here.
# Already installed: does nothing. Not root and not installed: says so, and those tests skip.
set -euo pipefail

installed() {
    compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" > /dev/null || command -v pg_ctl > /dev/null
}

if installed; then
    echo "postgres: installed ($(compgen -G '/usr/lib/postgresql/*/bin' | tr '\n' ' '))"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "postgres: not installed, and installing needs root: tests/test_postgres_store.py will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql > /dev/null
installed
echo "postgres: installed ($(compgen -G '/usr/lib/postgresql/*/bin' | tr '\n' ' '))"
