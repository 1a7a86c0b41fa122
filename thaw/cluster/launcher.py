"""A training step on several nodes: run the stage as a Kubeflow Trainer TrainJob and hand its
model on through S3."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from uuid import uuid4

from thaw import storage
from thaw.cluster.trainjob import TrainJobRequest, run_trainjob
from thaw.errors import ThawError
from thaw.steps import refuse_known_failure, stage_checkpoint_uri, stage_record
from thaw.torchrun import stage_arguments

log = logging.getLogger(__name__)
FOLLOWING = ("start_timeout_s", "timeout_s", "poll_s")


def train_on_trainjob(*, prepared_uri: str, init_uri: str | None, out_dir: Path,
                      job: dict[str, Any], stage: str, settings: dict[str, Any], arch: str,
                      weights: str, experiment: str, pipeline_run_id: str) -> dict[str, Any]:
    """Train one stage as a Kubeflow Trainer TrainJob and put its output in ``out_dir``.

    ``job`` holds the ``TrainJobRequest`` fields except ``command``, ``pipeline_run_id``,
    ``stage`` and ``labels``, plus how to follow the job (``FOLLOWING``: ``run_trainjob``'s
    timeouts and poll interval, in seconds). The nodes read ``prepared_uri`` and ``init_uri``
    (``s3://``; KFP's ``minio://`` is the same store) and rank 0 uploads the stage to a fresh
    prefix under the stage's checkpoint location (``THAW_CHECKPOINT_URI``), which is then
    downloaded here: the model travels through S3, not a shared volume. The nodes mirror
    their checkpoints there too, so a retried step's job resumes; an earlier attempt that
    failed on its input (any rank's marker) stops the retry before any node is asked for."""
    checkpoints = stage_checkpoint_uri(pipeline_run_id, stage)
    if not checkpoints or not storage.is_s3_uri(checkpoints):
        raise ThawError("training on several nodes hands the model over through S3: set "
                        "THAW_CHECKPOINT_URI (thaw-config ConfigMap) to an s3:// prefix")
    refuse_known_failure(checkpoints)
    output = f"{checkpoints}/output-{uuid4().hex[:12]}"
    arguments = stage_arguments(stage=stage, prepared=_s3(prepared_uri), out=output,
                                settings=settings, arch=arch, weights=weights,
                                init=_s3(init_uri) if init_uri else None,
                                experiment=experiment, pipeline_run_id=pipeline_run_id)
    following = {key: float(job[key]) for key in FOLLOWING if key in job}
    counts = {key: int(job[key]) for key in ("num_nodes", "gpus_per_node")}  # JSON: 2.0
    request = TrainJobRequest(
        command=["torchrun", "-m", "thaw.stage_job", *arguments],
        pipeline_run_id=pipeline_run_id, stage=stage,
        **{k: v for k, v in job.items() if k not in {**following, **counts}}, **counts)
    run_trainjob(request, log=lambda line: log.info("%s", line), **following)
    storage.download_prefix(output, Path(out_dir))
    return stage_record(Path(out_dir), "result.json")


def _s3(uri: str) -> str:
    """KFP names artifacts in MinIO ``minio://bucket/key``: to boto3 that is ``s3://``."""
    return "s3://" + uri.removeprefix("minio://") if uri.startswith("minio://") else uri
