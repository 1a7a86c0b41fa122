"""What only a cluster shows, shown here: the compiled pipeline through the fidelity runner,
every step in a fresh bubblewrap sandbox that sees only its own staged artifacts.

These fail on the behaviour before the fixes (commit aba7f74): register opened another
step's checkpoint paths; a retried training step restarted from epoch 0; preprocess was a
cache hit on a changed bucket; input errors were retried. And before issue 17, every run was
closed in MLflow as FAILED: the exit handler compared the backend's final state (COMPLETE,
``backend/src/v2/driver/resolve.go`` at 2.14.0-2.17.0) with kfp.local's SUCCEEDED.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.fidelity.parent_runs import parent_run
from thaw import storage
from thaw.checkpoint import load_checkpoint
from thawctl.local_run import IsolatedRunFailed, run_isolated

# A whole pipeline run in sandboxes, then two more: nightly. `make test` runs the same
# pipeline in the image (test_image_pipeline.py), states and MLflow status included.
pytestmark = [pytest.mark.fidelity, pytest.mark.slow, pytest.mark.nightly]
PREPROCESS = "exit-handler-1/preprocess"
PARTIAL = "exit-handler-1/train-2"

if shutil.which("bwrap") is None:
    reason = "bubblewrap is not installed (apt-get install bubblewrap): fidelity tier skipped"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " — CI must run it", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="module")
def baseline(fidelity_names, quick_retry_settings, tmp_path_factory):
    work = tmp_path_factory.mktemp("baseline")
    outcome = run_isolated(fidelity_names, work, engine="bwrap",
                           settings_file=quick_retry_settings)
    return outcome


def _stage_output(outcome, task: str, tmp: Path) -> tuple[dict, dict]:
    """(result.json, best.pt payload) of a training task's uploaded model artifact."""
    import json

    uri = outcome["pipeline_run"].tasks[task].artifacts["model"]["uri"]
    result = json.loads(storage.download_file(f"{uri}/result.json", tmp / "r.json").read_text())
    return result, load_checkpoint(storage.download_file(f"{uri}/best.pt", tmp / "best.pt"))


def test_register_works_from_its_own_input_artifacts(baseline, fidelity_names):
    run = baseline["pipeline_run"]
    assert run.state == "SUCCEEDED"
    assert all(t.state == "COMPLETE" for t in run.tasks.values()), run.tasks
    champion = MlflowClient().get_model_version_by_alias(fidelity_names["model_name"],
                                                         "champion")
    assert champion.version == baseline["version"]
    assert champion.tags["thaw.stage"] == baseline["stage"]


def test_a_successful_run_is_closed_in_mlflow_as_finished(baseline, fidelity_names):
    """The exit handler receives COMPLETE, the MLMD state of its DAG
    (``backend/src/v2/driver/resolve.go``, ``metadata/client.go`` UpdateDAGExecutionsState
    at 2.14.0-2.17.0), and closes the parent run FINISHED."""
    run = baseline["pipeline_run"]
    assert run.tasks["exit-handler-1"].state == "COMPLETE"  # what the exit handler receives
    assert run.tasks["finalize"].state == "COMPLETE"
    parent = parent_run(fidelity_names["mlflow_experiment"], run.run_id)
    assert parent.info.status == "FINISHED"


def test_a_killed_training_step_resumes_from_s3_and_ends_as_if_uninterrupted(
        baseline, fidelity_names, quick_retry_settings, tmp_path):
    checkpoints = "s3://thaw/checkpoints"
    baseline_id = baseline["pipeline_run"].run_id
    killed: list[str] = []

    def kill_after_first_epoch(task: str, attempt: int, process) -> None:
        if task != "train-2" or attempt != 1:
            return

        def watch() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and process.popen.poll() is None:
                keys = [k for k in storage.list_s3_objects(checkpoints)
                        if k.endswith("/partial/last.pt") and baseline_id not in k]
                if keys:
                    # SIGKILL mid-stage, as the OOM killer would: exit 137, a Failed
                    # node, which Argo's OnFailure retries (a deleted pod is an Error: not)
                    process.kill()
                    killed.append(keys[0])
                    return
                time.sleep(0.2)

        threading.Thread(target=watch, daemon=True).start()

    outcome = run_isolated(fidelity_names, tmp_path / "work", engine="bwrap",
                           settings_file=quick_retry_settings,
                           on_started=kill_after_first_epoch)
    run = outcome["pipeline_run"]
    assert killed, "the partial step finished before it could be killed"
    assert run.tasks[PARTIAL].attempts == 2
    log = Path(run.tasks[PARTIAL].log).read_text()
    assert "found checkpoints of an earlier attempt" in log
    assert "resuming partial from epoch" in log
    # The unchanged bucket was a cache hit for preprocess.
    assert run.tasks[PREPROCESS].state == "CACHED"

    expected, expected_best = _stage_output(baseline, PARTIAL, tmp_path / "a")
    got, got_best = _stage_output(outcome, PARTIAL, tmp_path / "b")
    assert got["best_epoch"] == expected["best_epoch"]
    assert got["best_val"] == expected["best_val"]
    assert [r["val_macro_f1"] for r in got["history"]] == \
        [r["val_macro_f1"] for r in expected["history"]]
    for name, tensor in expected_best["model"].items():
        assert torch.equal(tensor, got_best["model"][name]), name


def test_a_changed_bucket_is_no_cache_hit_and_input_errors_are_not_retried(
        baseline, fidelity_names, quick_retry_settings, tmp_path):
    data_uri = fidelity_names["data_uri"]
    first = next(k for k in storage.list_s3_objects(data_uri) if k.endswith(".png"))
    with tempfile.TemporaryDirectory() as tmp:
        image = storage.download_file(f"s3://thaw/{first}", Path(tmp) / "x.png")
        storage.upload_file(image, f"s3://thaw/{first[:-4]}-added.png")

    bad = {**fidelity_names, "weights": "file:///no/such/weights.pth"}
    with pytest.raises(IsolatedRunFailed, match="probe") as failure:
        run_isolated(bad, tmp_path / "work", engine="bwrap", settings_file=quick_retry_settings)
    tasks = failure.value.result.tasks
    assert tasks[PREPROCESS].state == "COMPLETE", "new bucket content must be preprocessed"
    probe = tasks["exit-handler-1/train"]
    assert probe.state == "FAILED" and probe.attempts == 3
    assert "not retrying: an earlier attempt failed on its input" in probe.error
    assert tasks["exit-handler-1"].state == "FAILED"
    assert tasks["finalize"].state == "COMPLETE"
    parent = parent_run(bad["mlflow_experiment"], failure.value.result.run_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["thaw.error"] == "FAILED"  # the backend sends no message
