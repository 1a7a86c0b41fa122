"""MLflow tracking and registry against a real MLflow server (the embedded stack)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from thaw import tracking
from thaw.backbones import create_backbone, data_config
from thaw.checkpoint import save_checkpoint
from thaw.errors import ThawError
from thaw.evaluation import classification_metrics
from thaw.stack import StackInfo
from thaw.training.loop import StageResult

pytestmark = pytest.mark.slow

CLASSES = ["cat", "dog", "T-shirt/top"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    model = create_backbone("efficientnet_lite0", len(CLASSES), "packaged")
    save_checkpoint(path, model, {"classes": CLASSES, "stage": "probe",
                                  "data_config": data_config("efficientnet_lite0", 32)})
    return path


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _result(stage: str, epochs: int) -> dict:
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5, "val_loss": 1.2 / e,
                "val_accuracy": 0.4 + 0.1 * e, "val_macro_f1": 0.3 + 0.1 * e, "lr": 0.01,
                "epoch_seconds": 2.0, "train_images": 100, "train_seconds": 1.5}
               for e in range(1, epochs + 1)]
    return StageResult(stage=stage, config={"epochs": epochs}, best_epoch=epochs,
                       best_val={"accuracy": 0.4 + 0.1 * epochs, "macro_f1": 0.3 + 0.1 * epochs,
                                 "loss": 1.2 / epochs},
                       history=history, wall_seconds=4.0, train_images_per_sec=66.7,
                       stopped_early=True, trainable_params=1234).to_dict()


def test_parent_and_stage_runs(stack: StackInfo) -> None:
    client = MlflowClient()
    experiment, pipeline_run = _name("exp"), uuid.uuid4().hex
    parent = tracking.ensure_parent_run(experiment, pipeline_run, {"arch": "efficientnet_lite0"})
    assert tracking.ensure_parent_run(experiment, pipeline_run) == parent
    parent_run = client.get_run(parent)
    assert parent_run.info.run_name == f"thaw-{pipeline_run[:8]}"
    assert parent_run.info.status == "RUNNING"
    assert parent_run.data.params == {"arch": "efficientnet_lite0"}

    runs = {}
    for stage, epochs in (("probe", 2), ("partial", 3)):
        run_id = tracking.start_stage_run(parent, stage, {"epochs": epochs,
                                                          "optim": {"lr": 0.01, "wd": 0}})
        result = _result(stage, epochs)
        log_epoch = tracking.epoch_logger(run_id)
        for record in result["history"]:
            log_epoch(record)
        tracking.finish_stage_run(run_id, result)
        runs[stage] = run_id

    children = client.search_runs([parent_run.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.info.run_name for r in children} == {"probe", "partial"}
    run = client.get_run(runs["partial"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["thaw.stage"] == "partial"
    assert run.data.tags["thaw.stopped_early"] == "true"
    assert run.data.params == {"epochs": "3", "optim.lr": "0.01", "optim.wd": "0"}
    history = client.get_metric_history(runs["partial"], "val_macro_f1")
    assert [(m.step, round(m.value, 3)) for m in history] == [(1, 0.4), (2, 0.5), (3, 0.6)]
    assert {"train_loss", "lr", "epoch_seconds", "val_accuracy"} <= set(run.data.metrics)
    assert run.data.metrics["best_epoch"] == 3
    assert run.data.metrics["best_val_macro_f1"] == pytest.approx(0.6)
    assert run.data.metrics["trainable_params"] == 1234
    assert "result.json" in {f.path for f in client.list_artifacts(runs["partial"])}

    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    test = classification_metrics(y_true, y_pred, CLASSES, detailed=True)
    tracking.log_evaluation(runs["partial"], "partial", test, CLASSES)
    metrics = client.get_run(runs["partial"]).data.metrics
    assert metrics["test_accuracy"] == pytest.approx(4 / 6)
    assert metrics["test_recall_cat"] == pytest.approx(0.5)
    assert metrics["test_f1_T-shirt_top"] == pytest.approx(test["per_class"]["T-shirt/top"]
                                                           ["f1-score"])
    artifacts = {f.path for f in client.list_artifacts(runs["partial"])}
    assert {"per_class_report.json", "confusion_matrix.png"} <= artifacts

    tracking.finish_parent_run(experiment, pipeline_run, succeeded=True)
    assert client.get_run(parent).info.status == "FINISHED"


def test_failed_pipeline_fails_parent_and_running_children(stack: StackInfo) -> None:
    client = MlflowClient()
    experiment, pipeline_run = _name("exp"), uuid.uuid4().hex
    parent = tracking.ensure_parent_run(experiment, pipeline_run)
    done = tracking.start_stage_run(parent, "probe", {})
    tracking.finish_stage_run(done, _result("probe", 1))
    running = tracking.start_stage_run(parent, "partial", {})

    tracking.finish_parent_run(experiment, pipeline_run, succeeded=False, message="OOM in full")
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(parent).data.tags["thaw.error"] == "OOM in full"
    assert client.get_run(running).info.status == "FAILED"
    assert "still running" in client.get_run(running).data.tags["thaw.error"]
    assert client.get_run(done).info.status == "FINISHED"

    # A pipeline that failed before any step reached MLflow still gets a (failed) parent run.
    other = uuid.uuid4().hex
    tracking.finish_parent_run(experiment, other, succeeded=False, message="bad data")
    failed = client.get_run(tracking.ensure_parent_run(experiment, other))
    assert failed.info.status == "FAILED"


def _register(parent: str, model: str, candidates: list, data, margin: float = 0.0,
              **options) -> dict:
    return tracking.register_best(parent_run_id=parent, model_name=model, candidates=candidates,
                                  data=data, promotion_margin=margin, data_fingerprint="fp1",
                                  pipeline_run_id="p1", **options)


def test_register_best_rejects_bad_input_and_leaves_no_version(
        stack: StackInfo, checkpoint: Path, prepared_sample, tmp_path: Path) -> None:
    """Every check runs before anything is registered. (The champion gate itself, with real
    models: tests/integration/test_champion_gate.py.)"""
    client = MlflowClient()
    model = _name("model")
    parent = tracking.ensure_parent_run(_name("exp"), uuid.uuid4().hex)
    run_id = tracking.start_stage_run(parent, "probe", {})
    good = [{"stage": "probe", "run_id": run_id, "checkpoint": str(checkpoint),
             "val": {"accuracy": 0.5, "macro_f1": 0.5}, "test": {}}]

    with pytest.raises(ThawError, match="no candidate"):
        _register(parent, model, [], prepared_sample)
    with pytest.raises(ThawError, match="promotion_margin"):
        _register(parent, model, good, prepared_sample, margin=-0.1)
    with pytest.raises(ThawError, match="unknown selection metric 'auc': expected one of "
                                        "accuracy, loss, macro_f1"):
        _register(parent, model, good, prepared_sample, selection_metric="auc")
    with pytest.raises(ThawError, match="lacks"):
        _register(parent, model, [{"stage": "probe"}], prepared_sample)
    missing = [{**good[0], "checkpoint": str(tmp_path / "nope.pt")}]
    with pytest.raises(ThawError, match="checkpoint not found"):
        _register(parent, model, missing, prepared_sample)
    # This checkpoint was trained on other classes than the data it would be scored on.
    with pytest.raises(ThawError, match="was trained on classes"):
        _register(parent, model, good, prepared_sample)
    assert client.search_model_versions(f"name = '{model}'") == []
