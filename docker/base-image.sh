#!/usr/bin/env bash
# Builds a local stand-in for python:3.11-slim where no image registry can be reached:
# Debian bookworm (its python3 is 3.11) from debootstrap, python3 + a venv first on PATH so
# `python`, `python3` and `pip` work as they do in python:3.11-slim.
#
#   sudo docker/base-image.sh [--force]      # tags localhost/thaw-base:py3.11-bookworm
#
# Needs root and debootstrap (apt-get install debootstrap), and network access to the Debian
# mirror (MIRROR, default http://deb.debian.org/debian). CONTAINER_ENGINE: podman (default
# when installed) or docker. Idempotent: an existing stand-in is kept unless --force.
set -euo pipefail

TAG=${THAW_BASE_TAG:-localhost/thaw-base:py3.11-bookworm}
ROOTFS_TAG=${THAW_ROOTFS_TAG:-localhost/thaw-base:bookworm-minbase}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
FORCE=0
[[ ${1:-} == --force ]] && FORCE=1

say() { printf 'base-image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

ENGINE=${CONTAINER_ENGINE:-}
if [[ -z $ENGINE ]]; then
    if command -v podman >/dev/null; then ENGINE=podman
    elif command -v docker >/dev/null; then ENGINE=docker
    else die "no container engine: install podman (apt-get install podman runc)"; fi
fi
# Podman here refuses rlimits above the machine's own; docker needs no flags. Plain podman
# builds have no route out on these machines: the host's network reaches the mirror.
ENGINE_FLAGS=()
BUILD_FLAGS=()
if [[ $ENGINE == podman ]]; then
    ENGINE_FLAGS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
    BUILD_FLAGS=(--network host --pull=never)
fi

exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

if exists "$TAG" && [[ $FORCE == 0 ]]; then
    say "$TAG already exists (--force rebuilds it)"
    exit 0
fi

work=$(mktemp -d /var/tmp/thaw-base.XXXXXX)
trap 'rm -rf "$work"' EXIT

if ! exists "$ROOTFS_TAG" || [[ $FORCE == 1 ]]; then
    [[ $(id -u) == 0 ]] || die "debootstrap needs root (run it with sudo)"
    command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
    say "debootstrap --variant=minbase bookworm from $MIRROR (about 30 s)"
    debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
    # The sources debian:bookworm-slim has: main, updates and security.
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
        "$MIRROR" "$MIRROR" "$SECURITY_MIRROR" >"$work/rootfs/etc/apt/sources.list"
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    tar -C "$work/rootfs" -c . | "$ENGINE" import --change 'CMD ["/bin/bash"]' - "$ROOTFS_TAG" >/dev/null
    rm -rf "$work/rootfs"
    say "imported $ROOTFS_TAG"
fi

mkdir "$work/context"
cat >"$work/context/Containerfile" <<EOF
FROM $ROOTFS_TAG
ENV LANG=C.UTF-8
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
        python3 python3-venv python3-wheel-whl ca-certificates >/dev/null \\
 && rm -rf /var/lib/apt/lists/* \\
 && python3 -m venv /usr/local/python \\
 && /usr/local/python/bin/pip install -q --no-index --find-links /usr/share/python-wheels wheel \\
 && /usr/local/python/bin/python -c "import sys; assert sys.version_info[:2] == (3, 11)"
# As in python:3.11-slim: python, python3, pip (with setuptools and wheel) on PATH, installing
# into one environment.
ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["python3"]
EOF
say "building $TAG on $ROOTFS_TAG (apt-get install python3 python3-venv)"
"$ENGINE" build "${ENGINE_FLAGS[@]}" "${BUILD_FLAGS[@]}" -t "$TAG" "$work/context"
say "built $TAG"
