"""MLflow tracking and registry: one parent run per pipeline run, one nested run per stage,
and the registration of the best stage behind a champion gate.

Pipeline steps run in separate processes, so nothing here relies on MLflow's "active run":
runs are addressed by id through ``MlflowClient``, and the parent run is found again by its
``thaw.pipeline_run_id`` tag. The tracking server comes from ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from thaw.errors import ThawError

log = logging.getLogger(__name__)

PIPELINE_RUN_TAG = "thaw.pipeline_run_id"
STAGE_TAG = "thaw.stage"
ERROR_TAG = "thaw.error"
CHAMPION = "champion"
_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
_MAX_TAG = 5000  # MLflow caps tag values at 8000 characters


def ensure_parent_run(experiment: str, pipeline_run_id: str,
                      params: dict[str, Any] | None = None) -> str:
    """The id of the pipeline run's parent run, created (RUNNING, with ``params``) in
    ``experiment`` by whichever step gets there first."""
    client = MlflowClient()
    experiment_id = _experiment_id(client, experiment)
    found = _find_parent(client, experiment_id, pipeline_run_id)
    if found is not None:
        return found
    run = client.create_run(experiment_id, run_name=f"thaw-{pipeline_run_id[:8]}",
                            tags={PIPELINE_RUN_TAG: pipeline_run_id})
    _log_params(client, run.info.run_id, params or {})
    return run.info.run_id


def start_stage_run(parent_run_id: str, stage: str, params: dict[str, Any]) -> str:
    """A nested run for one stage under the parent run, with ``params`` (nested dicts
    flattened to ``a.b`` keys)."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    run = client.create_run(parent.info.experiment_id, run_name=stage,
                            tags={MLFLOW_PARENT_RUN_ID: parent_run_id, STAGE_TAG: stage})
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def epoch_logger(run_id: str) -> Callable[[dict[str, Any]], None]:
    """An ``on_epoch_end`` callback logging an epoch record's numbers as metrics at
    ``step=record["epoch"]``.

    A tracking outage must not kill hours of training, so a failed call only warns: the
    whole history is in ``result.json`` as well.
    """
    client = MlflowClient()

    def log_epoch(record: dict[str, Any]) -> None:
        step = int(record["epoch"])
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step)
                   for key, value in _numbers(record) if key != "epoch"]
        try:
            client.log_batch(run_id, metrics=metrics)
        except (MlflowException, OSError) as err:
            log.warning("could not log epoch %d to MLflow run %s: %s", step, run_id, err)

    return log_epoch


def finish_stage_run(run_id: str, result: dict[str, Any]) -> None:
    """Log a stage's summary (``StageResult.to_dict()``) and mark its run FINISHED."""
    client = MlflowClient()
    summary = {key: result[key] for key in
               ("best_epoch", "wall_seconds", "train_images_per_sec", "trainable_params")
               if key in result}
    summary.update({f"best_val_{key}": value for key, value in result.get("best_val", {}).items()})
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in _numbers(summary)],
        tags=[RunTag(f"thaw.{key}", str(result[key]).lower())
              for key in ("stopped_early", "cached_features") if key in result],
    )
    client.log_text(run_id, json.dumps(result, indent=2, default=str), "result.json")
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def fail_run(run_id: str, message: str) -> None:
    """Mark a run FAILED, with the reason in its ``thaw.error`` tag."""
    client = MlflowClient()
    client.set_tag(run_id, ERROR_TAG, message[:_MAX_TAG] or "failed")
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def log_evaluation(run_id: str, stage: str, metrics: dict[str, Any], classes: list[str]) -> None:
    """Log test-set results (``classification_metrics(..., detailed=True)``) to a stage's run:
    ``test_accuracy``, ``test_macro_f1``, ``test_{precision,recall,f1}_<class>`` metrics, and
    ``per_class_report.json`` and ``confusion_matrix.png`` artifacts."""
    import matplotlib.pyplot as plt

    from thaw.evaluation import confusion_matrix_figure

    if "per_class" not in metrics or "confusion_matrix" not in metrics:
        raise ThawError("log_evaluation needs classification_metrics(..., detailed=True)")
    values = {"test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"]}
    for cls in classes:
        report = metrics["per_class"][cls]
        for name, key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            values[f"test_{name}_{_key_safe(cls)}"] = report[key]
    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
    client.log_dict(run_id, metrics["per_class"], "per_class_report.json")
    figure = confusion_matrix_figure(metrics["confusion_matrix"], classes,
                                     f"{stage}: test confusion matrix")
    try:
        client.log_figure(run_id, figure, "confusion_matrix.png")
    finally:
        plt.close(figure)


