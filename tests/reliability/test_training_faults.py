"""Training faults on the real sample with the packaged ImageNet weights (CPU, 64 px): a loss
that becomes NaN/infinite, runs that must repeat exactly, and a checkpoint of other classes."""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from pathlib import Path

import pytest
import torch

from thaw import champion
from thaw.backbones import create_backbone
from thaw.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from thaw.config import stage_config
from thaw.data.prepared import PreparedDataset
from thaw.errors import ThawError
from thaw.stack import StackInfo
from thaw.stages import run_stage, score_checkpoint
from thaw.steps import evaluate_step, register_step, train_step

pytestmark = pytest.mark.slow
ARCH = "efficientnet_lite0"
# AdamW's decoupled weight decay at this rate multiplies the head by -(1e6 * wd) every step:
# the loss reaches inf within a few epochs of the probe.
EXPLODING = {"epochs": 6, "lr": 1e6, "solver": "adamw"}
DIVERGED = r"(training loss became (nan|inf) at epoch (\d+) step \d+|validation loss became "\
           r"(nan|inf) after epoch (\d+))"
TIMING = {"train_seconds", "epoch_seconds"}


def _head(path: Path) -> dict[str, torch.Tensor]:
    """The classifier's weight and bias in a checkpoint (timm's EfficientNet: ``classifier``)."""
    return {k: v for k, v in load_checkpoint(path)["model"].items()
            if k.startswith("classifier.")}


# -- a loss that becomes NaN or infinite -------------------------------------------------

class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def exploded(prepared_sample: PreparedDataset, tmp_path_factory):
    """The probe at an exploding learning rate: (result, its folder, epochs reported,
    errors logged)."""
    out = tmp_path_factory.mktemp("exploded")
    seen: list[int] = []
    errors = Collect()
    logger = logging.getLogger("thaw.training.loop")
    logger.addHandler(errors)
    try:
        result = run_stage(prepared_sample, stage_config("probe", **EXPLODING), out, arch=ARCH,
                           weights="packaged", on_epoch_end=lambda r: seen.append(r["epoch"]))
    finally:
        logger.removeHandler(errors)
    return result, out, seen, errors.messages


def test_a_diverging_stage_stops_at_once_and_says_where(exploded) -> None:
    result, out, seen, errors = exploded
    found = re.fullmatch(DIVERGED, result.diverged or "")
    assert found, result.diverged
    epoch = int(found.group(3) or found.group(5))  # recorded: epochs 0 .. epoch - 1
    # No epoch after the one that diverged ran, and that one was not recorded as an epoch.
    assert epoch < EXPLODING["epochs"], "it must diverge before the budget ends"
    assert seen == list(range(epoch)) == [r["epoch"] for r in result.history]
    assert result.stopped_early
    assert json.loads((out / "result.json").read_text())["diverged"] == result.diverged
    # Every recorded epoch was healthy.
    assert all(math.isfinite(r["val_loss"]) for r in result.history)
    assert all(math.isfinite(r.get("train_loss", 0.0)) for r in result.history)
    (message,) = errors
    assert result.diverged in message and "best healthy checkpoint" in message




def test_a_diverged_stage_keeps_its_best_healthy_checkpoint(exploded, prepared_sample) -> None:
    result, out, _, _ = exploded
    best = load_checkpoint(out / "best.pt")
    assert best["meta"]["epoch"] == result.best_epoch < len(result.history)
    assert all(torch.isfinite(t).all() for t in best["model"].values()
               if t.is_floating_point())
    val = score_checkpoint(out / "best.pt", prepared_sample, "val")
    assert math.isfinite(val["loss"])
    assert val["macro_f1"] == pytest.approx(result.best_val["macro_f1"])


