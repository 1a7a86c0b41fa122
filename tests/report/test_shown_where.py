"""Where the run report is shown: the register step writes it to its KFP HTML output and
attaches it to the MLflow parent run (the embedded stack's real server), and the compiled
pipeline declares that output, which the Kubeflow UI shows among the run's Visualizations
(kfp 2.17 ``kfp/dsl/types/artifact_types.py``: ``HTML``, schema title ``system.HTML``)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from tests.report.synthetic import history
from thaw import tracking
from thaw.backbones import create_backbone
from thaw.checkpoint import save_checkpoint
from thaw.data.prepared import PreparedDataset
from thaw.report import REPORT_FILE
from thaw.stack import StackInfo
from thaw.steps import STAGE_RUN_FILE, evaluate_step, register_step


def test_the_compiled_pipeline_declares_the_report_as_an_html_output() -> None:
    """In the golden YAML, which tests/pipeline/test_compile.py holds equal to what the
    pipeline compiles to (compiling again here would cost seconds)."""
    golden = Path(__file__).resolve().parents[2] / "pipelines" / "thaw_pipeline.yaml"
    spec = next(yaml.safe_load_all(golden.read_text()))
    register = spec["components"]["comp-register"]
    outputs = register["outputDefinitions"]["artifacts"]
    assert outputs["run_report"]["artifactType"]["schemaTitle"] == "system.HTML"
    executor = spec["deploymentSpec"]["executors"][register["executorLabel"]]
    assert "report_file=Path(run_report.path)" in executor["container"]["command"][-1]


def _trained_stages(data: PreparedDataset, parent: str, folder: Path) -> dict[str, Path]:
    """Two stage folders as training leaves them (one untrained checkpoint, so the test
    split has mistakes to show)."""
    classes = data.manifest.classes
    checkpoint = folder / "best.pt"
    save_checkpoint(checkpoint, create_backbone("efficientnet_lite0", len(classes), "packaged"),
                    {"classes": classes, "stage": "probe", "data_config":
                     data.manifest.data_config()})
    dirs = {}
    for number, stage in enumerate(("probe", "full")):
        stage_dir = folder / stage
        stage_dir.mkdir()
        (stage_dir / "best.pt").hardlink_to(checkpoint)
        (stage_dir / "result.json").write_text(json.dumps({
            "best_val": {"accuracy": 0.2, "macro_f1": 0.1 + number / 10, "loss": 2.0},
            "best_epoch": 2, "wall_seconds": 3.0, "train_images_per_sec": 50.0,
            "history": history(2, 0.1, with_start_point=number > 0)}))
        (stage_dir / STAGE_RUN_FILE).write_text(json.dumps(
            {"run_id": tracking.start_stage_run(parent, stage, {}), "stage": stage}))
        dirs[stage] = stage_dir
    return dirs


@pytest.mark.slow
def test_register_writes_the_report_and_attaches_it_to_the_parent_run(
        stack: StackInfo, prepared_sample: PreparedDataset, tmp_path: Path) -> None:
    experiment, pipeline_run = f"report-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    parent = tracking.ensure_parent_run(experiment, pipeline_run)
    dirs = _trained_stages(prepared_sample, parent, tmp_path)
    evaluated = evaluate_step(prepared_sample.root, dirs)
    output = tmp_path / "register" / "run_report"  # a KFP output: no file name extension
    outcome = register_step(evaluated, dirs, prepared_sample.root, experiment=experiment,
                            pipeline_run_id=pipeline_run, model_name=experiment,
                            selection_metric="macro_f1", promotion_margin=0.0,
                            report_file=output)

    page = output.read_text(encoding="utf-8")
    assert outcome["report"] == str(output)
    assert MlflowClient().download_artifacts(parent, "outcome.json", str(tmp_path)) and \
        json.loads((tmp_path / "outcome.json").read_text())["report"] == str(output)
    attached = mlflow.artifacts.load_text(f"runs:/{parent}/{REPORT_FILE}")
    assert attached == page

    # the gallery shows real test images: each mistake's index is an image of its true class
    worst = next(s for s in evaluated["stages"] if s["stage"] == outcome["stage"]
                 )["test_mistakes"]["worst"]
    labels = prepared_sample.labels("test")
    assert worst and all(labels[m["index"]] == m["true"] for m in worst)
    assert page.count("<figure class='mistake'>") >= len(worst)
    assert f"Stage <b>{outcome['stage']}</b>" in page and "<svg" in page

