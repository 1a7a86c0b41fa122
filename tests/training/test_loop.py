"""Resume and early stopping of the training loop, on the head-only stage (fast)."""

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
    assert [r["epoch"] for r in result.history] == [1, 2, 3]

    again = train_stage(_model(prepared_sample), prepared_sample, cfg, tmp_path)
    assert again.history == result.history


def test_other_settings_start_afresh(prepared_sample, tmp_path):
    train_stage(_model(prepared_sample), prepared_sample, stage_config("probe", epochs=1), tmp_path)
    result = train_stage(_model(prepared_sample), prepared_sample,
                         stage_config("probe", epochs=2), tmp_path)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_early_stopping_after_patience_epochs_without_improvement(prepared_sample, tmp_path):
    # A learning rate too small to change any prediction: validation never improves.
    cfg = stage_config("probe", epochs=6, lr=1e-12, patience=2)
    result = train_stage(_model(prepared_sample), prepared_sample, cfg, tmp_path)
    assert result.stopped_early
    assert len(result.history) == 3 and result.best_epoch == 1
