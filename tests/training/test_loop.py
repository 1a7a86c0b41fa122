"""Resume and early stopping of the training loop, on the head-only stage (fast)."""

import dataclasses

import pytest

from thaw.backbones import create_backbone
from thaw.config import stage_config
from thaw.training.loop import train_stage


def _model(data):
    return create_backbone("efficientnet_lite0", len(data.manifest.classes), "packaged")


class Interrupt(Exception):
    pass


def test_training_resumes_from_the_last_checkpoint(prepared_sample, tmp_path):
    cfg = stage_config("probe", epochs=3)

    def die_after_two(record):
        if record["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_stage(_model(prepared_sample), prepared_sample, cfg, tmp_path,
                    on_epoch_end=die_after_two)
    seen = []
    result = train_stage(_model(prepared_sample), prepared_sample, cfg, tmp_path,
                         on_epoch_end=lambda r: seen.append(r["epoch"]))
    assert seen == [3]
    assert [r["epoch"] for r in result.history] == [0, 1, 2, 3]

    again = train_stage(_model(prepared_sample), prepared_sample, cfg, tmp_path)
    assert again.history == result.history


def test_other_settings_start_afresh(prepared_sample, tmp_path):
    train_stage(_model(prepared_sample), prepared_sample, stage_config("probe", epochs=1), tmp_path)
    result = train_stage(_model(prepared_sample), prepared_sample,
                         stage_config("probe", epochs=2), tmp_path)
    assert [r["epoch"] for r in result.history] == [0, 1, 2]


def test_early_stopping_after_patience_epochs_without_improvement(prepared_sample, tmp_path):
    # A learning rate too small to change any prediction: no epoch beats the start (epoch 0),
    # which stays the best; patience counts from the first trained epoch (1), so 1 + 2 more.
    cfg = stage_config("probe", epochs=6, lr=1e-12, patience=2, solver="adamw")
    result = train_stage(_model(prepared_sample), prepared_sample, cfg, tmp_path)
    assert result.stopped_early
    assert [r["epoch"] for r in result.history] == [0, 1, 2, 3] and result.best_epoch == 0


@pytest.mark.parametrize("changed", ["start_point", "data"])
def test_a_checkpoint_for_another_start_or_other_data_is_not_resumed(
        prepared_sample, tmp_path, changed, caplog):
    """Same stage settings, same folder: only the data or the starting model differs. Before
    the fix, the stale last.pt was trusted and its old results came back without training."""
    cfg = stage_config("probe", epochs=2)
    train_stage(_model(prepared_sample), prepared_sample, cfg, tmp_path, start_point="A")
    data = prepared_sample
    if changed == "data":
        data = type(prepared_sample)(prepared_sample.root, dataclasses.replace(
            prepared_sample.manifest, fingerprint="other-source"))
    seen = []
    result = train_stage(_model(data), data, cfg, tmp_path,
                         start_point="B" if changed == "start_point" else "A",
                         on_epoch_end=lambda r: seen.append(r["epoch"]))
    assert seen == [0, 1, 2], "trained afresh"
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert f"written for another {changed.replace('_', ' ')}" in caplog.text


def test_checkpoints_mirrored_elsewhere_come_back_into_an_empty_folder(
        prepared_sample, tmp_path):
    """A retried pod starts with an empty output folder and finds the mirrored checkpoints."""
    cfg = stage_config("probe", epochs=3)
    mirror = str(tmp_path / "mirror")

    def die_after_two(record):
        if record["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_stage(_model(prepared_sample), prepared_sample, cfg, tmp_path / "attempt1",
                    checkpoint_uri=mirror, on_epoch_end=die_after_two)
    seen = []
    result = train_stage(_model(prepared_sample), prepared_sample, cfg, tmp_path / "attempt2",
                         checkpoint_uri=mirror, on_epoch_end=lambda r: seen.append(r["epoch"]))
    assert seen == [3]
    assert [r["epoch"] for r in result.history] == [0, 1, 2, 3]
    assert (tmp_path / "attempt2" / "best.pt").exists()
