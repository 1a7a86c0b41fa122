"""`torchrun -m thaw.stage_job` on two "nodes" (two torchrun launches, one process each, as
two pods of a TrainJob: PET_NNODES=2, PET_NODE_RANK 0 and 1, separate scratch folders),
against the embedded S3 + MLflow stack: the prepared data comes from S3 and the stage's
output goes to S3; only rank 0 writes files and MLflow records."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.distributed.test_ddp import finish, free_port, pod_environment, torchrun
from thaw import storage
from thaw.torchrun import stage_arguments

pytestmark = pytest.mark.slow


def test_two_nodes_train_one_stage_and_only_rank_0_writes(stack, prepared_sample,
                                                          tmp_path: Path) -> None:
    run_id = f"ddp-{uuid.uuid4().hex[:8]}"
    prepared_uri = f"s3://{stack.bucket}/tests/{run_id}/prepared"
    out_uri = f"s3://{stack.bucket}/tests/{run_id}/partial"
    storage.upload_dir(prepared_sample.root, prepared_uri)
    args = stage_arguments(stage="partial", prepared=prepared_uri, out=out_uri,
                           settings={"epochs": 1, "batch_size": 16}, arch="efficientnet_lite0",
                           weights="packaged", init=None, experiment="thaw-ddp-test",
                           pipeline_run_id=run_id)
    port = free_port()
    nodes = []
    for node in (0, 1):
        scratch = tmp_path / f"node{node}"
        scratch.mkdir()
        env = {**pod_environment(2, 1, node, port), "TMPDIR": str(scratch)}
        env.pop("THAW_CHECKPOINT_URI", None)
        nodes.append(torchrun(["-m", "thaw.stage_job", *args], env))
    outputs = [finish(node) for node in nodes]

    uploaded = {key.rsplit("/", 1)[-1] for key in storage.list_s3_objects(out_uri)}
    assert {"best.pt", "last.pt", "result.json", "stage_run.json"} <= uploaded
    assert "uploaded to" in outputs[0]
    # node 1 fetched the data onto its own disk and wrote nothing of the stage's
    node1_files = [p for p in (tmp_path / "node1").rglob("*") if p.is_file()]
    assert node1_files and all("/prepared/" in str(p) for p in node1_files), node1_files
    node0_outputs = {p.name for p in (tmp_path / "node0").rglob("out/*")}
    assert {"best.pt", "result.json"} <= node0_outputs

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])  # no global state
    experiment = client.get_experiment_by_name("thaw-ddp-test").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r.info.run_id for r in runs if r.data.tags.get("thaw.pipeline_run_id") == run_id
                 and "mlflow.parentRunId" not in r.data.tags]
    stages = [r.data.tags["thaw.stage"] for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parent]
    assert stages == ["partial"]  # one stage run, from rank 0 only

def test_a_failing_stage_fails_every_node_and_uploads_nothing(stack, tmp_path: Path) -> None:
    out_uri = f"s3://{stack.bucket}/tests/{uuid.uuid4().hex[:8]}/partial"
    args = stage_arguments(stage="partial", prepared=str(tmp_path / "not-prepared"),
                           out=out_uri, settings={"epochs": 1}, arch="efficientnet_lite0",
                           weights="packaged", init=None, experiment="thaw-ddp-test",
                           pipeline_run_id="ddp-bad-input")
    process = torchrun(["-m", "thaw.stage_job", *args],
                       pod_environment(1, 2, 0, free_port()))
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "not a prepared dataset" in output
    assert storage.list_s3_objects(out_uri) == []


def test_a_step_with_two_gpus_per_node_trains_in_two_processes(stack, prepared_sample,
                                                               tmp_path: Path, monkeypatch):
    """``train_step(processes=2)``: what the train component does with gpus_per_node=2,
    torchrun in the step's own pod (here two gloo processes on the CPU)."""
    from thaw.steps import train_step

    monkeypatch.delenv("THAW_CHECKPOINT_URI", raising=False)
    run_id = f"pod-{uuid.uuid4().hex[:8]}"
    summary = train_step(prepared_sample.root, tmp_path / "out", stage="partial",
                         settings={"epochs": 1, "batch_size": 16}, arch="efficientnet_lite0",
                         weights="packaged", init_dir=None, experiment="thaw-ddp-test",
                         pipeline_run_id=run_id, processes=2)

    assert summary["stage"] == "partial"
    assert summary["history"][-1]["train_images"] == prepared_sample.manifest.split_size("train")
    assert {"best.pt", "result.json", "stage_run.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
