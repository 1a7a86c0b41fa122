"""Run the very same pipeline locally: through ``kfp.local`` (fast, one environment), or
step by step in isolated containers through the cluster-fidelity runner; and the demo."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thaw import storage
from thaw.errors import ThawError
from thawctl.console import error_message, kfp_local_console
from thawctl.fidelity import RunResult
from thawctl.kfp_tasks import step_names
from thawctl.sandbox import StepProcess

OnStarted = Callable[[str, int, StepProcess], None]

log = logging.getLogger(__name__)

DEMO_DATA_URI = "s3://thaw/datasets/fashion-mnist-sample"
DEFAULT_PIPELINE_ROOT = "s3://thaw/pipeline-root"
# Sized for a 2-core CPU: real ImageNet weights that ship offline, 64 px; the recipe's own
# stage settings (those benchmarks/quality.py measures at this backbone and size).
DEMO_PARAMETERS: dict[str, Any] = {
    "data_uri": DEMO_DATA_URI,
    "backbone": "efficientnet_lite0",
    "weights": "packaged",
    "image_size": 64,
    "mlflow_experiment": "thaw-demo",
    "model_name": "thaw-fashion-mnist",
}


def run_local(parameters: dict[str, Any], pipeline_root: Path) -> dict[str, Any]:
    """Run the pipeline through ``kfp.local.SubprocessRunner`` in this environment; return
    the outcome that register recorded on the MLflow parent run."""
    from kfp import local

    from pipelines.thaw_pipeline import build_pipeline

    _require_tracking()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    # kfp.local warns that GPU/resource settings and the image are ignored here: expected.
    warnings.filterwarnings("ignore", module="kfp.local")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    started = time.time()
    log_dir = pipeline_root / "logs" / time.strftime("%Y%m%d-%H%M%S")
    pipeline = build_pipeline()
    with kfp_local_console(log_dir, names=local_step_names(pipeline)) as console:
        try:
            pipeline(**parameters)
        except RuntimeError as err:  # kfp.local's "Pipeline ... finished with status FAILURE"
            if console.failed is None:
                raise ThawError(f"the pipeline failed: {err}") from err
            step, log = console.failed
            raise ThawError(f"the pipeline failed at step {step!r}: "
                            f"{error_message(log.read_text())} (full log: {log})") from err
    from thaw.steps import latest_outcome

    experiment = parameters.get("mlflow_experiment") or _default("mlflow_experiment")
    return latest_outcome(experiment, since=started)


def local_step_names(pipeline: Any) -> dict[str, str]:
    """KFP task name -> step name (``train-2`` -> ``partial``) of a ``@dsl.pipeline``
    function, read from the spec it compiles to (its ``pipeline_spec`` proto, as JSON)."""
    from google.protobuf import json_format

    return step_names(json_format.MessageToDict(pipeline.pipeline_spec))


def run_isolated(parameters: dict[str, Any], work_dir: Path, *, engine: str | None = None,
                 image: str | None = None, settings_file: Path | None = None,
                 pipeline_root: str | None = None,
                 on_started: OnStarted | None = None) -> dict[str, Any]:
    """Compile the pipeline (with ``settings_file``'s cluster settings) and run it as a
    cluster would: each step in a fresh container of its image (``engine`` podman/docker;
    ``bwrap`` runs this venv with the same isolation), artifacts only through S3.

    The Secret and ConfigMap the spec names are filled from this environment (the local
    stack's, or yours); checkpoints for resuming go to ``<pipeline root>/../checkpoints``
    unless ``THAW_CHECKPOINT_URI`` is set. Returns the outcome register recorded.
    """
    from pipelines.thaw_pipeline import compile_pipeline
    from thawctl.compiled import cluster_settings
    from thawctl.fidelity import ClusterPlay, FidelityRunner
    from thawctl.sandbox import Sandbox

    _require_tracking()
    settings = cluster_settings(settings_file, image)
    root = (pipeline_root or settings.pipeline_root or DEFAULT_PIPELINE_ROOT).rstrip("/")
    storage.ensure_bucket(root)
    work_dir.mkdir(parents=True, exist_ok=True)
    spec = compile_pipeline(work_dir / "pipeline.yaml", settings)
    env = os.environ
    checkpoints = env.get("THAW_CHECKPOINT_URI") or root.rsplit("/", 1)[0] + "/checkpoints"
    cluster = ClusterPlay(
        secrets={settings.s3_secret: {k: env.get(k, "") for k in
                                      ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}},
        config_maps={settings.config_map: {
            "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
            "AWS_ENDPOINT_URL": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL", ""),
            "AWS_DEFAULT_REGION": env.get("AWS_DEFAULT_REGION", "us-east-1"),
            "THAW_CHECKPOINT_URI": checkpoints}})
    runner = FidelityRunner(Sandbox.detect(engine), cluster, pipeline_root=root,
                            work_dir=work_dir, on_started=on_started)
    started = time.time()
    result = runner.run(spec, parameters)
    failed = result.failed_task()
    if failed is not None:
        raise IsolatedRunFailed(
            f"the pipeline failed at step {failed.display_name!r}: {failed.error} "
            f"(full log: {failed.log})", result)
    from thaw.steps import latest_outcome

    experiment = parameters.get("mlflow_experiment") or _default("mlflow_experiment")
    return {**latest_outcome(experiment, since=started), "pipeline_run": result}


class IsolatedRunFailed(ThawError):
    """A failed isolated run; ``result`` says which steps ran, how often, and how."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


def _require_tracking() -> None:
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ThawError("MLFLOW_TRACKING_URI is not set: start the local stack with "
                        "`eval \"$(thaw stack up)\"` or point it at your MLflow server")


def upload_sample(uri: str = DEMO_DATA_URI) -> str:
    """Copy the committed sample dataset to ``uri`` on the configured S3 endpoint."""
    from thaw.data.fashion_mnist import SAMPLE_DIR

    storage.ensure_bucket(uri)
    storage.upload_dir(Path(SAMPLE_DIR), uri)
    return uri


def _default(name: str) -> Any:
    from thaw.config import PIPELINE_DEFAULTS

    return getattr(PIPELINE_DEFAULTS, name)
