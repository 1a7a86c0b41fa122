"""What staged fine-tuning needs from a timm model, and the check that a model has it.

A backbone must (1) build at the training input size, (2) expose a classifier to replace
and (3) split into stage groups (stem ... last stage) for freezing and discriminative LRs.
``backbone_problems`` checks all three on the meta device (no weights, no data, no GPU), so
parameter checking refuses a backbone before preprocess reads a single image.

Input size: timm's own ``resolve_model_input_args`` (timm 1.0.31, ``timm/models/_factory.py``)
passes ``img_size`` to models whose size is built in (position embeddings, attention windows
or biases: ViT, Swin, EVA, BEiT, MaxViT, LeViT...); when pretrained weights load, timm's
checkpoint filters resample those tensors to the new grid. Other models take any size.

Stage groups: timm's ``group_matcher(coarse=True)`` where the model has one, else groups cut
at the modules of ``feature_info`` (MetaFormer, PiT), else at the model's top-level children,
so "last stage" and layer-wise LR decay mean the same thing for every family.

Imports only torch, timm and thaw.errors, so thaw.params can call it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.models import group_parameters, resolve_model_input_args
from torch import nn

from thaw.errors import ThawError

# A last stage below this share of the backbone's parameters is a norm or a pooling conv
# (DenseNet's ``features.norm5``), not a stage: the group before it joins.
MIN_LAST_STAGE_SHARE = 0.05
# Sizes tried, nearest first, when looking for sizes a model takes (each is a meta forward).
MAX_SIZE_TRIES = 12
SIZE_STEP = 8  # candidate sizes of a model without a patch embedding are multiples of this
# In the name of every parameter of a LoRA adapter (peft's LoraModel.prefix; thaw.training.lora).
ADAPTER_MARKER = ".lora_"


@dataclass(frozen=True)
class StageGroups:
    """Parameter names of a model split the way staged fine-tuning needs it.

    ``backbone`` lists the coarse groups (stem first); the last of them is the "last stage"
    (``layer4`` on a ResNet, ``blocks.6`` + ``conv_head`` on EfficientNet, ``denseblock4`` +
    ``norm5`` on DenseNet). ``head`` holds every classifier (both heads of a distilled model).
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
        if which == "adapters":  # LoRA: the adapters thaw.training.lora added, and the head
            return set(self.head) | {n for names in self.backbone for n in names
                                     if ADAPTER_MARKER in n}
        raise ThawError(f"unknown trainable set {which!r}")


def size_kwargs(arch: str, image_size: int | None) -> dict[str, Any]:
    """``timm.create_model`` arguments that build ``arch`` for ``image_size`` inputs:
    ``img_size`` for models whose input size is built in, nothing for the others."""
    if image_size is None:
        return {}
    resolved = resolve_model_input_args(arch, {"input_size": (3, image_size, image_size)})
    return {"img_size": resolved["img_size"]} if "img_size" in resolved else {}


def classifier_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every classifier ``reset_classifier`` replaces: one, or two for
    distilled models (DeiT, LeViT, EfficientFormer: ``head`` and ``head_dist``, averaged
    at inference and, with ``distilled_training`` off as timm builds them, in training)."""
    found = model.get_classifier()
    heads = found if isinstance(found, tuple) else (found,)
    return [(name, module) for name, module in model.named_modules()
            if any(module is head for head in heads)]


def share_first_head(model: nn.Module) -> None:
    """Make every classifier of a distilled model the same module as the first, for the
    head-only probe on cached features: those are the pooled features timm's
    ``forward_head(pre_logits=True)`` returns, the mean of what the two heads see (DeiT's
    class and distillation tokens) or what both see (LeViT), so one linear head fitted on
    them scores exactly what the model with both heads tied computes. A model saved from
    this state has both heads equal; the later stages train them apart."""
    (_, first), *others = classifier_modules(model)
    for name, _ in others:
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute, first)


def stage_groups(model: nn.Module) -> StageGroups:
    """Split ``model``'s parameters into the classifier(s) and coarse backbone groups."""
    head_prefixes = tuple(f"{name}." for name, _ in classifier_modules(model))
    params = dict(model.named_parameters())
    head = [n for n in params if n.startswith(head_prefixes)]
    if not head:
        raise ThawError(f"{type(model).__name__} exposes no classifier to replace")
    backbone = []
    for names in _coarse_groups(model):
        rest = [n for n in names if not n.startswith(head_prefixes)]
        if rest:
            backbone.append(rest)
    backbone = _last_stage_merged(model, backbone, {n: p.numel() for n, p in params.items()})
    if len(backbone) < 2:
        raise ThawError(f"{type(model).__name__} has too few layer groups for staged training")
    return StageGroups(head=head, backbone=backbone)


def _coarse_groups(model: nn.Module) -> list[list[str]]:
    if hasattr(model, "group_matcher"):
        return list(group_parameters(model, model.group_matcher(coarse=True)).values())
    return _module_order_groups(model)


