"""Freezing: which parameters train, and BatchNorm of frozen parts kept in eval mode.

A truly frozen layer neither gets gradients nor updates its BatchNorm running statistics;
fastai's and Lightning's "frozen" BN keep training (``train_bn=True``), which is not a
linear probe.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def apply_trainable(model: nn.Module, trainable: set[str]) -> None:
    """Set ``requires_grad`` so that exactly the parameters named in ``trainable`` train."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def set_train_mode(model: nn.Module, update_bn_stats: bool = True) -> None:
    """``model.train()``, then every BatchNorm whose own parameters are frozen back to eval;
    with ``update_bn_stats=False`` every BatchNorm, trainable or not, keeps its running
    statistics (its affine weights still train)."""
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm) and (not update_bn_stats or not any(
            p.requires_grad for p in module.parameters(recurse=False)
        )):
            module.eval()
