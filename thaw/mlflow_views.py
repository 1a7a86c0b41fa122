"""What makes thaw's runs read well in the MLflow UI: the experiment's kind, the source
dataset as each stage run's input, and a stage-comparison chart on the parent run.

These are views, not records: the numbers behind them are already params, metrics and
``outcome.json``. A failure here warns and never fails training or registration.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from thaw.data.prepared import Manifest
from thaw.storage import redact

log = logging.getLogger(__name__)

# MLflow 3's experiment kind; the value is the UI's ExperimentKind.CUSTOM_MODEL_DEVELOPMENT
# (3.17.2's bundle, main.*.js). That UI decides the landing view by its workflow type instead
# (URL parameter workflowType, else localStorage): see thawctl/mlflow_ui.py. Kept for UIs
# that read the tag (the feature flag off).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"
COMPARISON_FILE = "stage_comparison.png"
DIGEST_CHARS = 12  # MLflow caps a dataset digest at 36 characters; thaw shows 12 everywhere


def experiment_tags() -> dict[str, str]:
    """Tags for an experiment thaw creates."""
    return {EXPERIMENT_KIND_TAG: CUSTOM_MODEL_DEVELOPMENT}


def source_dataset(manifest: Manifest) -> MetaDataset:
    """The source the prepared data came from, as an MLflow dataset: its URI as source,
    the start of its fingerprint as digest (the whole one is the ``data_fingerprint``
    param)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    uri = redact(manifest.source)  # a URL may carry user:password@
    try:
        with warnings.catch_warnings():  # a local path matches two equivalent source types
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
    except Exception:  # a path or scheme no registered source type takes
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        source = HTTPDatasetSource(url=uri)
    name = uri.rstrip("/").rsplit("/", 1)[-1] or uri
    return MetaDataset(source, name=name, digest=manifest.fingerprint[:DIGEST_CHARS])


