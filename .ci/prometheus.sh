#!/usr/bin/env bash
# Installs Debian's Prometheus (the server and promtool) for tests/services/test_prometheus.py, which
# starts its own throwaway server on a free loopback port with its own config and storage in a
# temporary directory, scrapes a plan-engine server and queries it. Nothing else: no service is
# started here (a Debian install may start one where systemd runs; the test does not use it).
set -euo pipefail

installed() {
    command -v prometheus > /dev/null && command -v promtool > /dev/null
}

version() {
    prometheus --version 2>&1 | head -1
}

# shellcheck source=.ci/debian-package.sh
source "$(dirname "$0")/debian-package.sh"
ensure_package prometheus prometheus tests/services/test_prometheus.py
