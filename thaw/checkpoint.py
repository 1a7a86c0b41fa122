"""Checkpoints: a model's weights plus what is needed to rebuild and serve it.

Written atomically (temp file + rename) so a crash never leaves a half checkpoint, and
read with ``weights_only=True`` (plain tensors and Python values, no pickled code).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from thaw.errors import ThawError

FORMAT = "thaw-checkpoint/1"


def model_arch(model: nn.Module) -> str:
    return model.pretrained_cfg["architecture"]


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any], **state: Any) -> None:
    """Save ``model``'s weights with ``meta`` (arch, classes, data_config, stage, metrics)
    and any extra training ``state`` (optimizer, scheduler, ...) for resuming."""
    payload = {"format": FORMAT, "arch": model_arch(model), "meta": meta,
               "model": model.state_dict(), **state}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ThawError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ThawError(f"could not read checkpoint {path}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ThawError(f"{path} is not a thaw checkpoint ({FORMAT})")
    return payload


def model_from_checkpoint(payload: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint was saved from (no download: weights come from it)."""
    num_classes = len(payload["meta"]["classes"])
    model = timm.create_model(payload["arch"], pretrained=False, num_classes=num_classes)
    model.reset_classifier(num_classes)
    model.load_state_dict(payload["model"])
    return model
