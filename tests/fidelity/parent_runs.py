"""The MLflow parent run of one pipeline run, for the fidelity tests."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities import Run

from thaw.tracking import PIPELINE_RUN_TAG


def parent_run(experiment: str, pipeline_run_id: str) -> Run:
    """The one MLflow parent run tagged with ``pipeline_run_id`` in ``experiment``."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    [parent] = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'")
    return parent
