"""What the MLflow UI shows of a pipeline run, against a real MLflow server (the embedded
stack): the experiment's kind, the source dataset on each stage run, the stage chart."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from urllib.parse import parse_qs

import mlflow
import pytest
from mlflow import MlflowClient
from PIL import Image

from thaw import mlflow_views, tracking
from thaw.backbones import create_backbone
from thaw.checkpoint import save_checkpoint
from thaw.data.prepared import PreparedDataset
from thaw.stack import StackInfo
from thaw.steps import register_step
from thawctl.mlflow_ui import answer_links

pytestmark = pytest.mark.slow


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_experiments_thaw_uses_are_custom_model_development(stack: StackInfo) -> None:
    client = MlflowClient()
    experiment = _name("views")
    parent = tracking.ensure_parent_run(experiment, uuid.uuid4().hex)
    tags = client.get_experiment(client.get_run(parent).info.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"

    older = _name("views-older")  # made before thaw tagged its experiments
    older_id = client.create_experiment(older)
    tracking.ensure_parent_run(older, uuid.uuid4().hex)
    assert client.get_experiment(older_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"
    client.set_experiment_tag(older_id, "mlflow.experimentKind", "genai_development")
    tracking.ensure_parent_run(older, uuid.uuid4().hex)
    assert client.get_experiment(older_id).tags["mlflow.experimentKind"] == \
        "genai_development", "a kind someone chose is left alone"


def test_the_source_dataset_is_each_stage_runs_input(stack: StackInfo,
                                                     prepared_sample: PreparedDataset) -> None:
    client = MlflowClient()
    manifest = prepared_sample.manifest
    for source, source_type in ((manifest.source, "local"),
                                ("s3://thaw/datasets/fashion-mnist-sample", "s3")):
        # one experiment each: MLflow keeps one dataset per name and digest in an experiment
        parent = tracking.ensure_parent_run(_name("views"), uuid.uuid4().hex)
        run_id = tracking.start_stage_run(parent, "probe", {})
        mlflow_views.log_source_dataset(run_id, dataclasses.replace(manifest, source=source))
        [entry] = client.get_run(run_id).inputs.dataset_inputs
        assert entry.dataset.digest == manifest.fingerprint[:12]
        assert manifest.fingerprint.startswith(entry.dataset.digest)
        assert entry.dataset.name == "fashion-mnist-sample"
        assert entry.dataset.source_type == source_type
        assert source in entry.dataset.source
        assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == "training"


def test_register_puts_the_stage_comparison_on_the_parent_run(
        stack: StackInfo, prepared_sample: PreparedDataset, tmp_path: Path) -> None:
    experiment, pipeline_run = _name("views"), uuid.uuid4().hex
    parent = tracking.ensure_parent_run(experiment, pipeline_run)
    meta = {"classes": prepared_sample.manifest.classes, "stage": "probe",
            "data_config": prepared_sample.manifest.data_config()}
    save_checkpoint(tmp_path / "best.pt",
                    create_backbone("efficientnet_lite0", len(meta["classes"]), "packaged"), meta)
    stages = []
    for stage, epochs in (("probe", 3), ("partial", 2), ("full", 2)):
        run_id = tracking.start_stage_run(parent, stage, {})
        log_epoch = tracking.epoch_logger(run_id)
        for epoch in range(1, epochs + 1):
            log_epoch({"epoch": epoch, "val_macro_f1": 0.2 + 0.1 * epoch})
        stages.append({"stage": stage, "run_id": run_id,
                       "val": {"accuracy": 0.5, "macro_f1": 0.4, "loss": 1.0},
                       "test": {"accuracy": 0.5, "macro_f1": 0.35}, "best_epoch": epochs,
                       "wall_seconds": 1.0, "train_images_per_sec": 1.0})
    dirs = {s["stage"]: tmp_path for s in stages}
    report = {"classes": meta["classes"], "fingerprint": prepared_sample.manifest.fingerprint,
              "stages": stages}
    outcome = register_step(report, dirs, prepared_sample.root, experiment=experiment,
                            pipeline_run_id=pipeline_run, model_name=_name("views"),
                            selection_metric="macro_f1", promotion_margin=0.0)

    assert mlflow_views.COMPARISON_FILE in \
        [a.path for a in MlflowClient().list_artifacts(parent)]
    path = mlflow.artifacts.download_artifacts(
        f"runs:/{parent}/{mlflow_views.COMPARISON_FILE}", dst_path=str(tmp_path / "dl"))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 600

    # every stage's checkpoint is a logged model of its stage run, named by the stage, its
    # numbers linked to it
    client = MlflowClient()
    models = client.search_logged_models(
        experiment_ids=[client.get_run(parent).info.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(s["run_id"] for s in stages), \
        "one model per stage run: the registered one is not logged twice"
    assert outcome["stage"] in {s["stage"] for s in stages}
    stage_of_run = {s["run_id"]: s["stage"] for s in stages}
    assert sorted(m.name for m in models) == ["full", "partial", "probe"]
    for model in models:
        assert model.name == stage_of_run[model.source_run_id]
        linked = {m.key: m.value for m in model.metrics or []}
        assert linked["best_val_macro_f1"] == pytest.approx(0.4)
        assert linked["test_macro_f1"] == pytest.approx(0.35)

    _check_answer_links(stack, outcome, parent, stages)


def _check_answer_links(stack: StackInfo, outcome: dict, parent: str,
                        stages: list[dict]) -> None:
    """The links the demo prints: the parent run on an artifact it holds, and the
    experiment's runs; each in the machine-learning workflow (what 3.17.2's UI reads:
    thawctl/mlflow_ui.py)."""
    links = answer_links(stack.ui_url, outcome)
    experiment_id = MlflowClient().get_run(parent).info.experiment_id
    base = f"{stack.ui_url.rstrip('/')}/#/experiments/{experiment_id}"
    page, query = links.comparison.split("?")
    artifact = page.removeprefix(f"{base}/runs/{parent}/artifacts/")
    assert artifact in {a.path for a in MlflowClient().list_artifacts(parent)}
    assert artifact in ("run_report.html", mlflow_views.COMPARISON_FILE)
    assert parse_qs(query) == {"workflowType": ["machine_learning"]}
    page, query = links.experiment.split("?")
    assert page == f"{base}/runs"
    assert parse_qs(query) == {"workflowType": ["machine_learning"]}


def test_a_chart_that_cannot_be_drawn_only_warns(stack: StackInfo, caplog) -> None:
    parent = tracking.ensure_parent_run(_name("views"), uuid.uuid4().hex)
    outcome = {"stage": "probe", "stages": [{"stage": "probe", "run_id": "no-such-run",
                                             "val": {}, "test": {}}]}
    assert not mlflow_views.log_stage_comparison(parent, outcome)
    assert "could not draw stage_comparison.png" in caplog.text
