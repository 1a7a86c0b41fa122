import pytest

from thaw.config import DEFAULT_STAGES, STAGE_NAMES, stage_config
from thaw.errors import ThawError


def test_defaults_follow_the_recipe():
    """The recipe README's table justifies with benchmarks/results/quality.md."""
    probe, partial, full = (DEFAULT_STAGES[n] for n in STAGE_NAMES[:3])  # then optional lora
    assert (probe.trainable, partial.trainable, full.trainable) == ("head", "last_stage", "all")
    assert probe.solver == "adamw" and probe.uses_cached_features
    assert not partial.uses_cached_features and partial.solver == "adamw"
    assert partial.augment == full.augment == "crop"  # no flips by default
    assert 0 < partial.backbone_lr_scale < 1 and 0 < full.backbone_lr_scale < 1
    assert full.layer_decay < 1
    assert 0 < partial.warmup_fraction < 0.5 and not partial.update_bn_stats


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
        ({"warmup_fraction": 1.0}, "warmup_fraction must be in [0, 1)"),
        ({"augment": "flip"}, "augment must be one of ('none', 'crop', 'crop_flip')"),
        ({"solver": "sgd"}, "solver must be one of ('adamw', 'lbfgs')"),
        ({"solver": "lbfgs"}, "solver 'lbfgs' fits the head on cached features"),
    ],
)
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ThawError, match="stage 'partial'") as err:
        stage_config("partial", **overrides)
    assert message in str(err.value)


def test_unknown_stage():
    with pytest.raises(ThawError, match="unknown stage 'layer4'"):
        stage_config("layer4")
