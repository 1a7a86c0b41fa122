"""infra/ci/e2e-kind.sh, the nightly end-to-end run on kind (.github/workflows/e2e-kind.yml).

It cannot run here (no kind, no docker daemon): these tests check what can be checked without a
cluster. The script parses; it refuses plainly when a tool is missing, before it creates
anything; it installs the KFP release the pipeline's own gate names; the overlay it applies
renders, in KFP's namespace, with the images it builds; its cluster settings load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from infra_tree import find, render

from pipelines.settings import load_settings
from pipelines.thaw_pipeline import MIN_KFP_BACKEND

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "ci" / "e2e-kind.sh"
BASH = shutil.which("bash") or "/bin/bash"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASH, str(SCRIPT), *args], capture_output=True, text=True,
                          check=False, env={**os.environ, **(env or {})}, timeout=60)


def _sourced(command: str, *args: str, env: dict[str, str] | None = None) -> str:
    """``command`` (with ``args`` as "$@") after sourcing the script, which runs nothing."""
    shell = f'script=$1; shift; source "$script"; {command}'
    result = subprocess.run([BASH, "-c", shell, "test", str(SCRIPT), *args],
                            capture_output=True, text=True, check=False, timeout=60,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout


def _variable(name: str) -> str:
    return _sourced('printf %s "${!1}"', name)


def _path_with(tmp_path: Path, tools: dict[str, str]) -> str:
    """A PATH of the basic tools the script needs plus ``tools`` (name -> shell body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("dirname", "sed", "mktemp", "chmod"):
        (bin_dir / name).symlink_to(shutil.which(name))
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!{BASH}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def test_the_script_parses():
    assert subprocess.run([BASH, "-n", str(SCRIPT)], check=False).returncode == 0


@pytest.mark.parametrize(("tools", "message"), [
    ({}, "missing kind kubectl docker: this run needs kind, kubectl and docker on PATH"),
    ({"kind": "exit 0", "kubectl": "exit 0"}, "missing docker:"),
    ({"kind": "exit 0", "kubectl": "exit 0", "docker": "exit 1"},
     "'docker info' fails: start the docker daemon"),
])
def test_missing_tools_are_named_before_anything_is_created(tmp_path, tools, message):
    created = tmp_path / "work"
    created.mkdir()
    result = _run(env={"PATH": _path_with(tmp_path, tools), "TMPDIR": str(created)})
    assert result.returncode == 1
    assert f"e2e-kind: error: {message}" in result.stderr
    assert not list(created.iterdir())  # no work folder, no cluster


def test_minimum_is_the_pipelines_own_gate_and_a_release_is_taken_as_given():
    assert _run("--print-version").stdout.strip() == MIN_KFP_BACKEND
    assert _run("--print-version", env={"KFP_VERSION": "minimum"}).stdout.strip() == \
        MIN_KFP_BACKEND
    assert _run("--print-version", "2.17.0").stdout.strip() == "2.17.0"
    refused = _run("--print-version", "master")
    assert refused.returncode == 1 and "KFP_VERSION 'master' is not a release tag" in \
        refused.stderr


def test_kfp_is_installed_as_its_standalone_manifests_say():
    """kubeflow/pipelines manifests/kustomize/README.md at 2.14.0 ("env/platform-agnostic"):
    cluster-scoped-resources, wait for the Application CRD, then env/platform-agnostic."""
    text = SCRIPT.read_text()
    steps = ['kubectl apply -k "$source/cluster-scoped-resources?ref=$1"',
             "kubectl wait crd/applications.app.k8s.io --for condition=established "
             "--timeout=60s",
             'kubectl apply -k "$source/env/platform-agnostic?ref=$1"']
    positions = [text.index(step) for step in steps]
    assert positions == sorted(positions)
    assert 'local source="github.com/kubeflow/pipelines/manifests/kustomize"' in text


@pytest.mark.parametrize(("version", "overlay", "endpoint"), [
    ("2.14.0", "minio", "http://minio-service.kubeflow:9000"),
    ("2.15.0", "minio", "http://minio-service.kubeflow:9000"),
    ("2.16.1", "seaweedfs", "http://seaweedfs.kubeflow:9000"),
    ("2.17.0", "seaweedfs", "http://seaweedfs.kubeflow:9000"),
    ("3.0.0", "seaweedfs", "http://seaweedfs.kubeflow:9000"),
])
def test_the_applied_overlay_is_the_releases_store_in_kfps_namespace_with_the_built_images(
        tmp_path, version, overlay, endpoint):
    """The object store each release's standalone manifests install: MinIO (2.14.0) or SeaweedFS
    behind the minio-service alias (third-party/seaweedfs/base/seaweedfs/minio-service.yaml at
    2.15.0), SeaweedFS as seaweedfs:9000 only from 2.16.0 (seaweedfs-service.yaml at 2.16.0,
    2.17.0): no alias is added any more."""
    assert _sourced('overlay_for "$1"', version).strip() == overlay
    _sourced('write_overlay "$1" "$2"', str(tmp_path / "overlay"), overlay)
    docs = render(tmp_path / "overlay")
    namespaced = [d for d in docs if not d["kind"].startswith("Cluster")]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"kubeflow"}
    mlflow = find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    job = find(docs, "Job", "thaw-buckets")["spec"]["template"]["spec"]["containers"][0]
    assert (job["image"], mlflow["image"]) == (_variable("THAW_IMAGE"), _variable("MLFLOW_IMAGE"))
    assert find(docs, "ConfigMap", "thaw-config")["data"]["AWS_ENDPOINT_URL"] == endpoint
    assert "minio-service" not in SCRIPT.read_text().split("overlay_for()")[1]


