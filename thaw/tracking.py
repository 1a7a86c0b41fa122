"""MLflow tracking and registry: one parent run per pipeline run, one nested run per stage,
and the registration of the best stage behind a champion gate.

Pipeline steps run in separate processes, so nothing here relies on MLflow's "active run":
runs are addressed by id through ``MlflowClient``, and the parent run is found again by its
``thaw.pipeline_run_id`` tag. The tracking server comes from ``MLFLOW_TRACKING_URI``.

Outages: MLflow's client retries refused or dropped connections and 5xx answers itself
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``: by default 7 retries backing off 4 s to 2 min, about 4
minutes in all); when they are spent, the functions here raise ``storage.Unreachable``
naming the server. Values of secret variables never reach params, tags or logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from thaw import champion as gate
from thaw import mlflow_views
from thaw.champion import CHAMPION
from thaw.data.prepared import PreparedDataset
from thaw.errors import ThawError
from thaw.storage import Unreachable, redact, unreachable_message

log = logging.getLogger(__name__)

PIPELINE_RUN_TAG = "thaw.pipeline_run_id"
STAGE_TAG = "thaw.stage"
ERROR_TAG = "thaw.error"
PROMOTION_TAG = "thaw.promotion"  # the champion gate's reason, on the version and parent run
_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
_MAX_TAG = 5000  # MLflow caps tag values at 8000 characters
_METRICS_PER_BATCH = 1000  # MLflow's cap per log_batch call


@contextmanager
def tracking_errors(action: str) -> Iterator[None]:
    """Turn "MLflow did not answer after its retries" into ``Unreachable`` naming the
    server and ``action``; other MLflow errors pass unchanged."""
    started = time.monotonic()
    try:
        yield
    except (MlflowException, requests.exceptions.RequestException) as err:
        if _outage(err) is None:
            raise
        raise Unreachable(unreachable_message(
            "MLflow tracking server", mlflow.get_tracking_uri(),
            MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() + 1, started, f"could not {action}: {err}",
            "check MLFLOW_TRACKING_URI; MLFLOW_HTTP_REQUEST_MAX_RETRIES and "
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR set the retries")) from err


def _outage(err: BaseException) -> BaseException | None:
    """The connection failure, timeout or 5xx behind ``err``, if that is what it was (MLflow
    raises its own exception with the ``requests`` one as context)."""
    seen: BaseException | None = err
    for _ in range(8):  # a short chain: never loop on a cyclic one
        if seen is None:
            return None
        if isinstance(seen, requests.exceptions.HTTPError):
            if seen.response is not None and seen.response.status_code >= 500:
                return seen
        elif (isinstance(seen, requests.exceptions.RequestException)
              and not isinstance(seen, requests.exceptions.InvalidURL)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def best_effort(err: BaseException, action: str, call: Callable[[], Any]) -> None:
    """Run the clean-up ``call`` after ``err``. If it fails too, the failure is logged and
    added to ``err``'s notes, never raised: ``err`` is the error the user must see."""
    try:
        call()
    except Exception as secondary:
        log.error("could not %s after an error (%s): %s", action, redact(str(err)),
                  redact(str(secondary)))
        err.add_note(redact(f"could not {action} after this failure: {secondary}"))


@tracking_errors("find or create the pipeline's parent run")
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


@tracking_errors("start the stage run")
def start_stage_run(parent_run_id: str, stage: str, params: dict[str, Any]) -> str:
    """A nested run for one stage under the parent run, with ``params`` (nested dicts
    flattened to ``a.b`` keys)."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    run = client.create_run(parent.info.experiment_id, run_name=stage,
                            tags={MLFLOW_PARENT_RUN_ID: parent_run_id, STAGE_TAG: stage})
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


class EpochLogger:
    """An ``on_epoch_end`` callback logging an epoch record's numbers as metrics at
    ``step=record["epoch"]``.

    A tracking outage must not kill hours of training, so a failed call only warns and
    keeps the epoch's metrics: they go with the next epoch's, or with ``flush()`` at the
    end, so MLflow catches up once the server is back (the whole history is in
    ``result.json`` as well). With ``run_id`` None (the run could not be opened yet, see
    ``thaw.stage_run``) it only keeps them.
    """

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.pending: list[Metric] = []
        self._client = MlflowClient()

    def __call__(self, record: dict[str, Any]) -> None:
        step = int(record["epoch"])
        now = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now, step)
                         for key, value in _numbers(record) if key != "epoch"]
        try:
            self._send()
        except (MlflowException, OSError) as err:
            log.warning("could not log epoch %d to MLflow run %s (kept for the next try): %s",
                        step, self.run_id, redact(str(err)))

    def flush(self) -> None:
        """Send what earlier calls could not; ``Unreachable`` if MLflow is still down."""
        with tracking_errors(f"log the epoch metrics of run {self.run_id}"):
            self._send()

    def _send(self) -> None:
        while self.pending and self.run_id is not None:
            batch = self.pending[:_METRICS_PER_BATCH]
            self._client.log_batch(self.run_id, metrics=batch)
            del self.pending[:len(batch)]


def epoch_logger(run_id: str) -> EpochLogger:
    """The ``on_epoch_end`` callback of a stage's run (see ``EpochLogger``)."""
    return EpochLogger(run_id)


