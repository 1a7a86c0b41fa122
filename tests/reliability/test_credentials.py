"""Credentials never leave the environment: not into the compiled pipeline, the logs, or
MLflow's params, tags and artifacts. Distinctive fake values make any leak findable."""

from __future__ import annotations

import json
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from pipelines.settings import ClusterSettings, SettingsError, settings_from_dict
from thaw import storage
from thaw.errors import ThawError
from thaw.stack import StackInfo
from thaw.steps import CHECKPOINT_ROOT_ENV, STAGE_RUN_FILE, train_step
from thawctl.compiled import compile_spec

GOLDEN = Path(__file__).resolve().parents[2] / "pipelines" / "thaw_pipeline.yaml"
AWS_SECRET = "aws-secret-Zq8fW2"
MLFLOW_PASSWORD = "mlflow-pw-Xk3vR7"
URI_PASSWORD = "uri-pw-Yr2tP5"
SECRETS = (AWS_SECRET, MLFLOW_PASSWORD, URI_PASSWORD)
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN")
USERINFO = re.compile(r"://[^/\s@'\"]+:[^/\s@'\"]+@")


def _set_secrets(monkeypatch: pytest.MonkeyPatch, tracking_host: str) -> None:
    """Fake credentials (the local S3 server and MLflow accept any), the tracking URI with
    ``user:password@``."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "thaw-user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://thaw-user:{URI_PASSWORD}@{tracking_host}")


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def _env_entries(node: Any) -> list[dict[str, Any]]:
    """Every ``{name, value}`` environment entry anywhere in a compiled spec."""
    if isinstance(node, list):
        return [entry for item in node for entry in _env_entries(item)]
    if not isinstance(node, dict):
        return []
    found = [e for e in node.get("env", []) if isinstance(e, dict) and "value" in e]
    return found + [entry for value in node.values() for entry in _env_entries(value)]


def test_redact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "abc")  # too short to redact safely
    text = (f"key {AWS_SECRET}, pw {MLFLOW_PASSWORD} at http://me:{URI_PASSWORD}@host:5000/x "
            "and s3://bucket/abc")
    assert storage.redact(text) == "key ***, pw *** at http://***@host:5000/x and s3://bucket/abc"


def test_compiled_pipeline_holds_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiling with credentials in the environment bakes none in: pods get them from the
    Kubernetes Secret, by name."""
    _set_secrets(monkeypatch, "mlflow.example:5000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "aws-key-id-Hn4s")
    text = compile_spec(ClusterSettings()).text
    assert _leaks(text) == [] and "aws-key-id-Hn4s" not in text
    assert not USERINFO.search(text)
    _, platform = yaml.safe_load_all(text)
    secret_envs = [entry for executor in platform["platforms"]["kubernetes"]["deploymentSpec"]
                   ["executors"].values() for entry in executor.get("secretAsEnv", [])]
    assert secret_envs and all(
        {k["envVar"] for k in entry["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        and entry["secretName"] == ClusterSettings().s3_secret for entry in secret_envs)


def test_cluster_settings_refuse_a_password_in_the_mlflow_uri() -> None:
    """The MLflow URI of the cluster settings is written into the compiled YAML as a plain
    env value, so a password there is refused, pointing at the Secret."""
    data = {"mlflow_tracking_uri": f"http://me:{URI_PASSWORD}@mlflow.example:5000"}
    with pytest.raises(SettingsError, match="mlflow_tracking_uri must not carry a password") as err:
        settings_from_dict(data)
    assert URI_PASSWORD not in str(err.value)
    assert settings_from_dict({"mlflow_tracking_uri": "http://mlflow.example:5000"})


def test_committed_pipeline_holds_no_credentials() -> None:
    documents = list(yaml.safe_load_all(GOLDEN.read_text()))
    assert not USERINFO.search(GOLDEN.read_text())
    named = [e["name"] for e in _env_entries(documents)
             if e["name"] in SECRET_VARS or e["name"] == "AWS_ACCESS_KEY_ID"]
    assert named == []  # set as plain values they would be readable by anyone with the spec


def _train(prepared_dir: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    args = {"stage": "probe", "settings": {"epochs": 1, "batch_size": 64},
            "arch": "efficientnet_lite0", "weights": "packaged", "init_dir": None,
            "experiment": "credentials", "pipeline_run_id": uuid.uuid4().hex}
    return train_step(prepared_dir, out, **(args | overrides))


def _recorded(stack: StackInfo, run_id: str) -> str:
    """Everything MLflow holds about a run that a reader could see: params, tags, metrics'
    names, dataset inputs and the text artifacts."""
    client = MlflowClient(tracking_uri=stack.tracking_uri)  # no credentials needed to read
    run = client.get_run(run_id)
    texts = [client.download_artifacts(run_id, f.path) for f in client.list_artifacts(run_id)
             if f.path.endswith((".json", ".md", ".txt"))]
    return json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics),
                       [d.dataset.source for d in run.inputs.dataset_inputs],
                       [Path(t).read_text() for t in texts]])


def _stage_run_id(stack: StackInfo, pipeline_run_id: str) -> str:
    client = MlflowClient(tracking_uri=stack.tracking_uri)
    experiment = client.get_experiment_by_name("credentials")
    (parent,) = client.search_runs([experiment.experiment_id],
                                   f"tags.`thaw.pipeline_run_id` = '{pipeline_run_id}'")
    (run,) = client.search_runs([experiment.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return run.info.run_id


@pytest.mark.slow
def test_a_training_step_leaks_no_credentials(stack, prepared_sample, tmp_path, monkeypatch,
                                              caplog, capfd):
    """A whole training step with S3 checkpoints and MLflow behind ``user:password@``: the
    secrets are in no log line, no output and nothing MLflow records."""
    _set_secrets(monkeypatch, f"{stack.host}:{stack.mlflow_port}")
    monkeypatch.setenv(CHECKPOINT_ROOT_ENV, f"s3://{stack.bucket}/creds-{uuid.uuid4().hex[:8]}")
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    _train(prepared_sample.root, out)
    run_id = json.loads((out / STAGE_RUN_FILE).read_text())["run_id"]
    recorded = _recorded(stack, run_id)
    assert '"weights": "packaged"' in recorded  # params
    assert '\\"best_epoch\\"' in recorded  # result.json
    assert _leaks(recorded) == []
    captured = capfd.readouterr()
    assert _leaks(caplog.text + captured.out + captured.err) == []


@pytest.mark.slow
def test_a_secret_in_a_failing_parameter_is_redacted(stack, prepared_sample, tmp_path,
                                                     monkeypatch, caplog, capfd):
    """A parameter that happens to hold a secret (here a path) reaches MLflow's params and
    the ``thaw.error`` tag only as ``***``."""
    _set_secrets(monkeypatch, f"{stack.host}:{stack.mlflow_port}")
    caplog.set_level(logging.DEBUG)
    pipeline_run = uuid.uuid4().hex
    with pytest.raises(ThawError, match="weights file not found"):
        _train(prepared_sample.root, tmp_path / "out", pipeline_run_id=pipeline_run,
               weights=f"/x/{AWS_SECRET}/{MLFLOW_PASSWORD}/w.pth")
    run = MlflowClient(tracking_uri=stack.tracking_uri).get_run(
        _stage_run_id(stack, pipeline_run))
    assert run.info.status == "FAILED"
    assert run.data.params["weights"] == "/x/***/***/w.pth"
    assert run.data.tags["thaw.error"] == "weights file not found: /x/***/***/w.pth"
    assert _leaks(_recorded(stack, run.info.run_id)) == []
    captured = capfd.readouterr()
    assert _leaks(caplog.text + captured.out + captured.err) == []