def test_data_and_pipeline_root_are_under_the_overlays_prefix(tmp_path):
    """read_layout takes the data_uri and pipeline root from the applied ConfigMaps (kubectl
    stand-in answering as the seaweedfs overlay renders them)."""
    kubectl = ('case "$*" in *thaw-config*) printf %s '
               's3://mlpipeline/private/ns/thaw/checkpoints;; '
               '*kfp-launcher*) printf %s s3://mlpipeline/private/ns/thaw/pipeline-root;; esac')
    path = _path_with(tmp_path, {"kubectl": kubectl})
    out = _sourced('read_layout; printf "%s %s" "$DATA_URI" "$PIPELINE_ROOT"',
                   env={"PATH": f"{path}:{os.environ['PATH']}"})
    assert out.split() == ["s3://mlpipeline/private/ns/thaw/datasets/fashion-mnist-sample",
                           "s3://mlpipeline/private/ns/thaw/pipeline-root"]


def test_the_cluster_settings_fit_kind(tmp_path):
    _sourced("WORK=$1 PIPELINE_ROOT=s3://mlpipeline/private/ns/thaw/pipeline-root write_settings",
             str(tmp_path))
    settings = load_settings(tmp_path / "cluster.yaml")
    assert settings.image == _variable("THAW_IMAGE") and settings.gpu.count == 0
    assert settings.pipeline_root == "s3://mlpipeline/private/ns/thaw/pipeline-root"
    assert all(int(settings.step(kind).cpu) <= 2 for kind in ("preprocess", "train", "evaluate"))


def test_make_e2e_kind_runs_the_script_and_make_help_lists_it():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    dry = subprocess.run([make, "-n", "-C", str(REPO), "e2e-kind", "KFP_VERSION=2.17.0"],
                         capture_output=True, text=True, check=True).stdout
    assert "infra/ci/e2e-kind.sh '2.17.0'" in dry.splitlines()
    listing = subprocess.run([make, "-s", "-C", str(REPO), "help"], capture_output=True,
                             text=True, check=True).stdout
    assert any(line.split()[0] == "e2e-kind" for line in listing.splitlines() if line.strip())
