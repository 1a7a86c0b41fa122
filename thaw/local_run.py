"""Run the very same pipeline locally through ``kfp.local`` (no cluster), and the demo."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from thaw import storage
from thaw.errors import ThawError

log = logging.getLogger(__name__)

DEMO_DATA_URI = "s3://thaw/datasets/fashion-mnist-sample"
# Sized for a 2-core CPU: real ImageNet weights that ship offline, 64 px, short stages.
DEMO_PARAMETERS: dict[str, Any] = {
    "data_uri": DEMO_DATA_URI,
    "backbone": "efficientnet_lite0",
    "weights": "packaged",
    "image_size": 64,
    "probe_epochs": 10,
    "partial_epochs": 4,
    "full_epochs": 4,
    "mlflow_experiment": "thaw-demo",
    "model_name": "thaw-fashion-mnist",
}


def run_local(parameters: dict[str, Any], pipeline_root: Path) -> dict[str, Any]:
    """Run the pipeline through ``kfp.local.SubprocessRunner`` in this environment; return
    the outcome that register recorded on the MLflow parent run."""
    from kfp import local

    from pipelines.thaw_pipeline import build_pipeline

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ThawError("MLFLOW_TRACKING_URI is not set: start the local stack with "
                        "`eval \"$(thaw stack up)\"` or point it at your MLflow server")
    pipeline_root.mkdir(parents=True, exist_ok=True)
    # kfp.local warns that GPU/resource settings and the image are ignored here: expected.
    warnings.filterwarnings("ignore", module="kfp.local")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    started = time.time()
    try:
        build_pipeline()(**parameters)
    except RuntimeError as err:  # kfp.local's "Pipeline ... finished with status FAILURE"
        raise ThawError(f"the pipeline failed: {err}; see the step logs above") from err
    from thaw.steps import latest_outcome

    experiment = parameters.get("mlflow_experiment") or _default("mlflow_experiment")
    return latest_outcome(experiment, since=started)


def upload_sample(uri: str = DEMO_DATA_URI) -> str:
    """Copy the committed sample dataset to ``uri`` on the configured S3 endpoint."""
    from thaw.data.fashion_mnist import SAMPLE_DIR

    storage.ensure_bucket(uri)
    storage.upload_dir(Path(SAMPLE_DIR), uri)
    return uri


def _default(name: str) -> Any:
    from thaw.config import PIPELINE_DEFAULTS

    return getattr(PIPELINE_DEFAULTS, name)
