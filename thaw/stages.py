"""Run one stage or evaluate one checkpoint from files: what the pipeline steps call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from thaw.backbones import create_backbone
from thaw.checkpoint import (
    CheckpointMirror,
    file_digest,
    load_checkpoint,
    model_from_checkpoint,
)
from thaw.class_lists import class_diff
from thaw.config import StageConfig
from thaw.data.prepared import PreparedDataset
from thaw.errors import ThawError
from thaw.evaluation import classification_metrics
from thaw.training import StageResult, distributed, train_stage
from thaw.training.feeds import ImageFeed
from thaw.training.loop import EpochCallback, default_device
from thaw.training.lora import add_adapters, merge_best


def run_stage(
    data: PreparedDataset,
    cfg: StageConfig,
    out_dir: Path,
    *,
    arch: str,
    weights: str = "hub",
    init_checkpoint: Path | None = None,
    on_epoch_end: EpochCallback | None = None,
    checkpoint_uri: str | None = None,
) -> StageResult:
    """Train stage ``cfg`` starting from ``init_checkpoint`` (the previous stage's best:
    gradual unfreezing) or, for the first stage, from ``arch`` with ``weights``.

    The LoRA stage (``trainable="adapters"``) trains adapters added to the model, and its
    ``best.pt`` ends with them merged into the weights (``thaw.training.lora``): a model
    without LoRA layers to adapt is refused before anything trains.

    ``checkpoint_uri``: where the stage's checkpoints are mirrored for resuming after a
    retry (see ``train_stage``). The seed is set before the new head is created, so the
    same seed gives the same starting model. A checkpoint trained on other classes than
    ``data``'s is refused before anything trains.
    """
    classes = data.manifest.classes
    torch.manual_seed(cfg.seed)
    if init_checkpoint is not None:
        payload = load_checkpoint(init_checkpoint)
        check_classes(f"checkpoint {init_checkpoint}", payload["meta"]["classes"], classes)
        model = model_from_checkpoint(payload)
        start_point = f"checkpoint sha256 {file_digest(init_checkpoint)}"
    else:
        model = create_backbone(arch, len(classes), weights,
                                image_size=data.manifest.data_config()["input_size"][-1])
        start_point = f"{arch} with weights {weights}"
    if cfg.trainable != "adapters":
        return train_stage(model, data, cfg, out_dir, on_epoch_end=on_epoch_end,
                           start_point=start_point, checkpoint_uri=checkpoint_uri)
    adapted = add_adapters(model, cfg)  # in place: the loop trains ``model`` itself
    result = train_stage(model, data, cfg, out_dir, on_epoch_end=on_epoch_end,
                         start_point=start_point, checkpoint_uri=checkpoint_uri)
    if distributed.current().is_main:
        merge_best(adapted, Path(result.best_checkpoint),
                   CheckpointMirror(checkpoint_uri, Path(out_dir)))
    distributed.current().barrier()
    return result


def check_classes(source: str, trained: list[str], classes: list[str]) -> None:
    """Refuse a model trained on another class list (order included) than the data's: its
    head's outputs would be read as the wrong classes, or not fit at all."""
    trained = list(trained)
    if trained == list(classes):
        return
    raise ThawError(
        f"{source} was trained on classes other than the dataset's: {len(trained)} classes "
        f"in the checkpoint, {len(classes)} in the dataset "
        f"({class_diff(trained, classes, 'the checkpoint', 'the dataset')}); its head cannot "
        "be used on this data: start from its weights instead (weights=<file>, which gets a "
        "new head) or use data with the checkpoint's classes")


@torch.no_grad()
def predict_split(model: nn.Module, data: PreparedDataset, split: str,
                  batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, class probabilities) of every image in ``split``."""
    device = default_device()
    model.to(device).eval()
    feed = ImageFeed(model, data, device, batch_size=batch_size)
    labels, probs = [], []
    for x, y in feed.batches(split, train=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            probs.append(model(x).float().softmax(1).cpu().numpy())
        labels.append(y.cpu().numpy())
    return np.concatenate(labels), np.concatenate(probs)


def evaluate_checkpoint(path: Path, data: PreparedDataset, split: str = "test") -> dict[str, Any]:
    """Accuracy, macro-F1, per-class report and confusion matrix of a checkpoint on ``split``."""
    model = model_from_checkpoint(load_checkpoint(path))
    y_true, probs = predict_split(model, data, split)
    return classification_metrics(y_true, probs.argmax(1), data.manifest.classes, detailed=True)


def score_checkpoint(path: Path, data: PreparedDataset, split: str) -> dict[str, Any]:
    """Accuracy, macro-F1 and loss (plain cross-entropy: no label smoothing, no class
    weights, so it means the same for every stage and every model) of a checkpoint on
    ``split``: the one function the champion gate scores every model with.

    The checkpoint must have been trained on ``data``'s class list. A checkpoint whose
    preprocessing (input size, mean/std) is that of ``data`` sees the images exactly as in
    training (``predict_split``); any other sees them through its own serving preprocessing
    (resize to its input size, its mean/std), as ``models:/...`` would when served them.
    ``as_served`` says which.
    """
    payload = load_checkpoint(path)
    classes = data.manifest.classes
    check_classes(f"checkpoint {path}", payload["meta"]["classes"], classes)
    as_served = not same_preprocessing(payload["meta"]["data_config"],
                                       data.manifest.data_config())
    if as_served:
        y_true, probs = _predict_as_served(path, data, split)
    else:
        y_true, probs = predict_split(model_from_checkpoint(payload), data, split)
    metrics = classification_metrics(y_true, probs.argmax(1), classes)
    picked = np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1.0)
    return {**metrics, "loss": float(-np.log(picked).mean()), "images": int(len(y_true)),
            "as_served": as_served}


def same_preprocessing(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two data configs turn a prepared image into the same model input (the
    interpolation only matters when resizing, which equal input sizes never do)."""
    return (list(a["input_size"]) == list(b["input_size"])
            and np.allclose(a["mean"], b["mean"]) and np.allclose(a["std"], b["std"]))


def _predict_as_served(path: Path, data: PreparedDataset, split: str,
                       batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    from types import SimpleNamespace

    from thaw.serving import ImageClassifier

    served = ImageClassifier()
    served.load_context(SimpleNamespace(artifacts={"checkpoint": str(path)}))
    images, labels = data.images(split), data.labels(split)
    probs = [np.asarray(served.predict(None, np.asarray(images[i:i + batch_size]))
                        ["probabilities"].tolist(), dtype=np.float32)
             for i in range(0, len(labels), batch_size)]
    return labels, (np.concatenate(probs) if probs
                    else np.zeros((0, len(data.manifest.classes)), np.float32))