def finish_parent_run(experiment: str, pipeline_run_id: str, succeeded: bool,
                      message: str = "") -> None:
    """End the pipeline's parent run FINISHED or FAILED (``message``: why it failed); it is
    created first if no step got that far.

    Child runs still RUNNING at this point were abandoned (a failed, killed or retried step):
    they are marked FAILED, whatever the pipeline's outcome.
    """
    client = MlflowClient()
    parent_id = ensure_parent_run(experiment, pipeline_run_id)
    experiment_id = client.get_run(parent_id).info.experiment_id
    running_children = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' "
                      "and attributes.status = 'RUNNING'",
    )
    for child in running_children:
        fail_run(child.info.run_id, "the pipeline ended while this stage was still running"
                 + (f": {message}" if message else ""))
    if succeeded:
        client.set_terminated(parent_id, RunStatus.to_string(RunStatus.FINISHED))
    else:
        fail_run(parent_id, message)


def register_best(
    *,
    parent_run_id: str,
    model_name: str,
    candidates: list[dict[str, Any]],
    selection_metric: str = "macro_f1",
    promotion_margin: float = 0.0,
    data_fingerprint: str,
    pipeline_run_id: str,
) -> dict[str, Any]:
    """Register the candidate stage with the best validation ``selection_metric`` and move the
    ``champion`` alias to it if there is no champion yet or it beats the champion's validation
    metric by at least ``promotion_margin``.

    Each candidate is ``{stage, run_id, checkpoint, val: {...}, test: {...}}``, in stage
    order. Test metrics are recorded, never used to choose. A tie goes to the later stage.
    If anything fails once the version exists, the version is deleted again, so a failed
    registration leaves no model behind.
    """
    best = _choose(candidates, selection_metric, promotion_margin)
    from thaw.serving import log_classifier

    info = log_classifier(Path(best["checkpoint"]), name="model", run_id=best["run_id"])
    tags = {
        STAGE_TAG: best["stage"],
        PIPELINE_RUN_TAG: pipeline_run_id,
        "thaw.parent_run_id": parent_run_id,
        "thaw.data_fingerprint": data_fingerprint,
        "thaw.selection_metric": selection_metric,
        **{f"val_{key}": value for key, value in _numbers(best["val"])},
        **{f"test_{key}": value for key, value in _numbers(best.get("test") or {})},
    }
    version = mlflow.register_model(info.model_uri, model_name, tags=tags).version
    client = MlflowClient()
    try:
        outcome = _champion_gate(client, model_name, version, best, selection_metric,
                                 promotion_margin, data_fingerprint)
        client.set_model_version_tag(model_name, version, "thaw.promotion", outcome["reason"])
        if outcome["promoted"]:
            client.set_registered_model_alias(model_name, CHAMPION, version)
        client.log_batch(parent_run_id, tags=[
            RunTag("thaw.best_stage", best["stage"]),
            RunTag("thaw.registered_model", f"{model_name}/{version}"),
            RunTag("thaw.promoted", str(outcome["promoted"]).lower()),
        ])
    except BaseException:
        client.delete_model_version(model_name, version)
        raise
    return {"model_name": model_name, "version": version, "stage": best["stage"],
            "model_uri": f"models:/{model_name}/{version}", **outcome}


