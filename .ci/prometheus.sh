#!/usr/bin/env bash
# Installs Debian's Prometheus (the server and promtool) for tests/test_prometheus.py, which
# starts its own throwaway server on a free loopback port with its own config and storage in a
# temporary directory, scrapes a plan-engine server and queries it. Nothing else: no service is
# started here (a Debian install may start one where systemd runs; the test does not use it).
# Already installed: does nothing. Not root and not installed: says so, and that test skips.
set -euo pipefail

installed() {
    command -v prometheus > /dev/null && command -v promtool > /dev/null
}

if installed; then
    echo "prometheus: installed ($(prometheus --version 2>&1 | head -1))"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "prometheus: not installed, and installing needs root: tests/test_prometheus.py will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus > /dev/null
installed
echo "prometheus: installed ($(prometheus --version 2>&1 | head -1))"
