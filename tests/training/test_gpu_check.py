"""``make gpu-check`` on the CPU: ``benchmarks/gpu_check.py --dry-run`` runs every part of the
GPU acceptance run small (thaw's prepare, the full fine-tune loop beside device tensors with
and without ``torch.compile``, the partial stage under ``torchrun`` with gloo), writes its one
JSON (and the copy in ``$OUT``) in the shape ``gpu_check.schema.json`` fixes for the GPU run
too; without a CUDA device and without ``--dry-run`` it refuses."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

pytestmark = pytest.mark.slow  # about 45 s of CPU: a torchrun start, MLflow's SQLite set-up

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SCHEMA = json.loads((ROOT / "benchmarks" / "gpu_check.schema.json").read_text())


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(tmp / "out"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--output",
                           str(tmp / "gpu-check.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("gpu-check")
    finished = _run(tmp, "--dry-run")
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    return json.loads((tmp / "gpu-check.json").read_text()), tmp


def _errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return [error.message for error in validator.iter_errors(document)]


def test_the_dry_run_writes_one_json_that_fits_the_schema_and_a_copy_in_out(dry_run) -> None:
    document, tmp = dry_run
    assert _errors(document) == []
    assert (tmp / "out" / "gpu-check-dry-run.json").read_text() == \
        (tmp / "gpu-check.json").read_text()
    assert document["dry_run"] is True
    assert document["passed"] is True and document["failures"] == []
    assert document["machine"]["cpu_count"] == os.cpu_count()
    assert document["machine"]["torch"] == torch.__version__
    assert document["machine"]["gpu"] is None


def test_every_part_trains_what_it_says(dry_run) -> None:
    document, _ = dry_run
    settings = document["settings"]
    assert (settings["arch"], settings["image_size"]) == ("test_resnet", 32)
    assert [row["compile"] for row in document["full_fine_tune"]] == [False, True]
    for row in document["full_fine_tune"]:
        assert row["error"] is None
        assert row["loop_images_per_sec"] > 0 and row["synthetic_images_per_sec"] > 0
        assert row["efficiency"] == pytest.approx(
            row["loop_images_per_sec"] / row["synthetic_images_per_sec"], abs=1e-3)
        # three epochs of the loop, each watched from the end of its first step to its last
        assert row["host_sync"] == {"status": "emulated", "where": None,
                                    "watched_steps": 3 * (settings["steps"] - 1)}
    partial = document["partial_under_torchrun"]
    assert partial["error"] is None
    assert (partial["processes"], partial["backend"]) == (1, "gloo")
    assert partial["epochs_run"] == settings["partial_epochs"]
    assert partial["train_images_per_sec"] > 0
    assert partial["nccl_initialised"] is None


def test_the_schema_holds_a_gpu_run_to_gpu_facts(dry_run) -> None:
    """The same schema refuses the dry run's CPU facts under ``dry_run: false``, a missing
    part and a field it does not know."""
    document, _ = dry_run
    as_gpu = {**copy.deepcopy(document), "dry_run": False}
    refused = " | ".join(_errors(as_gpu))
    assert "'bfloat16' was expected" in refused  # no autocast
    assert "'nccl' was expected" in refused
    assert "None is not of type 'string'" in refused  # no GPU name, no CUDA version
    missing = {k: v for k, v in document.items() if k != "partial_under_torchrun"}
    assert _errors(missing) == ["'partial_under_torchrun' is a required property"]
    row = copy.deepcopy(document)
    row["full_fine_tune"][0]["images_per_sec"] = 1.0
    assert any("images_per_sec" in error for error in _errors(row))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present here")
def test_without_a_cuda_device_it_refuses_and_writes_nothing(tmp_path: Path) -> None:
    finished = _run(tmp_path)
    assert finished.returncode == 2
    assert "needs a CUDA device" in finished.stderr and "--dry-run" in finished.stderr
    assert not (tmp_path / "gpu-check.json").exists() and not (tmp_path / "out").exists()