def log_source_dataset(run_id: str, manifest: Manifest, context: str = "training") -> None:
    """Record the source dataset as an input of run ``run_id`` (MLflow's Datasets column)."""
    try:
        dataset = source_dataset(manifest)._to_mlflow_entity()
        MlflowClient().log_inputs(run_id, datasets=[DatasetInput(
            dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])
    except (MlflowException, OSError, ValueError) as err:
        log.warning("could not log the source dataset to MLflow run %s: %s", run_id,
                    redact(str(err)))


def log_stage_comparison(parent_run_id: str, outcome: dict[str, Any]) -> bool:
    """Log ``stage_comparison.png`` to the parent run: per-epoch validation macro-F1 of every
    stage (epochs counted on across stages, in training order) and final val/test macro-F1
    per stage, the chosen stage marked. Returns whether it was logged."""
    try:
        client = MlflowClient()
        curves = {s["stage"]: [(m.step, m.value) for m in sorted(
            client.get_metric_history(s["run_id"], "val_macro_f1"), key=lambda m: m.step)]
            for s in outcome["stages"]}
        figure = comparison_figure(outcome, curves)
    except Exception as err:  # a chart is never worth a failed registration
        log.warning("could not draw %s: %s", COMPARISON_FILE, redact(str(err)))
        return False
    import matplotlib.pyplot as plt

    try:
        client.log_figure(parent_run_id, figure, COMPARISON_FILE)
        return True
    except Exception as err:
        log.warning("could not log %s to MLflow run %s: %s", COMPARISON_FILE, parent_run_id,
                    redact(str(err)))
        return False
    finally:
        plt.close(figure)


def comparison_figure(outcome: dict[str, Any], curves: dict[str, list[tuple[int, float]]]):
    """The two-panel figure: ``curves`` maps stage to its (epoch, val macro-F1) points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stages = [s["stage"] for s in outcome["stages"]]
    chosen = outcome.get("stage")
    colors = dict(zip(stages, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)

    offset = 0
    for stage in stages:
        points = curves.get(stage) or []
        if points:
            steps = [offset + step for step, _ in points]
            left.plot(steps, [v for _, v in points], marker="o", markersize=3,
                      color=colors[stage], label=stage + (" (chosen)" if stage == chosen else ""),
                      linewidth=2.5 if stage == chosen else 1.5)
            offset = steps[-1]
            left.axvline(offset + 0.5, color="0.85", linewidth=0.8, zorder=0)
    left.set(title="validation macro-F1 per epoch", xlabel="epoch (counted across stages)",
             ylabel="macro-F1")
    left.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)

    x = np.arange(len(stages))
    width = 0.38
    val = [s["val"]["macro_f1"] for s in outcome["stages"]]
    test = [s["test"]["macro_f1"] for s in outcome["stages"]]
    bars_val = right.bar(x - width / 2, val, width, label="val", color="tab:blue")
    bars_test = right.bar(x + width / 2, test, width, label="test", color="tab:orange")
    right.bar_label(bars_val, fmt="%.3f", fontsize=7)
    right.bar_label(bars_test, fmt="%.3f", fontsize=7)
    right.set_xticks(x, [f"{s}\n(chosen)" if s == chosen else s for s in stages])
    for tick, stage in zip(right.get_xticklabels(), stages, strict=True):
        if stage == chosen:
            tick.set_fontweight("bold")
    if chosen in stages:
        right.axvspan(stages.index(chosen) - 0.5, stages.index(chosen) + 0.5,
                      color="gold", alpha=0.2, zorder=0)
    right.set(title="best-epoch macro-F1 per stage", ylabel="macro-F1",
              ylim=(0, min(1.05, max(val + test + [0.0]) * 1.15) or 1.0))
    right.legend(fontsize=8, loc="lower right")
    return figure


def log_stage_models(outcome: dict[str, Any], checkpoints: dict[str, Path]) -> dict[str, str]:
    """Each stage's best checkpoint as a logged model of its stage run, named by its stage
    (probe, partial, full), with its best-epoch validation and test numbers linked to it (a
    metric logged with ``model_id``: ``LoggedModel.metrics``), so MLflow's Models view
    compares the stages.

    The chosen stage's model is the one registration logged; the others are logged here.
    Returns stage -> model id for the stages that made it; a failure only warns.
    """
    from thaw.serving import log_classifier

    client = MlflowClient()
    models: dict[str, str] = {}
    for stage in outcome["stages"]:
        name = stage["stage"]
        try:
            if name == outcome.get("stage"):  # registration logged it to this run
                run = client.get_run(stage["run_id"])
                found = client.search_logged_models(
                    experiment_ids=[run.info.experiment_id],
                    filter_string=f"source_run_id = '{stage['run_id']}'",
                    order_by=[{"field_name": "creation_time", "ascending": False}],
                    max_results=1)
                model_id = found[0].model_id if found else None
            else:
                model_id = log_classifier(Path(checkpoints[name]), name=name,
                                          run_id=stage["run_id"]).model_id
            if not model_id:
                continue
            now = int(time.time() * 1000)
            values = {f"best_val_{k}": v for k, v in stage["val"].items()} | {
                f"test_{k}": stage["test"][k] for k in ("accuracy", "macro_f1")
                if k in stage["test"]}
            client.log_batch(stage["run_id"], metrics=[
                Metric(key, float(value), now, 0, model_id=model_id)
                for key, value in values.items()
                if isinstance(value, int | float) and not isinstance(value, bool)])
            models[name] = model_id
        except Exception as err:
            log.warning("could not log %s's model to MLflow run %s: %s", name,
                        stage["run_id"], redact(str(err)))
    return models


def log_run_report(parent_run_id: str, page: Path) -> bool:
    """Attach the run report (``thaw.report``) in ``page`` to the parent run as
    ``run_report.html``: MLflow's artifact view shows an ``.html`` artifact as a page (3.17:
    ShowArtifactHtmlView, a sandboxed iframe). Returns whether it was logged."""
    from thaw.report import REPORT_FILE

    try:
        MlflowClient().log_text(parent_run_id, page.read_text(encoding="utf-8"), REPORT_FILE)
        return True
    except Exception as err:  # the page is also the register step's output
        log.warning("could not log %s to MLflow run %s: %s", REPORT_FILE, parent_run_id,
                    redact(str(err)))
        return False
