"""The pipeline's steps as plain functions over local paths: KFP components call these and
nothing else, so every step runs and is tested without Kubeflow.

MLflow: each training step opens a nested run under the pipeline run's parent run (found or
created by the pipeline run id); evaluate adds test metrics to each stage's run; register
picks the best stage by validation and applies the champion gate.

Files a step writes are written atomically (complete or absent after a crash), and a step
that could not record or upload what it made fails: it never reports success without it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from thaw import mlflow_views, storage, tracking
from thaw.backbones import data_config
from thaw.config import STAGE_NAMES, stage_config
from thaw.data.prepare import prepare_dataset
from thaw.data.prepared import open_prepared
from thaw.errors import ThawError
from thaw.report import REPORT_FILE, write_run_report
from thaw.stage_run import StageRun

STAGE_RUN_FILE = "stage_run.json"
OUTCOME_FILE = "outcome.json"
# Where training steps keep resumable checkpoints, keyed by pipeline run and stage (an
# s3:// prefix on a cluster, from the thaw-config ConfigMap). Unset: no mirroring.
CHECKPOINT_ROOT_ENV = "THAW_CHECKPOINT_URI"
FAILURE_FILE = "failed.json"
# Left by an optional stage that a run leaves off (``stage_off_step``), in its model's place.
STAGE_OFF_FILE = "stage_off.json"
# Each step ends with one line a person reads first (thawctl's console shows it).
SUMMARY = "thaw summary: %s"
log = logging.getLogger(__name__)


def preprocess_step(data_uri: str, out_dir: Path, *, arch: str, image_size: int, seed: int,
                    max_bad_fraction: float,
                    pipeline_parameters: dict[str, Any] | None = None,
                    num_workers: int = 0, image_format: str = "raw",
                    shard_uri: str = "") -> dict[str, Any]:
    """Validate, split and resize the source once into a prepared dataset, decoding in
    ``num_workers`` processes (0 or 1: in this one). ``image_format`` and ``shard_uri``:
    see ``thaw.data.prepare.prepare_dataset`` (empty ``shard_uri``: shards in ``out_dir``).

    Bad ``pipeline_parameters`` (those of the later steps too) are refused before anything
    is listed or decoded, so a bad run fails here in seconds, not in a later step."""
    from thaw.params import check_pipeline_parameters

    check_pipeline_parameters({"backbone": arch, "image_size": image_size,
                               "max_bad_fraction": max_bad_fraction,
                               "image_format": image_format, "shard_uri": shard_uri,
                               **(pipeline_parameters or {})})
    with tempfile.TemporaryDirectory() as workdir:
        manifest = prepare_dataset(
            data_uri, Path(out_dir), data_config=data_config(arch, image_size), seed=seed,
            max_bad_fraction=max_bad_fraction, workdir=Path(workdir), num_workers=num_workers,
            image_format=image_format, shard_uri=shard_uri or None,
        )
    kept = sum(manifest.split_size(split) for split in manifest.counts)
    log.info(SUMMARY, f"{kept} images kept, {len(manifest.skipped)} skipped, "
                      f"{len(manifest.classes)} classes")
    return {"classes": manifest.classes, "counts": manifest.counts,
            "fingerprint": manifest.fingerprint, "skipped": len(manifest.skipped)}


def train_step(prepared_dir: Path, out_dir: Path, *, stage: str, settings: dict[str, Any],
               arch: str, weights: str, init_dir: Path | None, experiment: str,
               pipeline_run_id: str, processes: int = 1) -> dict[str, Any]:
    """Train one stage (warm-started from ``init_dir``'s best checkpoint when given) inside
    its own nested MLflow run; the run is marked failed if training raises.

    ``out_dir`` (checkpoints, ``result.json``, ``stage_run.json``) is complete before the
    MLflow run is finished, so an MLflow outage at the end loses no trained model: the
    step then fails saying so, and running it again resumes from the checkpoints.

    ``processes`` > 1 trains data-parallel in that many processes on this machine (one per
    GPU, started by torchrun; ``thaw.stage_job``). Inside such a process group (torchrun
    started this process) only rank 0 talks to MLflow."""
    from thaw.stages import run_stage
    from thaw.training import distributed

    cfg = stage_config(stage, **settings)
    if processes > 1:
        return _train_in_processes(processes, prepared_dir, out_dir, stage=stage,
                                   settings=settings, arch=arch, weights=weights,
                                   init_dir=init_dir, experiment=experiment,
                                   pipeline_run_id=pipeline_run_id)
    checkpoint_uri = stage_checkpoint_uri(pipeline_run_id, stage)
    refuse_known_failure(checkpoint_uri)
    data = open_prepared(Path(prepared_dir))
    if not distributed.current().is_main:
        try:
            return run_stage(data, cfg, Path(out_dir), arch=arch, weights=weights,
                             init_checkpoint=Path(init_dir) / "best.pt" if init_dir else None,
                             checkpoint_uri=checkpoint_uri).to_dict()
        except BaseException as err:
            _record_bad_input(err, checkpoint_uri)  # any rank may be the one that saw it
            raise
    stage_run = StageRun(experiment, pipeline_run_id, stage, {
        **cfg.to_dict(), "arch": arch, "weights": weights if init_dir is None else "previous stage",
        "data_fingerprint": data.manifest.fingerprint, "classes": len(data.manifest.classes)},
        data.manifest)
    stage_run.try_open()  # MLflow down: training goes on, the run opens later
    try:
        result = run_stage(
            data, cfg, Path(out_dir), arch=arch, weights=weights,
            init_checkpoint=Path(init_dir) / "best.pt" if init_dir else None,
            on_epoch_end=stage_run, checkpoint_uri=checkpoint_uri,
        )
    except BaseException as err:
        stage_run.fail(err)
        _record_bad_input(err, checkpoint_uri)
        raise
    summary = result.to_dict()
    try:
        run_id = stage_run.open()
        storage.write_json_atomic(Path(out_dir) / STAGE_RUN_FILE,
                                  {"run_id": run_id, "stage": stage})
        stage_run.finish(summary)
    except storage.Unreachable as err:
        raise storage.Unreachable(
            f"stage {stage} trained and its outputs are complete in {out_dir}, but its MLflow "
            f"run {stage_run.run_id or '(never opened)'} could not be finished: {err}. Run "
            "the step again once MLflow is back: it resumes from the stage's checkpoints"
        ) from err
    log.info(SUMMARY, f"{stage}: best val macro-F1 {result.best_val['macro_f1']:.3f} "
                      f"(epoch {result.best_epoch})")
    return summary


def _train_in_processes(processes: int, prepared_dir: Path, out_dir: Path, *,
                        init_dir: Path | None, **step: Any) -> dict[str, Any]:
    """``train_step`` run by ``processes`` torchrun processes; rank 0's summary."""
    from thaw.torchrun import stage_arguments, torchrun_in_pod

    torchrun_in_pod(processes, stage_arguments(
        prepared=str(prepared_dir), out=str(out_dir),
        init=str(init_dir) if init_dir else None, **step))
    return stage_record(Path(out_dir), "result.json")


def _record_bad_input(err: BaseException, checkpoint_uri: str | None) -> None:
    """For bad input (a ThawError that is no outage), leave the marker that stops retries;
    without hiding ``err``. Every rank may write it: the same key, whole-object writes."""
    if isinstance(err, ThawError) and not isinstance(err, storage.Unreachable):
        tracking.best_effort(err, "record the failure for retries of this step",
                             lambda: _record_failure(checkpoint_uri, err))


def stage_checkpoint_uri(pipeline_run_id: str, stage: str) -> str | None:
    """``$THAW_CHECKPOINT_URI/<pipeline run>/<stage>``: the same for every attempt of a
    step, unlike its output folder, which a retried pod gets empty."""
    root = os.environ.get(CHECKPOINT_ROOT_ENV, "").strip().rstrip("/")
    return f"{root}/{pipeline_run_id}/{stage}" if root else None


def refuse_known_failure(checkpoint_uri: str | None) -> None:
    """Fail at once when an earlier attempt of this step failed on bad input: a retry (set
    for preempted or crashed pods) would only fail again, after holding a GPU node."""
    if checkpoint_uri is None:
        return
    marker = f"{checkpoint_uri}/{FAILURE_FILE}"
    with tempfile.TemporaryDirectory() as tmp:
        if storage.is_s3_uri(marker):
            if not storage.exists(marker):
                return
            text = storage.download_file(marker, Path(tmp) / FAILURE_FILE).read_text()
        elif Path(marker).is_file():
            text = Path(marker).read_text()
        else:
            return
    raise ThawError(f"not retrying: an earlier attempt failed on its input: "
                    f"{json.loads(text)['error']}")


def _record_failure(checkpoint_uri: str | None, err: ThawError) -> None:
    if checkpoint_uri is None:
        return
    record = {"error": storage.redact(str(err))}
    if not storage.is_s3_uri(checkpoint_uri):
        storage.write_json_atomic(Path(checkpoint_uri) / FAILURE_FILE, record)
        return
    with tempfile.TemporaryDirectory() as tmp:
        marker = storage.write_json_atomic(Path(tmp) / FAILURE_FILE, record)
        storage.upload_file(marker, f"{checkpoint_uri}/{FAILURE_FILE}")


def stage_off_step(out_dir: Path, stage: str) -> None:
    """Stand in for optional ``stage`` (the LoRA stage) that this run leaves off: its model
    folder says so, and evaluate and register leave the stage out (``trained_stages``)."""
    storage.write_json_atomic(Path(out_dir) / STAGE_OFF_FILE,
                              {"stage": stage, "reason": f"the pipeline parameter {stage} is off"})
    log.info(SUMMARY, f"{stage}: off")


def trained_stages(stage_dirs: dict[str, Path]) -> dict[str, Path]:
    """``stage_dirs`` without the stages a run left off (``stage_off_step``)."""
    return {stage: Path(path) for stage, path in stage_dirs.items()
            if not (Path(path) / STAGE_OFF_FILE).is_file()}


def evaluate_step(prepared_dir: Path, stage_dirs: dict[str, Path]) -> dict[str, Any]:
    """Test-set metrics of every stage's best checkpoint, logged to that stage's run, with
    its worst test mistakes and its per-epoch history (for the run report, ``thaw.report``).
    Test numbers are reported, never used to choose. Stages left off are left out."""
    from thaw.checkpoint import load_checkpoint, model_from_checkpoint
    from thaw.data.prepared import ImageSplit
    from thaw.evaluation import classification_metrics, mistakes
    from thaw.stages import predict_split

    data = open_prepared(Path(prepared_dir))
    stage_dirs = trained_stages(stage_dirs)
    # predict_split reads a streamed split shard by shard: its rows are in storage order
    image_index = ImageSplit(data, "test").storage_order() if data.streamed else None
    report: dict[str, Any] = {"classes": data.manifest.classes,
                              "fingerprint": data.manifest.fingerprint, "stages": []}
    for stage in STAGE_NAMES:
        if stage not in stage_dirs:
            continue
        stage_dir = Path(stage_dirs[stage])
        result = stage_record(stage_dir, "result.json")
        run = stage_record(stage_dir, STAGE_RUN_FILE)
        y_true, probs = predict_split(model_from_checkpoint(load_checkpoint(
            stage_dir / "best.pt")), data, "test")
        test = classification_metrics(y_true, probs.argmax(1), data.manifest.classes,
                                      detailed=True)
        tracking.log_evaluation(run["run_id"], stage, test, data.manifest.classes)
        report["stages"].append({
            "stage": stage, "run_id": run["run_id"], "val": result["best_val"], "test": test,
            "best_epoch": result["best_epoch"],
            "wall_seconds": result["wall_seconds"],
            "train_images_per_sec": result["train_images_per_sec"],
            # Why training stopped on a NaN/infinite loss; None if it did not. Register
            # never chooses a diverged stage (thaw.champion.choose).
            "diverged": result.get("diverged"),
            "history": result["history"],
            "test_mistakes": mistakes(y_true, probs, image_index),
        })
    if not report["stages"]:
        raise ThawError("evaluate got no trained stage to evaluate")
    log.info(SUMMARY, "test macro-F1 " + ", ".join(
        f"{s['stage']} {s['test']['macro_f1']:.3f}" for s in report["stages"]))
    return report


def stage_record(stage_dir: Path, name: str) -> dict[str, Any]:
    """A JSON record a training step left in its output folder."""
    path = stage_dir / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ThawError(f"{path} is missing or unreadable ({err}): the stage in {stage_dir} "
                        "did not finish; run its training step again") from err


def register_step(report: dict[str, Any], stage_dirs: dict[str, Path], prepared_dir: Path, *,
                  experiment: str, pipeline_run_id: str, model_name: str,
                  selection_metric: str, promotion_margin: float,
                  promote_on_class_change: bool = False,
                  report_file: Path | None = None) -> dict[str, Any]:
    """Register the stage with the best validation metric; move ``champion`` if it wins.

    The checkpoints come from ``stage_dirs`` and the data from ``prepared_dir`` (this step's
    own input artifacts), never from paths another step wrote into the report: on a cluster
    those are in another pod. The champion gate scores the current champion on this data.
    ``outcome.json``, ``summary.md``, the parent run's tags and the run report
    (``thaw.report``; in ``report_file``, whose path the outcome records as ``report``, else in
    a temporary file) are written before register returns; if writing them fails, the
    registration is undone (alias and version). The run report is then attached to the
    parent run, as its other views are: a failure there only warns. Stages left off
    (``stage_off_step``) are no candidates.
    """
    stage_dirs = trained_stages(stage_dirs)
    missing = [s["stage"] for s in report["stages"] if s["stage"] not in stage_dirs]
    if missing:
        raise ThawError(f"register got no model artifact for stage(s) {missing}")
    data = open_prepared(Path(prepared_dir))
    if data.manifest.fingerprint != report["fingerprint"]:
        raise ThawError(f"register got prepared data {data.manifest.fingerprint[:12]} but "
                        f"evaluate's report is about {report['fingerprint'][:12]}")
    candidates = [{**s, "checkpoint": str(Path(stage_dirs[s["stage"]]) / "best.pt")}
                  for s in report["stages"]]
    parent = tracking.ensure_parent_run(experiment, pipeline_run_id)
    recorded: dict[str, Any] = {}
    workdir = tempfile.TemporaryDirectory()
    page = Path(report_file) if report_file else Path(workdir.name) / REPORT_FILE

    def record(registration: dict[str, Any]) -> None:
        outcome = {**registration, "stages": report["stages"],
                   "selection_metric": selection_metric,
                   "report": str(report_file) if report_file else None}
        write_run_report(page, outcome, data)
        client = MlflowClient()
        client.log_dict(parent, outcome, OUTCOME_FILE)
        client.log_text(parent, summary_markdown(outcome), "summary.md")
        client.set_tag(parent, "thaw.registered_version", str(outcome["version"]))
        client.set_tag(parent, "thaw.promoted", str(outcome["promoted"]).lower())
        recorded.update(outcome)

    with workdir:
        tracking.register_best(
            parent_run_id=parent, model_name=model_name, candidates=candidates, data=data,
            selection_metric=selection_metric, promotion_margin=promotion_margin,
            promote_on_class_change=promote_on_class_change,
            data_fingerprint=report["fingerprint"], pipeline_run_id=pipeline_run_id,
            on_registered=record,
        )
        mlflow_views.log_run_report(parent, page)
    mlflow_views.log_stage_comparison(parent, recorded)
    mlflow_views.log_stage_models(recorded, {stage: Path(stage_dirs[stage]) / "best.pt"
                                             for stage in stage_dirs})
    log.info(SUMMARY, f"registered {model_name} v{recorded['version']} "
                      f"({recorded['stage']}): {recorded['reason']}")
    return recorded


def latest_outcome(experiment: str, since: float) -> dict[str, Any]:
    """The outcome register recorded on the newest pipeline run started after ``since``."""
    with tracking.tracking_errors("find the newest pipeline run"):
        found = mlflow.search_runs(
            experiment_names=[experiment], output_format="list", max_results=1,
            filter_string=f"tags.thaw.pipeline_run_id != '' and attributes.start_time >= "
                          f"{int(since * 1000)}",
            order_by=["attributes.start_time DESC"])
    found = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    if not found:
        raise ThawError(f"no pipeline run recorded in MLflow experiment {experiment!r}")
    try:
        with tracking.tracking_errors("read the pipeline run's outcome"):
            return mlflow.artifacts.load_dict(f"runs:/{found[0].info.run_id}/{OUTCOME_FILE}")
    except storage.Unreachable:
        raise
    except Exception as err:
        raise ThawError(f"pipeline run {found[0].info.run_id} registered nothing") from err


def summary_markdown(outcome: dict[str, Any]) -> str:
    """The human-readable result of a pipeline run: stage table, choice, champion gate."""
    metric = outcome["selection_metric"]
    lines = [
        "| stage | val acc | val macro-F1 | test acc | test macro-F1 | best epoch | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in outcome["stages"]:
        mark = " **(chosen)**" if s["stage"] == outcome["stage"] else ""
        lines.append(
            f"| {s['stage']}{mark} | {s['val']['accuracy']:.3f} | {s['val']['macro_f1']:.3f} | "
            f"{s['test']['accuracy']:.3f} | {s['test']['macro_f1']:.3f} | {s['best_epoch']} | "
            f"{s['wall_seconds']:.0f} |")
    lines += [
        "",
        f"Chosen by validation {metric}: **{outcome['stage']}**"
        + (" (every stage re-scored on the validation split as the champion is)."
           if outcome.get("gate") else "."),
        f"Registered **{outcome['model_name']}** version **{outcome['version']}**; "
        + ("alias `champion` now points to it." if outcome["promoted"]
           else "alias `champion` left where it was."),
        *_gate_table(outcome),
        f"Why: {outcome['reason']}",
    ]
    return "\n".join(lines) + "\n"


def _gate_table(outcome: dict[str, Any]) -> list[str]:
    """The champion gate's numbers: challenger and champion, both scored on this run's
    validation and test splits by the same function."""
    gate = outcome.get("gate")
    if not gate:  # an outcome recorded before the gate scored champions
        return []
    metric = gate["metric"]
    keys = [metric] + [k for k in ("accuracy", "macro_f1") if k != metric]
    direction = "higher" if gate["higher_is_better"] else "lower"
    lines = ["", f"Champion gate, on this run's data (val {metric} decides, {direction} is "
                 f"better, margin {gate['margin']:g}):", "",
             "| model | " + " | ".join(f"val {k} | test {k}" for k in keys) + " |",
             "|---|" + "---|---|" * len(keys)]
    rows = [(f"v{outcome['version']} ({gate['challenger']['stage']}, new)", gate["challenger"])]
    if gate.get("champion") and gate["champion"].get("val"):
        rows.append((f"v{gate['champion']['version']} (champion)", gate["champion"]))
    for name, scores in rows:
        lines.append(f"| {name} | " + " | ".join(
            f"{scores['val'][k]:.4f} | {scores['test'][k]:.4f}" for k in keys) + " |")
    return [*lines, ""]
