"""Three gloo processes on a training split whose last global batch is shorter than three
(50 images, 4 per process: 4 x 12 + 2): before, two ranks got an empty share in the last
step and their DataLoader's default collate failed on ``batch[0]``. The same run has rank 0
report every epoch to an MLflow server that takes connections and never answers, for longer
than the training collectives may wait (torch 2.15.0, ``distributed_c10d.py``: the
``timeout`` of ``init_process_group``; thaw's ``THAW_COLLECTIVE_TIMEOUT_S``), and watches
where the training step makes tensors from Python values."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import SAMPLE_DIR
from tests.distributed.launch import finish, free_port, pod_environment, torchrun

# Three processes and a stalled MLflow: nightly (tests/distributed/test_ddp.py runs two).
pytestmark = [pytest.mark.slow, pytest.mark.nightly]

WORKER = Path(__file__).with_name("uneven_worker.py")
PROCESSES = 3
IMAGES_PER_CLASS = 7  # 50 training images once split
SETTINGS = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "augment": "crop", "seed": 5,
            "update_bn_stats": True}
COLLECTIVE_TIMEOUT_S = 5
MLFLOW_TIMEOUT_S = 12  # each of rank 0's MLflow calls waits this long, then gives up


@pytest.fixture(scope="module")
def prepared_uneven(tmp_path_factory) -> Path:
    """The sample's first 7 images of each class, prepared at 32 px: 50 training images."""
    from thaw.backbones import data_config
    from thaw.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("uneven")
    for folder in sorted(p for p in SAMPLE_DIR.iterdir() if p.is_dir()):
        (root / "source" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:IMAGES_PER_CLASS]:
            shutil.copy(image, root / "source" / folder.name / image.name)
    prepare_dataset(str(root / "source"), root / "prepared",
                    data_config=data_config("efficientnet_lite0", 32))
    return root / "prepared"


@pytest.fixture(scope="module")
def unanswering_mlflow() -> Iterator[str]:
    """A tracking URI whose server accepts connections (the kernel's backlog) and never
    answers: every request waits for its read timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture(scope="module")
def run(prepared_uneven, unanswering_mlflow, tmp_path_factory) -> tuple[dict[int, dict], str]:
    """Every rank's record, and the processes' output."""
    root = tmp_path_factory.mktemp("uneven-run")
    (root / "dump").mkdir()
    env = {**pod_environment(1, PROCESSES, 0, free_port()),
           "THAW_COLLECTIVE_TIMEOUT_S": str(COLLECTIVE_TIMEOUT_S),
           "MLFLOW_TRACKING_URI": unanswering_mlflow,
           "MLFLOW_HTTP_REQUEST_TIMEOUT": str(MLFLOW_TIMEOUT_S),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    output = finish(torchrun([str(WORKER), str(prepared_uneven), str(root / "out"),
                              str(root / "dump"), json.dumps(SETTINGS)], env))
    return ({r: torch.load(root / "dump" / f"rank{r}.pt", weights_only=True)
             for r in range(PROCESSES)}, output)


def test_the_split_leaves_a_last_global_batch_shorter_than_the_processes(prepared_uneven):
    from thaw.data.prepared import open_prepared

    size = open_prepared(prepared_uneven).manifest.split_size("train")
    assert size == 50 and 0 < size % (SETTINGS["batch_size"] * PROCESSES) < PROCESSES


def test_every_image_is_trained_once_per_epoch_and_every_rank_gets_a_share(run):
    records, _ = run
    for rank in range(PROCESSES):
        assert records[rank]["world_size"] == PROCESSES
    for epoch in range(SETTINGS["epochs"]):
        shares = [records[rank]["shares"][epoch] for rank in range(PROCESSES)]
        assert len({len(steps) for steps in shares}) == 1  # the same number of steps
        assert all(len(share) > 0 for steps in shares for share in steps)
        seen = [i for steps in shares for share in steps for i in share]
        assert sorted(seen) == list(range(50))
    for rank in range(PROCESSES):  # what the loop counted while it trained
        history = records[rank]["history"]
        assert [r["train_images"] for r in history] == [0] + [50] * SETTINGS["epochs"]
    assert records[0]["shares"][0] != records[0]["shares"][1]  # reshuffled each epoch


def test_the_ranks_agree(run):
    """The same weights and BatchNorm statistics (averaged once per epoch: DDP no longer
    broadcasts buffers at every step), and the same metrics, on every rank."""
    records, _ = run
    reference = records[0]
    for rank in range(1, PROCESSES):
        assert records[rank]["history"] == [
            {**r, "train_seconds": records[rank]["history"][i]["train_seconds"],
             "epoch_seconds": records[rank]["history"][i]["epoch_seconds"]}
            for i, r in enumerate(reference["history"])]
        for name, value in reference["state"].items():
            assert torch.equal(records[rank]["state"][name], value), (rank, name)
    updated = reference["batchnorm_updated"]
    assert updated  # the partial stage trains BatchNorm: its statistics moved
    assert any(not torch.equal(reference["state"][f"{name}.running_mean"],
                               reference["start"][f"{name}.running_mean"]) for name in updated)


def test_an_mlflow_server_that_never_answers_does_not_stop_the_others(run):
    """Rank 0's epoch reports each waited out their read timeout, longer than a training
    collective may wait; the other ranks waited in ``Distributed.barrier`` and all finished
    (``finish`` asserts a zero exit status)."""
    records, output = run
    assert MLFLOW_TIMEOUT_S > 2 * COLLECTIVE_TIMEOUT_S
    reports = [line for line in output.splitlines() if "could not log epoch" in line]
    assert len(reports) == SETTINGS["epochs"] + 1
    assert all(f"read timeout={MLFLOW_TIMEOUT_S}" in line for line in reports), reports
    assert all(len(records[rank]["history"]) == SETTINGS["epochs"] + 1
               for rank in range(PROCESSES))


def test_the_training_step_makes_no_tensor_from_host_values(run):
    """On a GPU such a tensor is a blocking copy from the host at every step (it was the
    per-step ``torch.tensor(len(y), device=...)``). The watch does see the once-per-epoch
    one in validation's gather, so it would see one in the step."""
    records, _ = run
    for rank in range(PROCESSES):
        calls = records[rank]["host_values"]
        assert "distributed.py:concat" in calls
        in_step = [c for c in calls if c in (
            "loop.py:_train_epoch", "loop.py:_batch_loss", "loop.py:observe")]
        assert in_step == [], in_step
