"""Optimizer and schedule for one stage, rebuilt whenever the trainable set changes."""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from thaw.backbones import StageGroups
from thaw.config import StageConfig


def lr_scales(groups: StageGroups, cfg: StageConfig) -> list[tuple[list[str], float]]:
    """(parameter names, LR multiple of the head's LR) per group, head first.

    The last stage gets ``backbone_lr_scale``; each earlier group ``layer_decay`` times
    less, so the stem, whose generic features transfer best, moves least.
    """
    scales = [(groups.head, 1.0)]
    for depth, names in enumerate(reversed(groups.backbone)):
        scales.append((names, cfg.backbone_lr_scale * cfg.layer_decay**depth))
    return scales


def build_optimizer(model: nn.Module, groups: StageGroups, cfg: StageConfig,
                    lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, one param group per (layer group, decay).

    Each group carries ``lr_scale`` (its discriminative multiple times ``lr_scale``, the
    global-batch rule of data-parallel runs), which timm's schedulers multiply into the LR
    they set: warmup, peak and floor all scale.
    Biases and norm weights (1-D) get no weight decay. The model must already be on its
    device (the fused implementation needs it).
    """
    params = dict(model.named_parameters())
    param_groups = []
    for names, scale in lr_scales(groups, cfg):
        live = [params[n] for n in names if params[n].requires_grad]
        decayed = [p for p in live if p.ndim > 1]
        undecayed = [p for p in live if p.ndim <= 1]
        for members, weight_decay in ((decayed, cfg.weight_decay), (undecayed, 0.0)):
            if members:
                param_groups.append(
                    {"params": members, "weight_decay": weight_decay,
                     "lr_scale": scale * lr_scale}
                )
    # fused: one kernel per step, and it takes ``found_inf`` (set by the loop), with which a
    # step whose loss was not finite is skipped on the device, without a host sync.
    return torch.optim.AdamW(param_groups, lr=cfg.peak_lr, fused=True)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: StageConfig, steps_per_epoch: int
) -> CosineLRScheduler:
    """Linear warmup then cosine decay, stepped per batch (``step_update``)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(round(cfg.warmup_fraction * total), total - 1)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total - warmup,
        lr_min=cfg.peak_lr * cfg.min_lr_ratio,
        warmup_t=warmup,
        warmup_lr_init=cfg.peak_lr * 0.01,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    scheduler.step_update(0)  # apply lr_scale before the first batch
    return scheduler
