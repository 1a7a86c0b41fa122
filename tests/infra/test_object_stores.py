"""One overlay per object store Kubeflow Pipelines ships, every client of it on one endpoint,
the prefixes a multi-user SeaweedFS lets a profile write, checksum settings for old stores, and
MLflow's schema upgraded before its server starts.

Upstream facts, read in kubeflow/pipelines at the release tags:
- 2.14.0 ships MinIO as Service ``minio-service`` in ``kubeflow``
  (manifests/kustomize/third-party/minio/base/minio-service.yaml@2.14.0); 2.15.0 ships SeaweedFS
  and keeps that name as an alias on port 9000
  (third-party/seaweedfs/base/seaweedfs/minio-service.yaml@2.15.0; its ``seaweedfs`` Service has
  no port 9000: seaweedfs-service.yaml@2.15.0).
- 2.16.0 and 2.17.0 drop the alias (kubeflow/pipelines#12613) and serve S3 as
  ``seaweedfs.kubeflow:9000`` (seaweedfs-service.yaml@2.16.0, @2.17.0;
  backend/src/v2/objectstore/config.go DefaultEndpointInMultiUserMode@2.16.0, @2.17.0).
- Multi-user: the profile controller gives each namespace a SeaweedFS user allowed s3:Put*,
  Get*, List* (2.17.0: and DeleteObject) on ``mlpipeline/artifacts/*``,
  ``mlpipeline/private-artifacts/<ns>/*``, ``mlpipeline/private/<ns>/*`` and
  ``mlpipeline/shared/*`` only, and expires ``private-artifacts`` after ARTIFACT_RETENTION_DAYS
  (manifests/kustomize/base/installs/multi-user/pipelines-profile-controller/sync.py@2.16.0,
  @2.17.0: put_user_policy, upsert_lifecycle_policy).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from infra_tree import INFRA, OVERLAY_NAMES, container, env_of, find, render

NAMESPACE = "kubeflow-user-example-com"
# overlay -> (the S3 endpoint, the KFP releases whose manifests serve it)
STORE_GENERATIONS = {
    "minio": ("http://minio-service.kubeflow:9000", ("2.14.0", "2.15.0")),
    "seaweedfs": ("http://seaweedfs.kubeflow:9000", ("2.16.0", "2.17.0")),
}
# sync.py@2.16.0/2.17.0 put_user_policy, without the prefix that expires (private-artifacts/)
PROFILE_WRITABLE = ("mlpipeline/private/{ns}/", "mlpipeline/shared/", "mlpipeline/artifacts/")
CHECKSUM_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


def _resolved_env(docs: list[dict], c: dict, name: str) -> str:
    """The value a container's env var gets: literal, or the thaw-config key it names."""
    entry = env_of(c)[name]
    if "value" in entry:
        return entry["value"]
    ref = entry["valueFrom"]["configMapKeyRef"]
    return find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]


def _clients(docs: list[dict]) -> dict[str, dict]:
    return {"MLflow server": container(find(docs, "Deployment", "mlflow"), "mlflow"),
            "bucket job": container(find(docs, "Job", "thaw-buckets"), "create-buckets")}


def _thaw_uris(docs: list[dict]) -> dict[str, str]:
    mlflow = container(find(docs, "Deployment", "mlflow"), "mlflow")
    return {"pipeline root": find(docs, "ConfigMap", "kfp-launcher")["data"]["defaultPipelineRoot"],
            "checkpoints": find(docs, "ConfigMap", "thaw-config")["data"]["THAW_CHECKPOINT_URI"],
            "MLflow artifacts": env_of(mlflow)["ARTIFACTS_DESTINATION"]["value"]}


def test_an_overlay_per_store_generation_with_its_releases_documented():
    assert set(STORE_GENERATIONS) <= set(OVERLAY_NAMES)
    readme = (INFRA / "README.md").read_text()
    for overlay, (_, releases) in STORE_GENERATIONS.items():
        header = (INFRA / "overlays" / overlay / "kustomization.yaml").read_text()
        assert f"kubectl apply -k infra/overlays/{overlay}" in readme
        assert any(release[:4] in header for release in releases), overlay
    assert "minio-service" in readme and "seaweedfs.kubeflow:9000" in readme


