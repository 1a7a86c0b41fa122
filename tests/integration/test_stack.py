"""The embedded stack: real moto S3 server and real MLflow server (with registry) on loopback."""

from __future__ import annotations

import argparse
import socket
import sys
import uuid
from pathlib import Path

import boto3
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

import thaw.stack as stack_module
from thaw.errors import ThawError
from thaw.stack import StackInfo, add_stack_commands, read_stack, stack_down, stack_up

pytestmark = pytest.mark.slow


class AddOne(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return model_input + 1


def _s3(info: StackInfo):  # boto3 client types are generated at runtime
    return boto3.client("s3", endpoint_url=info.s3_endpoint, region_name=info.region)


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_s3_server_speaks_s3(stack: StackInfo) -> None:
    s3 = _s3(stack)
    s3.put_object(Bucket=stack.bucket, Key="hello/world.txt", Body=b"thaw")
    assert s3.get_object(Bucket=stack.bucket, Key="hello/world.txt")["Body"].read() == b"thaw"


def test_mlflow_tracking_artifacts_and_registry(stack: StackInfo, tmp_path: Path) -> None:
    assert mlflow.get_tracking_uri() == stack.tracking_uri
    name = f"stack-test-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(name)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with mlflow.start_run() as run:
        mlflow.log_metric("acc", 0.5, step=1)
        mlflow.log_artifact(str(note), artifact_path="notes")
        model = mlflow.pyfunc.log_model(
            name="model", python_model=AddOne(), pip_requirements=["mlflow"]
        )

    client = MlflowClient()
    assert client.get_metric_history(run.info.run_id, "acc")[0].value == 0.5
    # Artifacts are proxied by the server into the bucket under the MLflow prefix.
    # (listed under this run's own prefix: a page holds at most 1000 keys of the bucket)
    prefix = f"{stack.artifact_prefix}/{run.info.experiment_id}/{run.info.run_id}/"
    listed = _s3(stack).list_objects_v2(Bucket=stack.bucket, Prefix=prefix)
    keys = [obj["Key"] for obj in listed.get("Contents", [])]
    assert f"{prefix}artifacts/notes/note.txt" in keys, keys

    version = mlflow.register_model(model.model_uri, name)
    client.set_registered_model_alias(name, "champion", version.version)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = loaded.predict(pd.DataFrame({"x": [1, 2]}))
    assert out["x"].tolist() == [2, 3]


def test_up_reuses_a_running_stack(stack: StackInfo) -> None:
    again = stack_up(stack.state_dir)
    assert (again.s3_pid, again.mlflow_pid) == (stack.s3_pid, stack.mlflow_pid)
    with pytest.raises(ThawError, match="already running"):
        stack_up(stack.state_dir, bucket="other")


def test_cli_env_prints_exports(stack: StackInfo, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_stack_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["stack", "env", "--state-dir", str(stack.state_dir)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"export MLFLOW_TRACKING_URI={stack.tracking_uri}" in out
    assert f"export AWS_ENDPOINT_URL_S3={stack.s3_endpoint}" in out
    assert f"# MLflow UI: {stack.ui_url}" in out


def test_down_stops_both_servers(tmp_path: Path) -> None:
    info = stack_up(tmp_path)
    assert stack_up(tmp_path).mlflow_pid == info.mlflow_pid
    assert _answers(info.s3_port) and _answers(info.mlflow_port)
    assert stack_down(tmp_path)
    assert not _answers(info.s3_port) and not _answers(info.mlflow_port)
    assert read_stack(tmp_path) is None
    assert not stack_down(tmp_path)
    parser = argparse.ArgumentParser()
    add_stack_commands(parser.add_subparsers())
    args = parser.parse_args(["stack", "env", "--state-dir", str(tmp_path)])
    with pytest.raises(ThawError, match="No running stack"):
        args.func(args)


@pytest.mark.parametrize("which", ["s3_port", "mlflow_port"])
def test_port_taken_is_a_clear_error(tmp_path: Path, which: str) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ThawError, match=f"port {port} .*not available"):
            stack_up(tmp_path, **{which: port})
    assert read_stack(tmp_path) is None


def test_server_crash_reports_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crash = [sys.executable, "-c", "import sys; print('boom: bad flag'); sys.exit(3)"]
    monkeypatch.setattr(stack_module, "_mlflow_command", lambda *args: crash)
    spawned = []
    spawn = stack_module._spawn
    monkeypatch.setattr(stack_module, "_spawn", lambda *a: spawned.append(spawn(*a)) or spawned[-1])
    with pytest.raises(ThawError, match=r"(?s)MLflow server exited with status 3.*boom: bad flag"):
        stack_up(tmp_path)
    assert read_stack(tmp_path) is None
    assert len(spawned) == 2  # the S3 server did start ...
    assert all(proc.poll() is not None for proc in spawned)  # ... and was stopped again
