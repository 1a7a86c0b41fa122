"""The pipeline's parameters checked before any expensive work: one function that the CLI
(`thaw submit`, `run-local`, `demo`, `compile`) calls before it connects to anything and the
preprocess step calls before it lists or decodes a single image.

Per-stage settings (epochs, learning rates, batch size, augmentation) are checked by
``thaw.config.stage_config``, the rules' one home; this module names the pipeline parameter
that carries each of them and adds the rules that only the pipeline has.

Pure Python at import time (the CLI may be installed without torch): the rules that need
timm (backbone name, image size for the backbone) run only where timm is installed, which
the step image always is.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from collections.abc import Mapping
from typing import Any

from thaw.config import STAGE_NAMES, InvalidStageSettings, stage_config
from thaw.errors import ThawError

WEIGHT_SOURCES = ("hub", "packaged", "none")
# What thaw.backbones loads a state dict from, by file name.
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
WEIGHT_URI_SCHEMES = ("s3://", "file://")
PACKAGED_BACKBONE = "efficientnet_lite0"  # the only backbone `packaged` weights exist for
# Selection metrics and whether a higher value is better: the one place that says so
# (thaw.champion compares with it).
HIGHER_IS_BETTER = {"macro_f1": True, "accuracy": True, "loss": False}
SELECTION_METRICS = tuple(HIGHER_IS_BETTER)
# A learning rate above this is a typo (1e3 for 1e-3), never a recipe.
MAX_LR = 1.0
# Below this a CNN's last stage sees a feature map of 1 pixel or less: nothing to learn.
MIN_IMAGE_SIZE = 32
# How a prepared dataset stores images: decoded pixels, or re-encoded JPEG (thaw.data.shards).
IMAGE_FORMATS = ("raw", "jpeg")

# Pipeline parameter -> (stage, StageConfig field) for the settings stage_config checks.
STAGE_PARAMETERS: dict[str, list[tuple[str, str]]] = {
    **{f"{stage}_{field}": [(stage, field)] for stage in STAGE_NAMES
       for field in ("epochs", "lr")},
    "batch_size": [(stage, "batch_size") for stage in STAGE_NAMES],
    "num_workers": [(stage, "num_workers") for stage in STAGE_NAMES],
    # the probe trains on cached features, without augmentation, whatever this says
    "augment": [("partial", "augment"), ("full", "augment"), ("lora", "augment")],
}


def check_pipeline_parameters(params: Mapping[str, Any]) -> None:
    """Refuse bad pipeline parameters, all of them in one ThawError naming each parameter
    and its allowed values. Only the parameters in ``params`` are checked (a rule between
    two, such as packaged weights and the backbone, needs both), so callers pass the whole
    set with defaults filled in."""
    problems = {**_stage_problems(params), **_pipeline_problems(params),
                **_backbone_problems(params), **_lora_problems(params)}
    if problems:
        raise ThawError("invalid pipeline parameters: " + "; ".join(
            f"{name} {problem}" for name, problem in problems.items()))


def _stage_problems(params: Mapping[str, Any]) -> dict[str, str]:
    problems: dict[str, str] = {}
    for stage in STAGE_NAMES:
        names = {field: name for name, targets in STAGE_PARAMETERS.items() if name in params
                 for target, field in targets if target == stage}
        try:
            stage_config(stage, **{field: params[name] for field, name in names.items()})
        except InvalidStageSettings as err:
            problems.update({names[field]: text for field, text in err.problems.items()})
    for name in (f"{stage}_lr" for stage in STAGE_NAMES):
        if name in problems or (name in params and params[name] > MAX_LR):
            problems[name] = f"must be in (0, {MAX_LR:g}], got {params[name]}"
    return problems


def _pipeline_problems(params: Mapping[str, Any]) -> dict[str, str]:
    problems = {}
    if "weights" in params:
        problems.update(_weights_problem(params["weights"], params.get("backbone")))
    if "selection_metric" in params and params["selection_metric"] not in SELECTION_METRICS:
        problems["selection_metric"] = (f"must be one of {', '.join(SELECTION_METRICS)} "
                                        f"(loss: lower is better), "
                                        f"got {params['selection_metric']!r}")
    fraction = params.get("max_bad_fraction", 0.0)
    if not 0 <= fraction < 1:  # also NaN
        problems["max_bad_fraction"] = f"must be in [0, 1), got {fraction}"
    if params.get("preprocess_workers", 0) < 0:
        problems["preprocess_workers"] = f"must be >= 0, got {params['preprocess_workers']}"
    margin = params.get("promotion_margin", 0.0)
    if not (margin >= 0 and math.isfinite(margin)):
        problems["promotion_margin"] = f"must be a number >= 0, got {margin}"
    size = params.get("image_size", MIN_IMAGE_SIZE)
    if size < MIN_IMAGE_SIZE:
        problems["image_size"] = f"must be >= {MIN_IMAGE_SIZE} pixels, got {size}"
    image_format = params.get("image_format", "raw")
    if image_format not in IMAGE_FORMATS:
        problems["image_format"] = (f"must be one of {', '.join(IMAGE_FORMATS)}, "
                                    f"got {image_format!r}")
    shard_uri = params.get("shard_uri", "")
    if shard_uri and not (image_format == "jpeg" and shard_uri.startswith("s3://")):
        problems["shard_uri"] = (f"must be an s3:// prefix and needs image_format=jpeg (or be "
                                 f"empty: shards inside the prepared artifact), got {shard_uri!r}")
    return problems


def _weights_problem(weights: str, backbone: str | None) -> dict[str, str]:
    if weights == "packaged" and backbone is not None and backbone != PACKAGED_BACKBONE:
        return {"weights": f"'packaged' exists only for backbone {PACKAGED_BACKBONE!r}, "
                           f"not {backbone!r}: use hub, none or a weights file"}
    if weights in WEIGHT_SOURCES:
        return {}
    scheme, sep, _ = weights.partition("://")
    bad_scheme = sep and f"{scheme}://" not in WEIGHT_URI_SCHEMES
    if bad_scheme or not weights.endswith(WEIGHT_FILE_SUFFIXES):
        return {"weights": f"must be one of {', '.join(WEIGHT_SOURCES)}, or a path, "
                           f"{' or '.join(WEIGHT_URI_SCHEMES)} URI of a "
                           f"{'/'.join(WEIGHT_FILE_SUFFIXES)} file, got {weights!r}"}
    return {}


def _lora_problems(params: Mapping[str, Any]) -> dict[str, str]:
    """With ``lora`` on, the backbone must have attention or MLP linear layers to adapt
    (``thaw.training.lora``; on the meta device). A backbone that is no timm model is
    ``_backbone_problems``' to name."""
    backbone = params.get("backbone")
    if not params.get("lora") or backbone is None or importlib.util.find_spec("timm") is None:
        return {}
    import timm

    if not timm.is_model(backbone):
        return {}
    from thaw.training.lora import lora_problems

    return lora_problems(backbone, params.get("image_size"))


def _backbone_problems(params: Mapping[str, Any]) -> dict[str, str]:
    """The backbone must be a timm model that thaw can fine-tune in stages (a classifier to
    replace, stage groups), built for the image size, which it must be able to take: at
    least its total stride, and one its patches, windows and attention biases fit
    (``thaw.backbone_contract``, on the meta device: no weights, about a second)."""
    backbone = params.get("backbone")
    if backbone is None or importlib.util.find_spec("timm") is None:
        return {}
    import timm

    if not timm.is_model(backbone):
        close = difflib.get_close_matches(backbone, timm.list_models(), n=3)
        hint = f"; close: {', '.join(close)}" if close else ""
        return {"backbone": f"must be a timm model name (timm.list_models() lists them, "
                            f"e.g. resnet50, efficientnet_lite0), got {backbone!r}{hint}"}
    size = params.get("image_size")
    if size is None or size < MIN_IMAGE_SIZE:
        return {}
    from thaw.backbone_contract import backbone_problems

    return backbone_problems(backbone, size, MIN_IMAGE_SIZE)