def test_a_diverged_stage_is_not_trained_again_on_resume(exploded, prepared_sample) -> None:
    """Running the step again (a retried pod) gives the same verdict without training."""
    result, out, _, _ = exploded
    seen: list[int] = []
    again = run_stage(prepared_sample, stage_config("probe", **EXPLODING), out, arch=ARCH,
                      weights="packaged", on_epoch_end=lambda r: seen.append(r["epoch"]))
    assert seen == []
    assert again.diverged == result.diverged and again.history == result.history


def test_a_starting_point_with_an_infinite_loss_is_refused(exploded, prepared_sample,
                                                           tmp_path) -> None:
    """inf injected into a checkpoint's head: no stage can start from it."""
    _, out, _, _ = exploded
    payload = load_checkpoint(out / "best.pt")
    model = model_from_checkpoint(payload)
    with torch.no_grad():
        model.get_classifier().bias[0] = math.inf
    broken = tmp_path / "broken.pt"
    save_checkpoint(broken, model, payload["meta"])
    with pytest.raises(ThawError, match=r"stage partial cannot start: its starting point "
                                        r"\(checkpoint sha256 \w+\) gives a (nan|inf) "
                                        r"validation loss"):
        run_stage(prepared_sample, stage_config("partial", epochs=1), tmp_path / "partial",
                  arch=ARCH, init_checkpoint=broken)
    assert not (tmp_path / "partial" / "best.pt").exists()


def test_choose_never_picks_a_diverged_stage() -> None:
    stages = [{"stage": "probe", "score": {"macro_f1": 0.5}},
              {"stage": "partial", "score": {"macro_f1": 0.9},
               "diverged": "training loss became nan at epoch 2 step 5"},
              {"stage": "full", "score": {"macro_f1": 0.4}, "diverged": None}]
    assert champion.choose(stages, "macro_f1")["stage"] == "probe"
    with pytest.raises(ThawError, match=r"the training of every stage diverged \(probe: "
                                        r"loss became inf at epoch 1 step 2; partial: "
                                        r"training loss became nan at epoch 2 step 5\)\. Lower "
                                        r"the learning rates"):
        champion.choose([{**stages[0], "diverged": "loss became inf at epoch 1 step 2"},
                         stages[1]], "macro_f1")


def test_the_pipeline_registers_the_best_healthy_stage(stack: StackInfo, prepared_sample,
                                                       tmp_path) -> None:
    """probe trains normally; partial explodes and hands on its start (probe's best), which
    ties with probe: the tie rule (later stage wins) would register the diverged partial."""
    run_id, experiment = uuid.uuid4().hex, f"training-faults-{uuid.uuid4().hex[:8]}"
    dirs = {"probe": tmp_path / "probe", "partial": tmp_path / "partial"}
    common = {"arch": ARCH, "weights": "packaged", "experiment": experiment,
              "pipeline_run_id": run_id}
    train_step(prepared_sample.root, dirs["probe"], stage="probe", init_dir=None,
               settings={"epochs": 2}, **common)
    partial = train_step(prepared_sample.root, dirs["partial"], stage="partial",
                         init_dir=dirs["probe"], settings={"epochs": 2, "lr": 1e6,
                                                          "warmup_fraction": 0.0}, **common)
    assert partial["diverged"] and partial["best_epoch"] == 0
    report = evaluate_step(prepared_sample.root, dirs)
    assert [s["diverged"] for s in report["stages"]] == [None, partial["diverged"]]
    gate = {"experiment": experiment, "pipeline_run_id": run_id,
            "model_name": f"faults-{uuid.uuid4().hex[:8]}", "selection_metric": "macro_f1",
            "promotion_margin": 0.0}
    outcome = register_step(report, dirs, prepared_sample.root, **gate)
    assert outcome["stage"] == "probe"

    only_diverged = {**report, "stages": report["stages"][1:]}
    with pytest.raises(ThawError, match=r"every stage diverged \(partial: (training|"
                                        r"validation) loss became (nan|inf) (at|after) epoch"):
        register_step(only_diverged, dirs, prepared_sample.root, **gate)


