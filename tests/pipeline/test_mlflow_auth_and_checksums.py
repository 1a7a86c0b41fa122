"""MLflow credentials and S3 checksum settings reach every step and TrainJob node.

MLflow's client reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN
from its environment (mlflow/utils/credentials.py get_default_host_creds, mlflow v3.17.2) and
sends them as ``Authorization: Basic`` or ``Bearer`` (mlflow/utils/rest_utils.py
http_request, v3.17.2). botocore >= 1.36 reads AWS_REQUEST_CHECKSUM_CALCULATION and
AWS_RESPONSE_CHECKSUM_VALIDATION (botocore/configprovider.py); KFP's launcher forces
``WhenRequired`` for old S3-compatible stores (kubeflow/pipelines#13314, #13315).
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from pytest_httpserver import HTTPServer

from pipelines.settings import SettingsError, settings_from_dict
from pipelines.thaw_pipeline import compile_pipeline, trainjob_spec

GOLDEN = Path(__file__).resolve().parents[2] / "pipelines" / "thaw_pipeline.yaml"
CHECKSUM_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
AUTH = {"basic": {"secret": "mlflow-auth", "kind": "basic"},
        "token": {"secret": "mlflow-auth", "kind": "token"}}
AUTH_KEYS = {"basic": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"],
             "token": ["MLFLOW_TRACKING_TOKEN"]}


def _compiled(path: Path) -> tuple[dict, dict]:
    pipeline, platform = yaml.safe_load_all(path.read_text())
    return (pipeline["deploymentSpec"]["executors"],
            platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"])


def _secret_env(platform_executor: dict) -> dict[str, tuple[str, str]]:
    """env name -> (Secret, key) of one step."""
    return {k["envVar"]: (ref["secretName"], k["secretKey"])
            for ref in platform_executor.get("secretAsEnv", []) for k in ref["keyToEnv"]}


def test_every_step_gets_checksums_only_when_required():
    executors, _ = _compiled(GOLDEN)
    assert executors
    for name, executor in executors.items():
        env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        assert {k: env.get(k) for k in CHECKSUM_ENV} == CHECKSUM_ENV, name


def test_the_default_spec_maps_no_mlflow_secret():
    _, platform = _compiled(GOLDEN)
    for executor in platform.values():
        assert set(_secret_env(executor)) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@pytest.mark.parametrize("kind", sorted(AUTH))
def test_mlflow_credentials_reach_every_step_without_optional(tmp_path, kind):
    settings = settings_from_dict({"mlflow_auth": AUTH[kind], "s3_checksums": "when_supported"})
    _, platform = _compiled(compile_pipeline(tmp_path / "p.yaml", settings))
    for name, executor in platform.items():
        env = _secret_env(executor)
        assert {k: env[k] for k in AUTH_KEYS[kind]} == \
            {k: ("mlflow-auth", k) for k in AUTH_KEYS[kind]}, name
        assert env["AWS_ACCESS_KEY_ID"] == ("thaw-s3-credentials", "AWS_ACCESS_KEY_ID")
        # 2.14.x refuses the field (tests/pipeline/test_backend_compat.py)
        assert all("optional" not in ref for ref in executor["secretAsEnv"]), name


@pytest.mark.parametrize("kind", sorted(AUTH))
def test_trainjob_nodes_get_the_same_credentials_and_checksums(kind):
    spec = trainjob_spec(settings_from_dict({"mlflow_auth": AUTH[kind],
                                             "training": {"num_nodes": 2}}))
    env = {e["name"]: e for e in spec["env"]}
    for key in AUTH_KEYS[kind]:
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-auth", "key": key}}
    assert {k: env[k]["value"] for k in CHECKSUM_ENV} == CHECKSUM_ENV
    assert len(env) == len(spec["env"])  # no name twice


def test_one_secret_for_s3_and_mlflow_is_mapped_once():
    settings = settings_from_dict({"mlflow_auth": {"secret": "thaw-s3-credentials"}})
    env = [e["name"] for e in trainjob_spec(settings)["env"]]
    assert len(env) == len(set(env))
    assert {"AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(env)


@pytest.mark.parametrize(("data", "message"), [
    ({"mlflow_auth": {"secret": "s", "kind": "oauth"}}, "mlflow_auth.kind must be one of"),
    ({"mlflow_auth": {"secret": ""}}, "mlflow_auth.secret must name the Secret"),
    ({"s3_checksums": "always"}, "s3_checksums must be one of"),
])
def test_bad_settings_are_refused(data, message):
    with pytest.raises(SettingsError, match=message):
        settings_from_dict(data)


@pytest.mark.parametrize(("kind", "secret", "header"), [
    ("basic", {"MLFLOW_TRACKING_USERNAME": "ann", "MLFLOW_TRACKING_PASSWORD": "s3cret"},
     "Basic " + base64.b64encode(b"ann:s3cret").decode()),
    ("token", {"MLFLOW_TRACKING_TOKEN": "tok-123"}, "Bearer tok-123"),
])
def test_a_steps_mlflow_client_sends_the_mapped_credentials(monkeypatch, httpserver: HTTPServer,
                                                            kind, secret, header):
    """The env a step's pod gets from the Secret, as the compiled spec maps it, makes MLflow's
    own client authenticate (a loopback server records the request)."""
    env = {e["name"]: secret[e["valueFrom"]["secretKeyRef"]["key"]]
           for e in trainjob_spec(settings_from_dict({"mlflow_auth": AUTH[kind]}))["env"]
           if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "mlflow-auth"}
    assert set(env) == set(secret)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    httpserver.expect_request("/api/2.0/mlflow/experiments/get-by-name").respond_with_json(
        {"experiment": {"experiment_id": "1", "name": "thaw", "lifecycle_stage": "active"}})
    MlflowClient(tracking_uri=httpserver.url_for("")).get_experiment_by_name("thaw")
    (request, _), *_ = httpserver.log
    assert request.headers["Authorization"] == header
