#!/usr/bin/env bash
# End to end on a real Kubeflow Pipelines backend in kind, the way kubeflow/pipelines tests
# itself (.github/workflows/e2e-test.yml and .github/resources/scripts/ at its release tags):
# a kind cluster, KFP standalone (manifests/kustomize/env/platform-agnostic) at one release,
# the thaw and MLflow images built here and loaded into kind, thaw's infra (the overlay of the
# release's object store, infra/overlays/minio up to 2.15 and infra/overlays/seaweedfs from 2.16,
# in KFP's namespace `kubeflow`), the committed sample uploaded to the in-cluster object store
# under the overlay's prefix, then `thaw submit --wait` of the demo's parameters
# (efficientnet_lite0, packaged weights) with that data_uri and the overlay's pipeline root.
#
#   infra/ci/e2e-kind.sh [KFP_VERSION]       or   make e2e-kind KFP_VERSION=2.17.0
#   infra/ci/e2e-kind.sh --print-version [KFP_VERSION]   the release it would install, then exit
#
# KFP_VERSION: a KFP release tag, or `minimum` (the default): MIN_KFP_BACKEND of
# pipelines/thaw_pipeline.py. Needs kind, kubectl and docker (a running daemon), and network
# access to GitHub (KFP's manifests) and the images' registries. Environment:
#   CLUSTER_NAME     kind cluster (default thaw-e2e); an existing one is reused and kept
#   KIND_NODE_IMAGE  kindest/node image (default: kind's own)
#   KEEP_CLUSTER=1   keep a cluster this script created (default: delete it at the end)
#   ARTIFACTS_DIR    where the cluster's state and logs go when it fails (default: a new
#                    folder under /tmp, named at the end)
#   RUN_TIMEOUT_S    how long `thaw submit --wait` follows the run (default 3600)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NAMESPACE=kubeflow
CLUSTER_NAME=${CLUSTER_NAME:-thaw-e2e}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-3600}
THAW_IMAGE=thaw-e2e/thaw:e2e
MLFLOW_IMAGE=thaw-e2e/thaw-mlflow:e2e
CREATED_CLUSTER=0
PORT_FORWARD_PID=

