"""The exit handler closes the MLflow parent run from the final status a real backend sends.

The status is the struct ``backend/src/v2/driver/resolve.go`` (2.14.0-2.17.0) builds for a
``taskFinalStatus`` input: ``state`` = the MLMD state of the exit handler's DAG (COMPLETE,
CACHED, FAILED, CANCELED), ``pipelineTaskName``, ``pipelineJobResourceName`` (the Argo
Workflow's name) and an always-empty ``error``. It goes through KFP's own executor, as in the
step's container. Before the fix, finalize compared the state with kfp.local's "SUCCEEDED" and
closed every successful cluster run as FAILED.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from kfp.dsl.executor import Executor
from mlflow import MlflowClient

from components.finalize import finalize
from thaw import tracking

pytestmark = pytest.mark.slow


def _run_exit_handler(tmp_path: Path, experiment: str, pipeline_run: str, state: str) -> None:
    status = {"state": state, "pipelineTaskName": "exit-handler-1",
              "pipelineJobResourceName": "thaw-staged-transfer-x7k2q", "error": {}}
    executor_input = {
        "inputs": {"parameterValues": {"mlflow_experiment": experiment,
                                       "pipeline_run_id": pipeline_run, "status": status}},
        "outputs": {"outputFile": str(tmp_path / "output_metadata.json")},
    }
    Executor(executor_input, finalize).execute()


@pytest.mark.parametrize(("state", "expected"), [
    ("COMPLETE", "FINISHED"), ("CACHED", "FINISHED"), ("FAILED", "FAILED"),
    ("CANCELED", "FAILED"),
])
def test_the_backend_final_state_decides_the_parent_run(stack, tmp_path, state, expected):
    experiment, pipeline_run = f"finalize-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    parent = tracking.ensure_parent_run(experiment, pipeline_run)

    _run_exit_handler(tmp_path, experiment, pipeline_run, state)

    run = MlflowClient().get_run(parent)
    assert run.info.status == expected
    if expected == "FAILED":  # the backend sends no error message: the state is the reason
        assert run.data.tags["thaw.error"] == state
