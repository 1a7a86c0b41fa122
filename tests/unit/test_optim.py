import pytest
import torch

from thaw.backbones import create_backbone, stage_groups
from thaw.config import stage_config
from thaw.training.freeze import apply_trainable, set_train_mode
from thaw.training.optim import build_optimizer, build_scheduler


def _prepared_optimizer(stage: str, **overrides):
    model = create_backbone("resnet18", num_classes=3, weights="none")
    groups = stage_groups(model)
    cfg = stage_config(stage, **overrides)
    apply_trainable(model, groups.trainable(cfg.trainable))
    optimizer = build_optimizer(model, groups, cfg)
    return model, groups, cfg, optimizer


def _lr_of(optimizer, param):
    return next(g["lr"] for g in optimizer.param_groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize("stage", ["probe", "partial", "full"])
def test_optimizer_holds_exactly_the_trainable_parameters(stage):
    model, groups, cfg, optimizer = _prepared_optimizer(stage)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    expected = {id(p) for n, p in model.named_parameters() if n in groups.trainable(cfg.trainable)}
    assert in_optimizer == expected
    assert all(p.requires_grad == (id(p) in expected) for p in model.parameters())


def test_partial_stage_backbone_learns_slower_than_head_by_its_scale():
    model, _, cfg, optimizer = _prepared_optimizer("partial", warmup_fraction=0)
    build_scheduler(optimizer, cfg, steps_per_epoch=10)
    head_lr = _lr_of(optimizer, model.fc.weight)
    assert head_lr == pytest.approx(cfg.lr) and cfg.backbone_lr_scale < 1
    assert _lr_of(optimizer, model.layer4[0].conv1.weight) == pytest.approx(
        head_lr * cfg.backbone_lr_scale)


def test_full_stage_learning_rates_decay_from_head_to_stem():
    model, _, cfg, optimizer = _prepared_optimizer("full", warmup_fraction=0)
    build_scheduler(optimizer, cfg, steps_per_epoch=10)
    lrs = [_lr_of(optimizer, p) for p in (model.fc.weight, model.layer4[0].conv1.weight,
                                          model.layer3[0].conv1.weight, model.conv1.weight)]
    assert lrs == sorted(lrs, reverse=True)
    assert lrs[2] / lrs[1] == pytest.approx(cfg.layer_decay)
    assert lrs[3] / lrs[1] == pytest.approx(cfg.layer_decay**4)  # stem: 4 groups back


def test_no_weight_decay_on_biases_and_norms():
    model, _, _, optimizer = _prepared_optimizer("full")
    assert next(g["weight_decay"] for g in optimizer.param_groups
                if any(p is model.bn1.weight for p in g["params"])) == 0.0


def test_warmup_is_a_fraction_of_the_stage_then_cosine():
    model, _, cfg, optimizer = _prepared_optimizer("full", epochs=4, warmup_fraction=0.25)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    lrs = []
    for step in range(1, 41):
        scheduler.step_update(step)
        lrs.append(_lr_of(optimizer, model.fc.weight))
    peak = lrs.index(max(lrs))
    assert 8 <= peak <= 10
    assert lrs[:peak] == sorted(lrs[:peak])
    assert lrs[peak:] == sorted(lrs[peak:], reverse=True)
    assert lrs[-1] == pytest.approx(cfg.peak_lr * cfg.min_lr_ratio, rel=0.05)


@pytest.mark.parametrize(("epochs", "nominal", "scale"),
                         [(2, 6, 1 / 3), (6, 6, 1.0), (9, 6, 1.0), (2, 0, 1.0)])
def test_a_stage_shorter_than_its_nominal_length_peaks_lower(epochs, nominal, scale):
    """Every group's peak (and so its floor) scales with the stage's length, the
    discriminative ratios kept."""
    model, _, cfg, optimizer = _prepared_optimizer("full", epochs=epochs, nominal_epochs=nominal,
                                                   warmup_fraction=0)
    build_scheduler(optimizer, cfg, steps_per_epoch=10)
    assert cfg.peak_lr == pytest.approx(cfg.lr * scale)
    head, last_stage = (_lr_of(optimizer, p) for p in (model.fc.weight,
                                                       model.layer4[0].conv1.weight))
    assert head == pytest.approx(cfg.lr * scale)
    assert last_stage == pytest.approx(head * cfg.backbone_lr_scale)


def test_frozen_batchnorm_stays_in_eval_mode():
    model, _, _, _ = _prepared_optimizer("partial")
    set_train_mode(model)
    assert model.layer4[0].bn1.training and model.training
    assert not model.bn1.training and not model.layer3[1].bn2.training
    before = model.layer3[1].bn2.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(model.layer3[1].bn2.running_mean, before)