def _choose(candidates: list[dict[str, Any]], metric: str, margin: float) -> dict[str, Any]:
    if not candidates:
        raise ThawError("no candidate stage to register: every stage failed or was skipped")
    if not margin >= 0:  # also rejects NaN
        raise ThawError(f"promotion_margin must be >= 0, got {margin}")
    for candidate in candidates:
        missing = [k for k in ("stage", "run_id", "checkpoint", "val") if k not in candidate]
        if missing:
            raise ThawError(f"candidate {candidate.get('stage', '?')} lacks {missing}")
        if metric not in candidate["val"]:
            raise ThawError(f"unknown selection metric {metric!r}: stage "
                            f"{candidate['stage']} has validation metrics "
                            f"{sorted(candidate['val'])}")
    best = candidates[0]
    for candidate in candidates[1:]:
        if candidate["val"][metric] >= best["val"][metric]:
            best = candidate
    return best


def _champion_gate(client: MlflowClient, model_name: str, version: str, best: dict[str, Any],
                   metric: str, margin: float, fingerprint: str) -> dict[str, Any]:
    """Whether the new version should take the ``champion`` alias, and why (in words)."""
    value = float(best["val"][metric])
    champion_version = client.get_registered_model(model_name).aliases.get(CHAMPION)
    if champion_version is None:
        return {"promoted": True, "champion_version": version, "previous_champion_version": None,
                "reason": f"no champion yet: v{version} ({best['stage']}, val {metric} "
                          f"{value:.4f}) becomes champion"}
    champion = client.get_model_version(model_name, champion_version)
    key = f"val_{metric}"
    try:
        current = float(champion.tags[key])
    except (KeyError, ValueError):
        raise ThawError(
            f"champion v{champion.version} of {model_name!r} has no numeric {key} tag "
            f"(registered outside thaw, or with another selection metric?); compare by hand "
            f"and move the alias, or delete it with MlflowClient().delete_registered_model_alias"
        ) from None
    promoted = value >= current + margin
    verdict = (f"beats champion v{champion.version} ({current:.4f}) by margin {margin:g}: "
               f"v{version} becomes champion") if promoted else (
               f"does not beat champion v{champion.version} ({current:.4f}) by margin "
               f"{margin:g}: champion stays v{champion.version}")
    note = ("" if champion.tags.get("thaw.data_fingerprint") == fingerprint
            else " (note: the champion was validated on different data)")
    return {"promoted": promoted,
            "champion_version": version if promoted else champion.version,
            "previous_champion_version": champion.version,
            "reason": f"val {metric} {value:.4f} {verdict}{note}"}


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException as err:  # another step created it meanwhile
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise ThawError(f"MLflow experiment {name!r} is deleted: restore it "
                        f"(mlflow experiments restore --experiment-id "
                        f"{experiment.experiment_id}) or use another experiment name")
    return experiment.experiment_id


def _find_parent(client: MlflowClient, experiment_id: str, pipeline_run_id: str) -> str | None:
    if not pipeline_run_id or "'" in pipeline_run_id:
        raise ThawError(f"invalid pipeline run id {pipeline_run_id!r}")
    runs = client.search_runs([experiment_id],
                              filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    flat = [Param(key, str(value)) for key, value in _flatten(params)]
    for start in range(0, len(flat), _BATCH):
        client.log_batch(run_id, params=flat[start:start + _BATCH])


def _flatten(params: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in params.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _numbers(values: dict[str, Any]) -> Iterable[tuple[str, float]]:
    """The finite int/float entries (bools are flags, not metrics)."""
    for key, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            yield key, value


def _key_safe(name: str) -> str:
    """A class name usable in a metric key (MLflow allows letters, digits, ``_-. :/``; ``/``
    would nest the metric in the UI)."""
    return re.sub(r"[^\w\-. ]", "_", name)
