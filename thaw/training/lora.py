"""LoRA: low-rank adapters on a timm model's attention and MLP layers, with the ``peft`` library.

The LoRA stage is the training loop's ``trainable="adapters"`` configuration: ``add_adapters``
wraps the linear layers in peft's LoRA layers (in place: the timm model keeps its module names,
a wrapped layer's weight becomes ``<layer>.base_layer.weight`` next to ``<layer>.lora_A/B``),
``thaw.backbone_contract.StageGroups.trainable("adapters")`` selects the adapters and the head,
and the loop trains them like any other trainable set. Resuming works on the adapters
(``last.pt`` holds them); ``merge_best`` then folds the best epoch's adapters into the weights
(peft's ``merge_and_unload``), so ``best.pt`` is a plain timm model: the next steps, the
registry and serving (``thaw.checkpoint.model_from_checkpoint``) see no difference.

Which layers: peft's ``LoraConfig.target_modules`` given as a list matches a module whose full
name equals an entry or ends with ``.<entry>`` (``check_target_module_exists`` in
peft/tuners/tuners_utils.py, peft 0.22.0). ``proj`` alone would also match a ViT's patch
embedding (``patch_embed.proj``, a Conv2d), so the full names of the ``nn.Linear`` layers are
passed instead: attention (``qkv``, ``q/k/v``, ``q_proj``..., ``proj``) and MLP (``fc1``,
``fc2``, SwiGLU's ``fc1_g``/``fc1_x``) layers of ViT, DeiT, BEiT, EVA, Swin, ConvNeXt and the
like; never a classifier. A backbone without any (ResNet, EfficientNet: convolutions only) is
refused, in parameter checking (``lora_problems``) and again when the stage starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
from torch import nn

from thaw.backbone_contract import ADAPTER_MARKER, classifier_modules, size_kwargs
from thaw.checkpoint import CheckpointMirror, load_checkpoint, save_checkpoint
from thaw.config import StageConfig
from thaw.errors import ThawError

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

ADAPTED_LAYERS = ("qkv", "q", "k", "v", "q_proj", "k_proj", "v_proj", "o_proj", "proj",
                  "fc1", "fc2", "fc1_g", "fc1_x")


def adapted_layers(model: nn.Module) -> list[str]:
    """Full names of the linear layers the LoRA stage adapts: attention and MLP ones."""
    heads = tuple(name for name, _ in classifier_modules(model))
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ADAPTED_LAYERS
            and not name.startswith(heads)]


def lora_problems(arch: str, image_size: int | None) -> dict[str, str]:
    """Why ``arch`` cannot have a LoRA stage, by pipeline parameter (``lora``); empty when it
    can. Builds the model on the meta device: no weights, no data."""
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **size_kwargs(arch, image_size))
            model.reset_classifier(2)
    except Exception:  # a model timm cannot build: backbone_problems says why
        return {}
    try:
        _targets(model, arch)
    except ThawError as err:
        return {"lora": str(err)}
    return {}


def add_adapters(model: nn.Module, cfg: StageConfig) -> PeftModel:
    """Add LoRA adapters of ``cfg``'s rank, alpha and dropout to ``model``'s attention and MLP
    layers, in place; returns the peft wrapper, which ``merge_best`` merges them with."""
    from peft import LoraConfig, get_peft_model

    targets = _targets(model, type(model).__name__)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                        lora_dropout=cfg.lora_dropout, target_modules=targets)
    return get_peft_model(model, config)


def merge_best(adapted: PeftModel, best_path: Path, mirror: CheckpointMirror) -> None:
    """Rewrite ``best_path`` with the best epoch's adapters merged into the weights, and push
    it to ``mirror``. A checkpoint already merged (a finished stage run again) is left alone."""
    payload = load_checkpoint(best_path)
    if not any(ADAPTER_MARKER in key for key in payload["model"]):
        return
    adapted.base_model.model.load_state_dict(payload["model"])
    # safe_merge: a non-finite adapter is refused instead of being folded into the weights
    merged = adapted.merge_and_unload(safe_merge=True)
    save_checkpoint(best_path, merged, payload["meta"])
    mirror.push(best_path)
    log.info("merged the LoRA adapters of epoch %s into %s", payload["meta"].get("epoch"),
             best_path)


def _targets(model: nn.Module, name: str) -> list[str]:
    targets = adapted_layers(model)
    if not targets:
        raise ThawError(
            f"{name} has no attention or MLP linear layers to adapt (LoRA targets nn.Linear "
            f"layers named {', '.join(ADAPTED_LAYERS)}): use a transformer backbone such as "
            f"vit_base_patch16_224 or swin_tiny_patch4_window7_224 for the lora stage, or "
            f"turn it off (lora=false); partial and full fine-tune this one")
    return targets