say() { printf 'e2e-kind: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

require_tools() {
    local missing=() tool
    for tool in kind kubectl docker; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [[ ${#missing[@]} == 0 ]] || die "missing ${missing[*]}: this run needs kind, kubectl and" \
        "docker on PATH (kind creates the cluster in docker)"
    docker info >/dev/null 2>&1 || die "'docker info' fails: start the docker daemon"
}

# The KFP release to install: a tag as given, or `minimum`, read from the pipeline's own gate.
kfp_version() {
    local version=${1:-minimum}
    if [[ $version == minimum ]]; then
        version=$(sed -n 's/^MIN_KFP_BACKEND[^=]*= *"\([^"]*\)".*/\1/p' \
            "$ROOT/pipelines/thaw_pipeline.py")
        [[ -n $version ]] || die "no MIN_KFP_BACKEND in pipelines/thaw_pipeline.py"
    fi
    [[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "KFP_VERSION '$version' is not a release tag"
    echo "$version"
}

create_cluster() {
    if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
        say "reusing kind cluster $CLUSTER_NAME"
    else
        say "creating kind cluster $CLUSTER_NAME"
        kind create cluster --name "$CLUSTER_NAME" --wait 120s \
            ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
        CREATED_CLUSTER=1
    fi
    kubectl config use-context "kind-$CLUSTER_NAME" >/dev/null
}

# KFP standalone as manifests/kustomize/README.md (env/platform-agnostic) says at the tag.
install_kfp() {
    local source="github.com/kubeflow/pipelines/manifests/kustomize"
    say "installing Kubeflow Pipelines $1 (standalone, platform-agnostic)"
    kubectl apply -k "$source/cluster-scoped-resources?ref=$1"
    kubectl wait crd/applications.app.k8s.io --for condition=established --timeout=60s
    kubectl apply -k "$source/env/platform-agnostic?ref=$1"
    kubectl -n "$NAMESPACE" wait deployment --all --for condition=Available --timeout=20m
}

build_and_load_images() {
    say "building $THAW_IMAGE and $MLFLOW_IMAGE"
    IMAGE=$THAW_IMAGE CONTAINER_ENGINE=docker "$ROOT/docker/build-image.sh" build
    docker build -q -f "$ROOT/infra/mlflow.Dockerfile" -t "$MLFLOW_IMAGE" "$ROOT/infra" >/dev/null
    kind load docker-image --name "$CLUSTER_NAME" "$THAW_IMAGE" "$MLFLOW_IMAGE"
}

# The overlay of the release's object store: KFP 2.16 and later serve it as service `seaweedfs`
# only (third-party/seaweedfs/base/seaweedfs/seaweedfs-service.yaml, port 9000, at 2.16.0);
# 2.14 ships MinIO and 2.15.0 kept `minio-service` (third-party/seaweedfs/base/seaweedfs/
# minio-service.yaml at 2.15.0).
overlay_for() {
    local major minor
    IFS=. read -r major minor _ <<<"$1"
    if (( major > 2 || (major == 2 && minor >= 16) )); then echo seaweedfs; else echo minio; fi
}

# A kustomization at $1 of infra/overlays/$2 in KFP's namespace with the images built here.
# (Standalone KFP has one object-store key for all: the seaweedfs overlay's per-profile prefix,
# private/kubeflow-user-example-com/, is just a prefix here.)
write_overlay() {
    local base
    mkdir -p "$1"
    base=$(realpath --relative-to="$1" "$ROOT/infra/overlays/$2")
    cat >"$1/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: $NAMESPACE
resources:
  - $base
images:
  - {name: REGISTRY/thaw-mlflow, newName: ${MLFLOW_IMAGE%:*}, newTag: ${MLFLOW_IMAGE##*:}}
  - {name: ghcr.io/thaw-ml/thaw, newName: ${THAW_IMAGE%:*}, newTag: ${THAW_IMAGE##*:}}
EOF
}

# thaw's infra (infra/README.md, "Apply") in KFP's own namespace, with the images built here;
# $1: the overlay.
apply_thaw_infra() {
    local overlay=$WORK/overlay access secret
    access=$(kubectl -n "$NAMESPACE" get secret mlpipeline-minio-artifact \
        -o jsonpath='{.data.accesskey}' | base64 -d)
    secret=$(kubectl -n "$NAMESPACE" get secret mlpipeline-minio-artifact \
        -o jsonpath='{.data.secretkey}' | base64 -d)
    kubectl -n "$NAMESPACE" create secret generic thaw-s3-credentials \
        --from-literal=AWS_ACCESS_KEY_ID="$access" --from-literal=AWS_SECRET_ACCESS_KEY="$secret" \
        --dry-run=client -o yaml | kubectl apply -f -
    kubectl -n "$NAMESPACE" get secret mlflow-postgres >/dev/null 2>&1 \
        || kubectl -n "$NAMESPACE" create secret generic mlflow-postgres \
            --from-literal=POSTGRES_PASSWORD="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
    write_overlay "$overlay" "$1"
    say "applying infra/overlays/$1 in namespace $NAMESPACE"
    kubectl apply -k "$overlay"
    kubectl -n "$NAMESPACE" wait --for=condition=complete job/thaw-buckets --timeout=10m
    kubectl -n "$NAMESPACE" rollout status statefulset/mlflow-postgres --timeout=10m
    kubectl -n "$NAMESPACE" rollout status deployment/mlflow --timeout=10m
}

# Where the overlay keeps thaw's data: the prefix of its checkpoints (<prefix>/checkpoints) and
# its pipeline root; sets DATA_URI (<prefix>/datasets/...) and PIPELINE_ROOT.
read_layout() {
    local checkpoints
    checkpoints=$(kubectl -n "$NAMESPACE" get configmap thaw-config \
        -o jsonpath='{.data.THAW_CHECKPOINT_URI}')
    DATA_URI=${checkpoints%/checkpoints}/datasets/fashion-mnist-sample
    PIPELINE_ROOT=$(kubectl -n "$NAMESPACE" get configmap kfp-launcher \
        -o jsonpath='{.data.defaultPipelineRoot}')
}

# The committed sample to $DATA_URI, from a pod in the thaw image: the object store is reached
# as the pipeline's steps reach it.
upload_sample() {
    local endpoint
    endpoint=$(kubectl -n "$NAMESPACE" get configmap thaw-config \
        -o jsonpath='{.data.AWS_ENDPOINT_URL}')
    say "uploading the sample dataset to $DATA_URI through $endpoint"
    kubectl -n "$NAMESPACE" delete pod thaw-e2e-sample --ignore-not-found >/dev/null
    kubectl -n "$NAMESPACE" run thaw-e2e-sample --image="$THAW_IMAGE" --restart=Never --rm -i \
        --pod-running-timeout=10m --env="AWS_ENDPOINT_URL=$endpoint" \
        --env="AWS_DEFAULT_REGION=us-east-1" \
        --env="AWS_ACCESS_KEY_ID=$(secret_value AWS_ACCESS_KEY_ID)" \
        --env="AWS_SECRET_ACCESS_KEY=$(secret_value AWS_SECRET_ACCESS_KEY)" \
        --command -- python -c \
        "from thawctl.local_run import upload_sample; print('uploaded', upload_sample('$DATA_URI'))"
}

secret_value() {
    kubectl -n "$NAMESPACE" get secret thaw-s3-credentials -o "jsonpath={.data.$1}" | base64 -d
}

# kubectl port-forward to the API server (ml-pipeline:8888) on a free local port; sets API_URL.
forward_api() {
    local log=$WORK/port-forward.log port=
    kubectl -n "$NAMESPACE" port-forward service/ml-pipeline :8888 >"$log" 2>&1 &
    PORT_FORWARD_PID=$!
    for _ in $(seq 60); do
        port=$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$log" | head -1)
        [[ -n $port ]] && break
        sleep 1
    done
    [[ -n $port ]] || { cat "$log" >&2; die "kubectl port-forward to ml-pipeline did not start"; }
    API_URL=http://127.0.0.1:$port
}

# Cluster settings for kind: no GPU, limits that fit a CI runner, the image built here.
write_settings() {
    cat >"$WORK/cluster.yaml" <<EOF
image: $THAW_IMAGE
pipeline_root: $PIPELINE_ROOT
gpu: {count: 0}
steps:
  preprocess: {cpu: "2", memory: 4G}
  train: {cpu: "2", memory: 6G}
  evaluate: {cpu: "2", memory: 4G}
  register: {cpu: "1", memory: 4G}
EOF
}

# `thaw submit --wait` from the thaw image on the host's network (the port-forward), with the
# demo's parameters (thawctl/local_run.py DEMO_PARAMETERS) reading $DATA_URI.
submit_and_wait() {
    say "thaw submit --wait to $API_URL (KFP $1)"
    docker run --rm --network host -v "$WORK:$WORK:ro" "$THAW_IMAGE" sh -c '
        python -c "
import sys, yaml
from thawctl.local_run import DEMO_PARAMETERS
yaml.safe_dump(dict(DEMO_PARAMETERS, data_uri=sys.argv[1]), sys.stdout)" "$5" \
            >/tmp/params.yaml
        exec thaw submit --config "$1" --params-file /tmp/params.yaml --host "$2" \
            --run-name "$3" --wait --timeout "$4" --poll-interval 10' \
        submit "$WORK/cluster.yaml" "$API_URL" "thaw e2e kind KFP $1" "$RUN_TIMEOUT_S" \
        "$DATA_URI"
}

# The state of the cluster, as kubeflow/pipelines' collect-logs.sh gathers it: pods, their
# descriptions and logs (all containers, the previous attempt's too), events, Argo workflows.
collect_logs() {
    mkdir -p "$ARTIFACTS_DIR"
    say "collecting the cluster's state into $ARTIFACTS_DIR"
    kubectl get pods -A -o wide >"$ARTIFACTS_DIR/pods.txt" 2>&1 || true
    kubectl get events -A --sort-by=.lastTimestamp >"$ARTIFACTS_DIR/events.txt" 2>&1 || true
    kubectl -n "$NAMESPACE" describe pods >"$ARTIFACTS_DIR/describe-pods.txt" 2>&1 || true
    kubectl -n "$NAMESPACE" get workflows.argoproj.io -o yaml \
        >"$ARTIFACTS_DIR/workflows.yaml" 2>&1 || true
    local pod
    for pod in $(kubectl -n "$NAMESPACE" get pods -o name 2>/dev/null); do
        kubectl -n "$NAMESPACE" logs "$pod" --all-containers --prefix \
            >"$ARTIFACTS_DIR/logs-${pod#pod/}.txt" 2>&1 || true
        kubectl -n "$NAMESPACE" logs "$pod" --all-containers --prefix --previous \
            >>"$ARTIFACTS_DIR/logs-${pod#pod/}.txt" 2>/dev/null || true
    done
    kind export logs --name "$CLUSTER_NAME" "$ARTIFACTS_DIR/kind" >/dev/null 2>&1 || true
}

finish() {
    local status=$?
    if [[ -n $PORT_FORWARD_PID ]]; then kill "$PORT_FORWARD_PID" 2>/dev/null || true; fi
    if [[ $status != 0 ]] && kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
        collect_logs
    fi
    if [[ $CREATED_CLUSTER == 1 && ${KEEP_CLUSTER:-0} != 1 ]]; then
        kind delete cluster --name "$CLUSTER_NAME" >/dev/null 2>&1 || true
    fi
    if [[ $status == 0 ]]; then
        rm -rf "$WORK"
        say "passed"
    else
        say "FAILED (exit $status); the cluster's state and logs are in $ARTIFACTS_DIR"
    fi
    exit "$status"
}

main() {
    local version
    if [[ ${1:-} == --print-version ]]; then
        kfp_version "${2:-${KFP_VERSION:-}}"
        return
    fi
    require_tools
    version=$(kfp_version "${1:-${KFP_VERSION:-}}")
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/thaw-e2e-kind.XXXXXX")
    chmod 755 "$WORK"  # the thaw image's user (uid 1000) reads the settings from here
    ARTIFACTS_DIR=${ARTIFACTS_DIR:-$WORK/artifacts}
    trap finish EXIT
    create_cluster
    install_kfp "$version"
    build_and_load_images
    apply_thaw_infra "$(overlay_for "$version")"
    read_layout
    upload_sample
    forward_api
    write_settings
    submit_and_wait "$version"
}

# Run unless sourced (the tests source it to call its functions).
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