# -- the seed controls everything random -------------------------------------------------

def _partial(data: PreparedDataset, out: Path, seed: int):
    """The partial stage from the packaged weights (a new random head; crops, dropout and
    shuffling are random too)."""
    return run_stage(data, stage_config("partial", epochs=1, seed=seed), out, arch=ARCH,
                     weights="packaged")


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def test_the_same_seed_repeats_a_run_exactly(prepared_sample, tmp_path) -> None:
    torch.manual_seed(12345)  # whatever state the global RNG is in must not matter
    first = _partial(prepared_sample, tmp_path / "a", seed=3)
    torch.rand(1000)
    second = _partial(prepared_sample, tmp_path / "b", seed=3)
    assert _untimed(second.history) == _untimed(first.history)
    weights = [load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    other = _partial(prepared_sample, tmp_path / "c", seed=4)
    # Epoch 0 scores the untrained model, so its loss differs only through the new head.
    assert other.history[0]["val_loss"] != first.history[0]["val_loss"]


def test_the_seed_sets_the_new_head(prepared_sample, tmp_path) -> None:
    """An lr too small to move any weight: last.pt holds the head as it was created."""
    heads = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = stage_config("probe", epochs=1, lr=1e-12, seed=seed, solver="adamw")
        run_stage(prepared_sample, cfg, tmp_path / name, arch=ARCH, weights="packaged")
        heads[name] = _head(tmp_path / name / "last.pt")
    assert all(torch.equal(heads["a"][k], heads["b"][k]) for k in heads["a"])
    assert not torch.equal(heads["a"]["classifier.weight"], heads["c"]["classifier.weight"])


# -- a checkpoint trained on other classes -----------------------------------------------

@pytest.fixture()
def nine_classes(prepared_sample, tmp_path) -> Path:
    """A checkpoint of the dataset's classes without its last one."""
    classes = prepared_sample.manifest.classes[:-1]
    path = tmp_path / "nine.pt"
    save_checkpoint(path, create_backbone(ARCH, len(classes), "none"),
                    {"classes": classes, "stage": "probe",
                     "data_config": prepared_sample.manifest.data_config()})
    return path


def test_a_checkpoint_of_other_classes_is_refused_before_training(prepared_sample, tmp_path,
                                                                  nine_classes) -> None:
    missing = prepared_sample.manifest.classes[-1]
    with pytest.raises(ThawError, match=rf"checkpoint {nine_classes} was trained on classes "
                                        rf"other than the dataset's: 9 classes in the "
                                        rf"checkpoint, 10 in the dataset \(only the dataset "
                                        rf"has \['{missing}'\]\)"):
        run_stage(prepared_sample, stage_config("partial", epochs=1), tmp_path / "out",
                  arch=ARCH, init_checkpoint=nine_classes)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_the_same_classes_in_another_order_is_refused(prepared_sample,
                                                                      tmp_path) -> None:
    classes = prepared_sample.manifest.classes
    path = tmp_path / "swapped.pt"
    save_checkpoint(path, create_backbone(ARCH, len(classes), "none"),
                    {"classes": [classes[1], classes[0], *classes[2:]]})
    with pytest.raises(ThawError, match=r"10 classes in the checkpoint, 10 in the dataset "
                                        r"\(same classes, other order\)"):
        run_stage(prepared_sample, stage_config("partial", epochs=1), tmp_path / "out",
                  arch=ARCH, init_checkpoint=path)


def test_weights_from_a_checkpoint_of_other_classes_get_a_new_head(prepared_sample, tmp_path,
                                                                   nine_classes) -> None:
    """weights=<file> takes the backbone only, so the class count may differ: the head is
    created for the dataset's classes."""
    result = run_stage(prepared_sample, stage_config("probe", epochs=1), tmp_path / "out",
                       arch=ARCH, weights=str(nine_classes))
    assert _head(Path(result.best_checkpoint))["classifier.weight"].shape[0] == 10