@tracking_errors("finish the stage run")
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
    client.log_text(run_id, redact(json.dumps(result, indent=2, default=str)), "result.json")
    _terminate(client, run_id, RunStatus.FINISHED)


@tracking_errors("mark the run failed")
def fail_run(run_id: str, message: str) -> None:
    """Mark a run FAILED, with the reason (secrets redacted) in its ``thaw.error`` tag."""
    client = MlflowClient()
    client.set_tag(run_id, ERROR_TAG, redact(message)[:_MAX_TAG] or "failed")
    _terminate(client, run_id, RunStatus.FAILED)


def _terminate(client: MlflowClient, run_id: str, status: int) -> None:
    """End a run with ``status``. MLflow prints the run's URL to stdout as it does so; with
    ``user:password@`` in the tracking URI that would put the password in the step's log,
    so then it prints nothing."""
    name = MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name
    saved = os.environ.get(name)
    if redact(client.tracking_uri) != client.tracking_uri:
        os.environ[name] = "true"
    try:
        client.set_terminated(run_id, RunStatus.to_string(status))
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@tracking_errors("log the test results")
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


# The exit handler's final status ``state`` when the pipeline's tasks succeeded. A Kubeflow
# Pipelines backend passes the MLMD execution state of the exit handler's DAG
# (backend/src/v2/driver/resolve.go at 2.14.0-2.17.0, GetLastKnownState().String(): COMPLETE,
# CACHED, FAILED or CANCELED); kfp.local passes its own SUCCEEDED or FAILED (kfp 2.17.0,
# kfp/local/orchestrator/orchestrator_utils.py).
SUCCESSFUL_FINAL_STATES = frozenset({"COMPLETE", "CACHED", "SUCCEEDED"})


def pipeline_succeeded(final_state: str) -> bool:
    """Whether an exit handler's final status ``state`` says the pipeline succeeded."""
    return final_state in SUCCESSFUL_FINAL_STATES


@tracking_errors("end the pipeline's parent run")
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
        _terminate(client, parent_id, RunStatus.FINISHED)
    else:
        fail_run(parent_id, message)