def _module_order_groups(model: nn.Module) -> list[list[str]]:
    """Parameters in module order, a new group at each ``feature_info`` module (else each
    top-level child); parameters after the last one (a final norm) stay in the last group,
    those before the first form the stem."""
    feature_info = getattr(model, "feature_info", None) or []
    starts = [f"{info['module']}." for info in feature_info] or [
        f"{name}." for name, _ in model.named_children()]
    groups: list[list[str]] = [[]]
    for name, _ in model.named_parameters():
        if any(name.startswith(start) for start in starts) and not _same_start(
                name, groups[-1], starts):
            groups.append([])
        groups[-1].append(name)
    return [g for g in groups if g]


def _same_start(name: str, group: list[str], starts: list[str]) -> bool:
    return bool(group) and any(name.startswith(s) and group[-1].startswith(s) for s in starts)


def _last_stage_merged(model: nn.Module, backbone: list[list[str]],
                       sizes: dict[str, int]) -> list[list[str]]:
    """The last stage starts at the group holding the last feature stage (timm's
    ``feature_info``) and takes every later group with it (MobileNetV3's post-pool
    ``conv_head``); while it holds under ``MIN_LAST_STAGE_SHARE`` of the backbone, the group
    before it joins too."""
    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        last = f"{feature_info[-1]['module']}."
        start = next((i for i, names in enumerate(backbone)
                      if any(n.startswith(last) for n in names)), len(backbone) - 1)
        backbone = backbone[:start] + [sum(backbone[start:], [])]
    total = sum(sizes[n] for names in backbone for n in names)
    while len(backbone) > 2 and sum(sizes[n] for n in backbone[-1]) < MIN_LAST_STAGE_SHARE * total:
        backbone = backbone[:-2] + [backbone[-2] + backbone[-1]]
    return backbone


def backbone_problems(arch: str, image_size: int, min_size: int) -> dict[str, str]:
    """What keeps ``arch`` from staged training at ``image_size``, by pipeline parameter
    (``backbone``, ``image_size``); empty when nothing does. Runs on the meta device; sizes
    suggested instead of a bad one are at least ``min_size``."""
    try:
        model = _meta_model(arch, image_size)
    except Exception as err:  # a model timm cannot build without real tensors: not judged
        if _meta_unsupported(err):
            return {}
        return {"backbone": f"{arch!r} could not be built by timm for {image_size} px "
                            f"inputs: {_brief(err)}"}
    try:
        stage_groups(model)
    except ThawError as err:
        return {"backbone": f"{arch!r} cannot be fine-tuned in stages: {err}"}
    reductions = [info.get("reduction", 1) for info in getattr(model, "feature_info", None) or []]
    stride = max(reductions, default=0)
    if image_size < stride:
        return {"image_size": f"must be >= {stride} pixels for {arch!r} (its total stride), "
                              f"got {image_size}"}
    reason = _size_failure(model, image_size)
    if reason is None:
        return {}
    nearest = _nearest_sizes(arch, image_size, _patch_size(model) or SIZE_STEP,
                             model.pretrained_cfg["input_size"][-1], min_size)
    hint = (f"; nearest sizes that work: {', '.join(map(str, nearest))}" if nearest
            else "; no size near it works")
    return {"image_size": f"must be a size {arch!r} can take, got {image_size}: {reason}{hint}"}


def _meta_model(arch: str, image_size: int | None) -> nn.Module:
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **size_kwargs(arch, image_size))
        model.reset_classifier(2)  # the head thaw trains (timm builds some, e.g. EVA-02, without)
    return model


def _size_failure(model: nn.Module, size: int) -> str | None:
    """Why ``model`` (built for ``size``) cannot take ``size`` x ``size`` inputs, or None."""
    patch = _patch_size(model)
    if patch and size % patch:
        return f"not a multiple of its patch size {patch}: the last {size % patch} pixels " \
               f"of each row would be dropped"
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, 3, size, size, device="meta"))
    except Exception as err:  # torch's own shape errors, timm's asserts (windows, grids)
        return None if _meta_unsupported(err) else _brief(err)
    return None


def _nearest_sizes(arch: str, size: int, step: int, default: int, min_size: int) -> list[int]:
    """The nearest working sizes below and above ``size`` among multiples of ``step`` (and
    the model's default size), trying at most ``MAX_SIZE_TRIES`` nearest first."""
    candidates = {s for s in range(step, 2 * max(size, default) + 1, step) if s >= min_size}
    ordered = sorted(candidates - {size}, key=lambda s: (abs(s - size), s))[:MAX_SIZE_TRIES]
    below = above = None
    for candidate in [*ordered, default]:
        if (below if candidate < size else above) is not None or candidate == size:
            continue
        if _size_failure(_meta_model(arch, candidate), candidate) is None:
            if candidate < size:
                below = candidate
            else:
                above = candidate
    return [s for s in (below, above) if s is not None]


def _patch_size(model: nn.Module) -> int | None:
    """The step of the patch embedding (its conv's stride: an overlapping embedding such as
    PVT-v2's 7x7/4 steps by 4), or None for a model without one."""
    embed = getattr(model, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    patch = proj.stride if isinstance(proj, nn.Conv2d) else getattr(embed, "patch_size", None)
    if isinstance(patch, tuple | list):
        patch = patch[0]
    return patch if isinstance(patch, int) else None


def _meta_unsupported(err: Exception) -> bool:
    return isinstance(err, NotImplementedError) or "meta tensor" in str(err)


def _brief(err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return first if len(first) <= 160 else first[:157] + "..."
