"""A training stage's MLflow run, opened whenever MLflow answers.

A tracking outage must never kill training. MLflow may be down (or restarting, or behind a
failing proxy) just when a stage starts: ``StageRun`` then lets training go on without its
run, tries to open it again at every epoch end (its params and source dataset are logged
then, and the epoch metrics kept so far are sent), and opens it at the latest in ``finish``.
Only ``finish`` raises ``storage.Unreachable``, after the stage's outputs are complete, so a
rerun of the step resumes from its checkpoints instead of training again.

Each attempt to open the run spends MLflow's own retries (``thaw.tracking``), so an epoch
end waits up to those minutes while MLflow stays down; the other ranks of a data-parallel
stage wait for rank 0 in a rank wait, not in a collective (``thaw.training.distributed``).
"""

from __future__ import annotations

import logging
from typing import Any

from thaw import mlflow_views, tracking
from thaw.data.prepared import Manifest
from thaw.storage import Unreachable, redact

log = logging.getLogger(__name__)


class StageRun:
    """The nested MLflow run of ``stage`` under the parent run of ``pipeline_run_id``; also
    the stage's ``on_epoch_end`` callback."""

    def __init__(self, experiment: str, pipeline_run_id: str, stage: str,
                 params: dict[str, Any], manifest: Manifest) -> None:
        self.experiment = experiment
        self.pipeline_run_id = pipeline_run_id
        self.stage = stage
        self.params = params
        self.manifest = manifest
        self.run_id: str | None = None
        self.epochs = tracking.EpochLogger(None)  # keeps metrics until the run is open

    def open(self) -> str:
        """The run's id; the run is created first if it is not open yet (``Unreachable``
        while MLflow is down)."""
        if self.run_id is None:
            parent = tracking.ensure_parent_run(self.experiment, self.pipeline_run_id)
            run_id = tracking.start_stage_run(parent, self.stage, self.params)
            mlflow_views.log_source_dataset(run_id, self.manifest)
            self.run_id = self.epochs.run_id = run_id
        return self.run_id

    def try_open(self) -> str | None:
        """``open``, or ``None`` with a warning while MLflow is down."""
        try:
            return self.open()
        except Unreachable as err:
            log.warning("training %s goes on without its MLflow run for now (opened again "
                        "at the next epoch end): %s", self.stage, redact(str(err)))
            return None

    def __call__(self, record: dict[str, Any]) -> None:
        """Log an epoch record (``EpochLogger``), opening the run first if it is not open."""
        self.try_open()
        self.epochs(record)

    def finish(self, result: dict[str, Any]) -> None:
        """Open the run if needed, send what is pending and mark it FINISHED with the stage's
        summary; ``Unreachable`` if MLflow is still down."""
        run_id = self.open()
        self.epochs.flush()
        tracking.finish_stage_run(run_id, result)

    def fail(self, err: BaseException) -> None:
        """Mark the run FAILED with ``err`` (opening it first, so MLflow hears of the failed
        stage); never raises over ``err`` (see ``tracking.best_effort``)."""
        tracking.best_effort(err, f"mark MLflow run {self.run_id or 'of ' + self.stage} failed",
                             lambda: tracking.fail_run(self.open(), str(err)))