@tracking_errors("register the model")
def register_best(
    *,
    parent_run_id: str,
    model_name: str,
    candidates: list[dict[str, Any]],
    data: PreparedDataset,
    selection_metric: str = "macro_f1",
    promotion_margin: float = 0.0,
    promote_on_class_change: bool = False,
    data_fingerprint: str,
    pipeline_run_id: str,
    on_registered: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Register the candidate stage with the best validation ``selection_metric`` and move the
    ``champion`` alias to it if the champion gate (``thaw.champion``) lets it through.

    Each candidate is ``{stage, run_id, checkpoint, val: {...}, test: {...}}``, in stage
    order. Every candidate and the current champion are scored by one function on ``data``
    (the prepared dataset the candidates were trained on): on its validation split to choose
    and to decide (a tie goes to the later stage; a tie with the champion never promotes),
    on its test split for the record only.

    ``on_registered(outcome)`` runs once the version is registered and the alias set (the
    caller's own records). If anything fails after the version exists, the alias is given
    back to the previous champion (or removed if there was none) and the version deleted,
    so a failed registration changes nothing.
    """
    from thaw.serving import log_classifier
    from thaw.stages import score_checkpoint

    _check_candidates(candidates, selection_metric, promotion_margin)
    scored = [{**c, "score": score_checkpoint(Path(c["checkpoint"]), data, "val")}
              for c in candidates]
    best = gate.choose(scored, selection_metric)
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        current = gate.fetch_champion(client, model_name, Path(tmp))
        decision = gate.decide(best, current, data, metric=selection_metric,
                               margin=promotion_margin,
                               promote_on_class_change=promote_on_class_change)
    previous = decision["previous_champion_version"]
    challenger = decision["challenger"]
    info = log_classifier(Path(best["checkpoint"]), name=best["stage"], run_id=best["run_id"])
    tags = {
        STAGE_TAG: best["stage"],
        PIPELINE_RUN_TAG: pipeline_run_id,
        "thaw.parent_run_id": parent_run_id,
        "thaw.data_fingerprint": data_fingerprint,
        "thaw.selection_metric": selection_metric,
        **{f"{split}_{key}": challenger[split][key]
           for split in ("val", "test") for key in gate.REPORTED},
    }
    version = mlflow.register_model(info.model_uri, model_name, tags=tags).version
    moved = False
    try:
        reason = gate.reason(decision, version)
        client.set_model_version_tag(model_name, version, PROMOTION_TAG, reason[:_MAX_TAG])
        if decision["promoted"]:
            _move_alias(client, model_name, version, expected=previous)
            moved = True
        client.log_batch(parent_run_id, tags=[
            RunTag("thaw.best_stage", best["stage"]),
            RunTag("thaw.registered_model", f"{model_name}/{version}"),
            RunTag("thaw.promoted", str(decision["promoted"]).lower()),
            RunTag(PROMOTION_TAG, reason[:_MAX_TAG]),
        ])
        outcome = {
            "model_name": model_name, "version": version, "stage": best["stage"],
            "model_uri": f"models:/{model_name}/{version}", "promoted": decision["promoted"],
            "champion_version": version if decision["promoted"] else previous,
            "previous_champion_version": previous, "reason": reason,
            "gate": {key: decision[key] for key in ("kind", "metric", "higher_is_better",
                                                    "margin", "challenger", "champion",
                                                    "class_change")}
            | {"stage_val": {c["stage"]: c["score"] for c in scored}},
        }
        if on_registered is not None:
            on_registered(outcome)
    except BaseException as err:
        _undo_registration(client, model_name, version, previous, moved, err, parent_run_id)
        raise
    return outcome


def _check_candidates(candidates: list[dict[str, Any]], metric: str, margin: float) -> None:
    if not candidates:
        raise ThawError("no candidate stage to register: every stage failed or was skipped")
    gate.check_metric(metric)
    if not margin >= 0:  # also rejects NaN
        raise ThawError(f"promotion_margin must be >= 0, got {margin}")
    for candidate in candidates:
        missing = [k for k in ("stage", "run_id", "checkpoint", "val") if k not in candidate]
        if missing:
            raise ThawError(f"candidate {candidate.get('stage', '?')} lacks {missing}")


def _move_alias(client: MlflowClient, model_name: str, version: str,
                expected: str | None) -> None:
    """Point ``champion`` at ``version``, unless another run moved it since the gate read it
    (the comparison would then be against the wrong model)."""
    now = client.get_registered_model(model_name).aliases.get(CHAMPION)
    if now != expected:
        raise ThawError(f"the champion alias of {model_name!r} moved to v{now} while this run "
                        f"compared against {f'v{expected}' if expected else 'no champion'}: "
                        f"run the registration again")
    client.set_registered_model_alias(model_name, CHAMPION, version)


def _undo_registration(client: MlflowClient, model_name: str, version: str,
                       previous: str | None, moved: bool, err: BaseException,
                       parent_run_id: str) -> None:
    """Give the alias back to ``previous`` (or remove it) if it was moved, delete the new
    version and say so on the parent run. A step of this that fails is added to ``err``'s
    notes, never raised."""
    undone = redact(f"registration of v{version} undone after an error: {err}")[:_MAX_TAG]
    steps: list[tuple[str, Callable[[], Any]]] = []
    if moved and previous is not None:
        steps.append((f"give {CHAMPION} back to v{previous}", lambda: client.
                      set_registered_model_alias(model_name, CHAMPION, previous)))
    elif moved:
        steps.append((f"remove {CHAMPION} from v{version}", lambda: client.
                      delete_registered_model_alias(model_name, CHAMPION)))
    steps.append((f"delete v{version}", lambda: client.delete_model_version(model_name,
                                                                             version)))
    tags = [RunTag("thaw.promoted", "false"), RunTag(PROMOTION_TAG, undone),
            RunTag("thaw.registered_model", f"{model_name}/{version} (deleted)")]
    steps.append(("record the undo on the parent run",
                  lambda: client.log_batch(parent_run_id, tags=tags)))
    for what, undo in steps:
        best_effort(err, f"{what} of {model_name!r}", undo)


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags=mlflow_views.experiment_tags())
        except MlflowException as err:  # another step created it meanwhile
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise ThawError(f"MLflow experiment {name!r} is deleted: restore it "
                        f"(mlflow experiments restore --experiment-id "
                        f"{experiment.experiment_id}) or use another experiment name")
    if mlflow_views.EXPERIMENT_KIND_TAG not in experiment.tags:  # made before thaw set it
        for key, value in mlflow_views.experiment_tags().items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _find_parent(client: MlflowClient, experiment_id: str, pipeline_run_id: str) -> str | None:
    if not pipeline_run_id or "'" in pipeline_run_id:
        raise ThawError(f"invalid pipeline run id {pipeline_run_id!r}")
    runs = client.search_runs([experiment_id],
                              filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    flat = [Param(key, redact(str(value))) for key, value in _flatten(params)]
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
