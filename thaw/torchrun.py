"""How a stage is started as ``torchrun -m thaw.stage_job``: its arguments, and running it in
this pod (one process per GPU). Imported by the steps (in-pod data parallel) and by the
Kubernetes launcher (``thaw.cluster``); it imports neither, so neither imports the other."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

from thaw.errors import ThawError

log = logging.getLogger(__name__)


def stage_arguments(*, stage: str, prepared: str, out: str, settings: dict[str, Any],
                    arch: str, weights: str, init: str | None, experiment: str,
                    pipeline_run_id: str) -> list[str]:
    """The command-line arguments of ``thaw.stage_job`` for one stage."""
    args = ["--stage", stage, "--prepared", prepared, "--out", out,
            "--settings", json.dumps(settings, sort_keys=True), "--arch", arch,
            "--weights", weights, "--experiment", experiment,
            "--pipeline-run-id", pipeline_run_id]
    return args + (["--init", init] if init else [])


def torchrun_in_pod(processes: int, arguments: list[str]) -> None:
    """Run ``thaw.stage_job`` with ``arguments`` in ``processes`` processes on this machine
    (one per GPU) and wait; ``ThawError`` if any of them fails (torchrun stops the others)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", "-m", "thaw.stage_job", *arguments]
    log.info("starting %d training processes: torchrun -m thaw.stage_job %s", processes,
             " ".join(arguments))
    finished = subprocess.run(command, check=False)
    if finished.returncode != 0:
        raise ThawError(f"the stage's {processes} torchrun processes failed (exit status "
                        f"{finished.returncode}); the first failure is in the log above")
