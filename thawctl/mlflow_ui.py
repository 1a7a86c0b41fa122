"""Links into the MLflow UI that open on the answer of a pipeline run: which stage won, by
how much, on what data.

What the UI of the installed MLflow (3.17.2) reads, from its bundle in the wheel,
``mlflow/server/js/build/static/js/``:

- ``main.*.js``: the view an experiment opens on follows the *workflow type*, the URL
  parameter ``workflowType`` (``genai`` | ``machine_learning``), else the browser's
  ``localStorage`` key ``mlflow.workflowType``, default ``genai``. Its
  ``useExperimentKind`` reads the experiment tag ``mlflow.experimentKind`` only while a
  feature flag is off, and that flag is on in this build (``Z0:()=>R``, ``R=()=>!0``); the
  redirect from ``/experiments/<id>`` (``5439.*.chunk.js``) then lands a GenAI workflow on
  the Overview/Traces tabs and a machine-learning one on Runs. So a link says
  ``workflowType=machine_learning``; thaw still tags its experiments
  ``custom_model_development`` (``thaw.mlflow_views``) for UIs built with the flag off.
- Routes are hash routes: ``#/experiments/<id>/runs/<run>/artifacts/<path>`` opens a run
  on one artifact (``runPageWithArtifact``), the parent run's ``run_report.html`` (shown in
  a sandboxed iframe) or ``stage_comparison.png``.
- Not linked: the Runs tab as charts of the stage runs (``compareRunsMode=CHART`` with a
  ``searchFilter`` on the parent run id). The UI lists nested runs collapsed under their
  parent and charts only the runs listed, so in headless Chromium that page showed the
  parent row and no chart. ``#/compare-runs?runs=[...]`` opens on a parallel-coordinates
  plot of parameters. The parent run's report is the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from thaw.mlflow_views import COMPARISON_FILE
from thaw.report import REPORT_FILE

MACHINE_LEARNING_WORKFLOW = {"workflowType": "machine_learning"}


@dataclass(frozen=True)
class AnswerLinks:
    """``comparison``: the parent run on its run report (or its stage chart);
    ``experiment``: the experiment's runs."""

    comparison: str
    experiment: str


def answer_links(ui_url: str, outcome: dict[str, Any]) -> AnswerLinks:
    """The links for the ``outcome`` register recorded, looked up in MLflow: the stage runs'
    experiment and parent run, and whether the parent run holds the run report."""
    client = MlflowClient()
    stage_run = client.get_run(outcome["stages"][0]["run_id"])
    experiment_id = stage_run.info.experiment_id
    parent = stage_run.data.tags[MLFLOW_PARENT_RUN_ID]
    logged = {artifact.path for artifact in client.list_artifacts(parent)}
    page = REPORT_FILE if REPORT_FILE in logged else COMPARISON_FILE
    base = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}"
    return AnswerLinks(
        comparison=_with_query(f"{base}/runs/{parent}/artifacts/{page}", {}),
        experiment=_with_query(f"{base}/runs", {}))


def _with_query(url: str, parameters: dict[str, str]) -> str:
    return f"{url}?{urlencode({**parameters, **MACHINE_LEARNING_WORKFLOW}, quote_via=quote)}"
