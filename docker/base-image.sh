#!/usr/bin/env bash
# Builds a local stand-in for python:3.11-slim where no image registry can be reached:
# Debian bookworm (its python3 is 3.11) from debootstrap, python3 + a venv first on PATH so
# `python`, `python3` and `pip` work as they do in python:3.11-slim.
#
#   sudo docker/base-image.sh [--force]      # tags localhost/thaw-base:py3.11-bookworm
#   docker/base-image.sh --print-mirrors     # the two mirrors it would use, then exit
#
# Needs root and debootstrap (apt-get install debootstrap), and network access to a Debian
# mirror: MIRROR (bookworm) and SECURITY_MIRROR (bookworm-security), each by default the first
# source serving that suite in this machine's own apt configuration (APT_ETC, default
# /etc/apt: sources.list, sources.list.d/*.list and deb822 *.sources). CONTAINER_ENGINE: podman
# (default when installed) or docker. Idempotent: an existing stand-in is kept unless --force.
set -euo pipefail

TAG=${THAW_BASE_TAG:-localhost/thaw-base:py3.11-bookworm}
ROOTFS_TAG=${THAW_ROOTFS_TAG:-localhost/thaw-base:bookworm-minbase}
SUITE=bookworm
APT_ETC=${APT_ETC:-/etc/apt}
FORCE=0 PRINT_MIRRORS=0
for arg in "$@"; do
    case $arg in
        --force) FORCE=1 ;;
        --print-mirrors) PRINT_MIRRORS=1 ;;
        *) printf 'usage: %s [--force | --print-mirrors]\n' "$0" >&2; exit 2 ;;
    esac
done

say() { printf 'base-image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Every enabled `deb` source of this machine's apt as "URI SUITE" lines, one per suite: the
# one-line format (options in brackets dropped) and the deb822 format (Enabled: no skipped).
apt_sources() {
    local file
    for file in "$APT_ETC/sources.list" "$APT_ETC"/sources.list.d/*.list; do
        [[ -f $file ]] || continue
        sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$file" | awk '$1 == "deb" { print $2, $3 }'
    done
    for file in "$APT_ETC"/sources.list.d/*.sources; do
        [[ -f $file ]] || continue
        awk '
            function flush(  n, uris, suites, j) {
                if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no") {
                    split(uri, uris, " "); n = split(suite, suites, " ")
                    for (j = 1; j <= n; j++) print uris[1], suites[j]
                }
                types = uri = suite = field = ""; enabled = "yes"
            }
            BEGIN { enabled = "yes" }
            /^#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ { value = $0 }
            /^[^ \t]/ {
                colon = index($0, ":")
                field = tolower(substr($0, 1, colon - 1)); value = substr($0, colon + 1)
            }
            field == "types" { types = types " " value }
            field == "uris" { uri = uri " " value }
            field == "suites" { suite = suite " " value }
            field == "enabled" { gsub(/[ \t]/, "", value); enabled = value }
            END { flush() }
        ' "$file"
    done
}

# The URI of the first apt source serving suite $1, without a trailing slash.
# (awk reads to the end: an early exit would fail the pipe under pipefail).
apt_mirror() {
    apt_sources | awk -v suite="$1" \
        '$2 == suite && !found { sub(/\/+$/, "", $1); print $1; found = 1 }'
}

no_mirror() {
    local found
    found=$(apt_sources | sed 's/^/    /')
    die "no apt source for suite $1 in $APT_ETC (sources.list, sources.list.d/*.list, *.sources);
set $2 to a Debian mirror's URL. Sources found:
${found:-    none}"
}

# Sets MIRROR and SECURITY_MIRROR (given, else from apt), or dies saying which is missing.
resolve_mirrors() {
    MIRROR=${MIRROR:-$(apt_mirror "$SUITE")}
    [[ -n $MIRROR ]] || no_mirror "$SUITE" MIRROR
    SECURITY_MIRROR=${SECURITY_MIRROR:-$(apt_mirror "$SUITE-security")}
    [[ -n $SECURITY_MIRROR ]] || no_mirror "$SUITE-security" SECURITY_MIRROR
}

if [[ $PRINT_MIRRORS == 1 ]]; then
    resolve_mirrors
    printf 'MIRROR=%s\nSECURITY_MIRROR=%s\n' "$MIRROR" "$SECURITY_MIRROR"
    exit 0
fi

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
    resolve_mirrors
    say "debootstrap --variant=minbase $SUITE from $MIRROR (about 30 s)"
    debootstrap --variant=minbase "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
    # The sources debian:bookworm-slim has: main, updates and security.
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
        "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SECURITY_MIRROR" "$SUITE" \
        >"$work/rootfs/etc/apt/sources.list"
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
