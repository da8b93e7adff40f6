#!/usr/bin/env bash
# Installs Debian's PostgreSQL server for the tests (tests/postgres_server.py), which start their own
# throwaway cluster (initdb + pg_ctl in a temporary directory, on a free loopback port, as the
# `postgres` user when run as root) and removes it. Nothing else: no cluster is set up here.
set -euo pipefail

installed() {
    compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" > /dev/null || command -v pg_ctl > /dev/null
}

version() {
    compgen -G '/usr/lib/postgresql/*/bin' | tr '\n' ' '
}

# shellcheck source=.ci/debian-package.sh
source "$(dirname "$0")/debian-package.sh"
ensure_package postgres postgresql tests/engine/control/test_postgres_plan_store.py
