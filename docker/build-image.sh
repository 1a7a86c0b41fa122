#!/usr/bin/env bash
# Builds, names and pushes the thaw image with podman or docker (the Makefile's image targets).
#
#   docker/build-image.sh build       build $IMAGE from docker/Dockerfile
#   docker/build-image.sh if-engine   build it if an engine answers; else say why and skip
#                                     (fails instead when CI=true)
#   docker/build-image.sh push        push $IMAGE
#   docker/build-image.sh engine      print the engine that would be used
#
# Environment (the Makefile sets it): IMAGE (default ghcr.io/thaw-ml/thaw:<version>),
# VERSION (pyproject's), BASE_IMAGE (python:3.11-slim), PREFETCH_BACKBONES (timm model names
# whose hub weights to bake in), CONTAINER_ENGINE (podman or docker; found when empty),
# EXTRA_BUILD_ARGS (more flags for `build`, word-split).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEFAULT_BASE=python:3.11-slim
STAND_IN=localhost/thaw-base:py3.11-bookworm
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -1)}
IMAGE=${IMAGE:-ghcr.io/thaw-ml/thaw:$VERSION}
BASE_IMAGE=${BASE_IMAGE:-$DEFAULT_BASE}
PREFETCH_BACKBONES=${PREFETCH_BACKBONES:-}

say() { printf 'image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# The engine: CONTAINER_ENGINE, else podman if it answers, else docker if it answers. Sets
# ENGINE, or WHY (and returns 1) when none does.
find_engine() {
    ENGINE=${CONTAINER_ENGINE:-} WHY=
    if [[ -n $ENGINE ]]; then
        command -v "$ENGINE" >/dev/null || { WHY="CONTAINER_ENGINE=$ENGINE is not installed"; return 1; }
        "$ENGINE" info >/dev/null 2>&1 || { WHY="'$ENGINE info' fails"; return 1; }
        return 0
    fi
    for ENGINE in podman docker; do
        command -v "$ENGINE" >/dev/null && "$ENGINE" info >/dev/null 2>&1 && return 0
    done
    ENGINE=
    WHY="no container engine: podman is not installed"
    command -v podman >/dev/null && WHY="no container engine: 'podman info' fails"
    if command -v docker >/dev/null; then WHY="$WHY and 'docker info' fails (no daemon?)"
    else WHY="$WHY and docker is not installed"; fi
    WHY="$WHY; install podman (apt-get install podman runc) or set CONTAINER_ENGINE"
    return 1
}

engine_or_die() { find_engine || die "$WHY"; }

exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# The base image: present, pulled, or (for the default python:3.11-slim where no registry
# answers) the Debian stand-in that docker/base-image.sh builds.
resolve_base() {
    exists "$BASE_IMAGE" && return 0
    say "pulling $BASE_IMAGE"
    "$ENGINE" pull "$BASE_IMAGE" >/dev/null 2>&1 && return 0
    [[ $BASE_IMAGE == "$DEFAULT_BASE" ]] || die "base image $BASE_IMAGE is not here and cannot be pulled"
    say "$DEFAULT_BASE is not here and cannot be pulled (no registry reachable):"
    say "building on the local stand-in $STAND_IN instead (docker/base-image.sh)"
    CONTAINER_ENGINE=$ENGINE "$ROOT/docker/base-image.sh"
    BASE_IMAGE=$STAND_IN
}

# What pip needs to reach its index from inside a build, taken from the host: index URLs
# (file:// ones cannot be seen from a build and are left out) and, with podman, the CA bundle
# (mounted read-only at the same path) for networks that intercept TLS.
pip_flags() {
    local pip key value url kept
    pip=$(command -v pip3 || command -v pip || true)
    for key in index-url extra-index-url trusted-host cert; do
        local var=PIP_${key//-/_}; var=${var^^}
        value=${!var:-}
        [[ -z $value && -n $pip ]] && value=$("$pip" config get "global.$key" 2>/dev/null || true)
        [[ -n $value ]] || continue
        if [[ $key == *index-url ]]; then
            kept=()
            for url in $value; do
                [[ $url == file:* ]] || kept+=("$url")
            done
            value=${kept[*]:-}
            [[ -n $value ]] || continue
        fi
        if [[ $key == cert ]]; then
            [[ $ENGINE == podman && -f $value ]] || continue
            BUILD+=(-v "$value:$value:ro")
        fi
        BUILD+=(--build-arg "$var=$value")
    done
}

cmd_build() {
    engine_or_die
    resolve_base
    BUILD=("$ENGINE" build -f "$ROOT/docker/Dockerfile" -t "$IMAGE"
           --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VERSION=$VERSION"
           --build-arg "PREFETCH_BACKBONES=$PREFETCH_BACKBONES")
    if [[ $ENGINE == podman ]]; then
        # Rlimits no higher than the machine's own (raising them is refused here); the host's
        # network (a plain build has no route out here); the base is resolved above.
        BUILD+=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --network host --pull=never)
    else
        export DOCKER_BUILDKIT=1   # RUN --mount=type=cache
    fi
    pip_flags
    # shellcheck disable=SC2206  # word-split on purpose
    BUILD+=(${EXTRA_BUILD_ARGS:-} "$ROOT")
    say "building $IMAGE on $BASE_IMAGE with $ENGINE"
    local start=$SECONDS size
    "${BUILD[@]}"
    size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")
    say "built $IMAGE in $((SECONDS - start)) s; $(awk -v b="$size" 'BEGIN {printf "%.2f GB", b / 1e9}')"
}

case ${1:-build} in
    build) cmd_build ;;
    if-engine)
        if find_engine; then
            cmd_build
        elif [[ ${CI:-} == true ]]; then
            die "CI=true needs the container tier (tests/container), but $WHY"
        else
            say "container tier will be skipped (tests/container skip): $WHY"
        fi ;;
    push)
        engine_or_die
        exists "$IMAGE" || die "$IMAGE is not built (make image)"
        say "pushing $IMAGE with $ENGINE"
        "$ENGINE" push "$IMAGE" ;;
    engine) engine_or_die; echo "$ENGINE" ;;
    *) die "unknown command ${1} (build, if-engine, push, engine)" ;;
esac
