import pytest

from thaw.config import DEFAULT_STAGES, STAGE_NAMES, stage_config
from thaw.errors import ThawError


def test_defaults_follow_the_recipe():
    probe, partial, full = (DEFAULT_STAGES[n] for n in STAGE_NAMES)
    assert (probe.trainable, partial.trainable, full.trainable) == ("head", "last_stage", "all")
    assert probe.lr > partial.lr >= full.lr
    assert probe.uses_cached_features and not partial.uses_cached_features
    assert partial.backbone_lr_scale == pytest.approx(0.1)
    assert full.layer_decay < 1


def test_overrides_apply_and_validate():
    cfg = stage_config("full", epochs=2, lr=1e-4)
    assert (cfg.epochs, cfg.lr, cfg.trainable) == (2, 1e-4, "all")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"trainable": "layer3"}, "trainable must be one of"),
        ({"layer_decay": 1.5}, "layer_decay must be in (0, 1]"),
        ({"label_smoothing": 1.0}, "label_smoothing must be in [0, 1)"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"epochs_typo": 3}, "unknown stage setting(s) ['epochs_typo']"),
    ],
)
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ThawError, match="stage 'partial'") as err:
        stage_config("partial", **overrides)
    assert message in str(err.value)


def test_unknown_stage():
    with pytest.raises(ThawError, match="unknown stage 'layer4'"):
        stage_config("layer4")
