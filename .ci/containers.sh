#!/usr/bin/env bash
# Sets up what tests/deploy/ (the container suite) needs, on a Debian machine, as root:
#   1. podman with the runc runtime, and debootstrap (Debian's packages);
#   2. /etc/containers/containers.conf without default ulimits (crun/runc may not raise
#      RLIMIT_NOFILE here);
#   3. the base image $PLAN_ENGINE_BASE_IMAGE (default localhost/plan-engine-base:bookworm):
#      Debian bookworm with python3, python3-venv, python-is-python3 and ca-certificates, made
#      offline by debootstrap (no image registry is reachable) and imported with `podman import`.
# The base image is made once: its root filesystem is kept as a tarball in
# ${PLAN_ENGINE_CONTAINER_CACHE:-~/.cache/plan-engine/containers} (next to the model cache, which
# CI machines keep), so a later run only imports it (seconds) instead of running debootstrap (minutes).
# Not root, or not Debian: says so and exits 0; the container tests then skip, saying why.
# ../shared/containers.md has the background.
set -euo pipefail

BASE_IMAGE=${PLAN_ENGINE_BASE_IMAGE:-localhost/plan-engine-base:bookworm}
CACHE=${PLAN_ENGINE_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/plan-engine/containers}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
TARBALL="$CACHE/debian-$SUITE-python.tar"

say() { echo "containers: $*"; }

if ! command -v podman > /dev/null || ! command -v runc > /dev/null || ! command -v debootstrap > /dev/null; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get > /dev/null; then
        say "podman/runc/debootstrap missing and cannot install them (needs root and apt): the container tests will skip" >&2
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq podman runc debootstrap > /dev/null
fi
say "$(podman --version), runc $(runc --version | head -1 | awk '{print $3}')"

# runc, not crun ("cgroups in hybrid mode not supported" here); no default ulimits (runc cannot
# raise RLIMIT_NOFILE here). Written only where there is no containers.conf, or it is this script's.
CONF=/etc/containers/containers.conf
MARK="# written by plan-engine .ci/containers.sh"
if [ "$(id -u)" -eq 0 ]; then
    if [ ! -s "$CONF" ] || grep -qs "^$MARK" "$CONF"; then
        mkdir -p /etc/containers
        printf '%s: runc (crun fails on this cgroup setup), no default ulimits\n[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' \
            "$MARK" > "$CONF"
    else
        say "$CONF is someone else's: left alone (it needs default_ulimits = [] and runtime = \"runc\" here)" >&2
    fi
fi

if podman image exists "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE: present"
    exit 0
fi
mkdir -p "$CACHE"
if [ ! -s "$TARBALL" ]; then
    [ "$(id -u)" -eq 0 ] || { say "making the base image needs root (debootstrap): the container tests will skip" >&2; exit 0; }
    rootfs=$(mktemp -d /var/tmp/plan-engine-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    say "debootstrap $SUITE ($PACKAGES) from $MIRROR: a few minutes, once"
    start=$(date +%s)
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    # the image's apt reads the same mirror as the host, with its security updates
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
        "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SUITE" > "$rootfs/etc/apt/sources.list"
    # as python:3.11-slim does: no apt lists or caches in the image
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" --numeric-owner -cf "$TARBALL.partial" .
    mv "$TARBALL.partial" "$TARBALL"
    say "debootstrap took $(( $(date +%s) - start )) s; root filesystem cached in $TARBALL"
fi
podman import --change 'CMD ["python3"]' "$TARBALL" "$BASE_IMAGE" > /dev/null
say "base image $BASE_IMAGE imported ($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
