"""Which exit-handler final states mean success: the states the orchestrators really send.

A Kubeflow Pipelines backend fills ``PipelineTaskFinalStatus.state`` with the MLMD execution
state of the exit handler's DAG (``backend/src/v2/driver/resolve.go`` at 2.14.0, 2.15.0,
2.16.0, 2.17.0: ``producer.GetExecution().GetLastKnownState().String()``); the DAG's state is
COMPLETE or FAILED (``backend/src/v2/metadata/client.go`` ``UpdateDAGExecutionsState``), a
cached task's CACHED (``backend/src/v2/driver/container.go``). kfp.local sends SUCCEEDED or
FAILED (kfp 2.17.0 ``kfp/local/orchestrator/orchestrator_utils.py``).
"""

import pytest

from thaw.tracking import pipeline_succeeded


@pytest.mark.parametrize(("state", "succeeded"), [
    ("COMPLETE", True), ("CACHED", True), ("FAILED", False), ("CANCELED", False),
    ("SUCCEEDED", True), ("RUNNING", False), ("", False),
])
def test_backend_and_kfp_local_success_states(state: str, succeeded: bool) -> None:
    assert pipeline_succeeded(state) is succeeded