@pytest.mark.parametrize("overlay", sorted(STORE_GENERATIONS))
def test_every_client_points_at_the_stores_endpoint(rendered, overlay):
    """Steps (thaw-config), the launcher (kfp-launcher providers, host:port as
    backend/src/v2/config/s3.go@2.14.0 reads it), the MLflow server and the bucket Job."""
    docs = rendered[overlay]
    endpoint = STORE_GENERATIONS[overlay][0]
    assert find(docs, "ConfigMap", "thaw-config")["data"]["AWS_ENDPOINT_URL"] == endpoint
    for where, c in _clients(docs).items():
        assert _resolved_env(docs, c, "AWS_ENDPOINT_URL") == endpoint, where
    providers = yaml.safe_load(find(docs, "ConfigMap", "kfp-launcher")["data"]["providers"])
    assert set(providers) == {"minio", "s3"}
    for name, provider in providers.items():
        default = provider["default"]
        assert default["endpoint"] == urlsplit(endpoint).netloc, name
        assert default["disableSSL"] is (urlsplit(endpoint).scheme == "http"), name


def test_seaweedfs_keeps_thaw_where_a_profiles_user_may_write(rendered):
    docs = rendered["seaweedfs"]
    for what, uri in _thaw_uris(docs).items():
        key = uri.removeprefix("s3://") + "/"
        assert key.startswith(f"mlpipeline/private/{NAMESPACE}/thaw/"), (what, uri)
        assert any(key.startswith(p.format(ns=NAMESPACE)) for p in PROFILE_WRITABLE), what
    job = container(find(docs, "Job", "thaw-buckets"), "create-buckets")
    assert env_of(job)["THAW_BUCKETS"]["value"] == "mlpipeline"  # KFP's bucket: never created


def test_seaweedfs_prefixes_follow_the_overlays_namespace(tmp_path: Path):
    copy = tmp_path / "infra"
    shutil.copytree(INFRA, copy, ignore=shutil.ignore_patterns("ci"))
    kustomization = copy / "overlays" / "seaweedfs" / "kustomization.yaml"
    text = kustomization.read_text()
    assert f"\nnamespace: {NAMESPACE}\n" in text
    kustomization.write_text(text.replace(f"\nnamespace: {NAMESPACE}\n", "\nnamespace: team-a\n"))
    for what, uri in _thaw_uris(render(kustomization.parent)).items():
        assert uri.startswith("s3://mlpipeline/private/team-a/thaw/"), (what, uri)


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_s3_clients_in_the_cluster_send_checksums_only_when_required(rendered, overlay):
    """boto3 >= 1.36 sends CRC32 checksums and aws-chunked trailers unless told
    ``when_required``; KFP's launcher forces the same (kubeflow/pipelines#13314, #13315)."""
    docs = rendered[overlay]
    for where, c in _clients(docs).items():
        for name, value in CHECKSUM_ENV.items():
            assert _resolved_env(docs, c, name) == value, (where, name)


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_mlflow_schema_is_upgraded_before_the_server_starts(rendered, overlay):
    """MLflow refuses a database at an older schema (mlflow/store/db/utils.py _verify_schema,
    mlflow 3.17.2); init containers run to completion, in order, before the containers."""
    pod = find(rendered[overlay], "Deployment", "mlflow")["spec"]["template"]["spec"]
    (upgrade,) = pod["initContainers"]
    server = container({"spec": {"template": {"spec": pod}}}, "mlflow")
    assert upgrade["image"] == server["image"]
    assert upgrade["command"] == ["mlflow", "db", "upgrade", "$(BACKEND_STORE_URI)"]
    assert "--backend-store-uri=$(BACKEND_STORE_URI)" in server["args"]
    for c in (upgrade, server):  # the same URI, built from the same Secret
        env = env_of(c)
        assert env["BACKEND_STORE_URI"]["value"] == \
            "postgresql://mlflow:$(POSTGRES_PASSWORD)@mlflow-postgres:5432/mlflow"
        assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == \
            {"name": "mlflow-postgres", "key": "POSTGRES_PASSWORD"}
        names = list(env)  # $(VAR) expands only from variables defined before it
        assert names.index("POSTGRES_PASSWORD") < names.index("BACKEND_STORE_URI")
