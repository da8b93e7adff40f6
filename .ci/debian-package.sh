#!/usr/bin/env bash
# Sourced by the .ci/<tool>.sh installers: `ensure_package NAME PACKAGE SKIPS` installs Debian's
# PACKAGE unless the caller's `installed` function already succeeds, then prints `version`.
# Already installed: does nothing. Not root and not installed: says that SKIPS will skip, exits 0.
ensure_package() {
    local name=$1 package=$2 skips=$3
    if installed; then
        echo "$name: installed ($(version))"
        exit 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "$name: not installed, and installing needs root: $skips will skip" >&2
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$package" > /dev/null
    installed
    echo "$name: installed ($(version))"
}
