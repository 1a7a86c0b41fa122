"""A small synthetic pipeline outcome (three stages, four classes, 40 test images) in the
shapes evaluate and register record, for the run report's tests: cheap, no model, no data."""

from __future__ import annotations

from typing import Any

import numpy as np

from thaw.data.prepared import Manifest
from thaw.evaluation import classification_metrics, mistakes

CLASSES = ["T-shirt", "Trouser", "Shirt", "<script>alert('x')</script>"]
TEST_IMAGES = 40
SIZE = 64


def manifest() -> Manifest:
    counts = {"train": {c: 30 + i for i, c in enumerate(CLASSES)},
              "val": {c: 5 for c in CLASSES}, "test": {c: 10 for c in CLASSES}}
    return Manifest(
        classes=CLASSES, class_to_idx={c: i for i, c in enumerate(CLASSES)}, counts=counts,
        input_size=[3, SIZE, SIZE], mean=[0.5] * 3, std=[0.25] * 3, interpolation="bilinear",
        fingerprint="f" * 64, skipped=[{"path": "Shirt/broken.jpg", "reason": "not an image"},
                                       {"path": "Trouser/tiny.png", "reason": "2x2 pixels"}],
        shards={s: [] for s in counts}, source="s3://bucket/fashion", seed=0,
        split_fractions=[0.8, 0.1, 0.1], warnings=["class Shirt has few validation images"])


def test_labels() -> np.ndarray:
    return np.repeat(np.arange(len(CLASSES)), TEST_IMAGES // len(CLASSES))


def test_image(index: int) -> np.ndarray:
    """Test image ``index``: noise (which JPEG cannot shrink much), 128 px, so thumbnails
    are scaled down and the size limit bites."""
    return np.random.default_rng(index).integers(0, 256, (128, 128, 3), dtype=np.uint8)


def probabilities(seed: int) -> np.ndarray:
    """Class probabilities that are right about two times in three."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(TEST_IMAGES, len(CLASSES)))
    logits[np.arange(TEST_IMAGES), test_labels()] += 1.2
    probs = np.exp(logits)
    return probs / probs.sum(1, keepdims=True)


def history(epochs: int, start: float, with_start_point: bool) -> list[dict[str, float]]:
    records = [{"epoch": 0, "val_loss": 1.2, "val_accuracy": start, "val_macro_f1": start}
               ] if with_start_point else []
    for epoch in range(1, epochs + 1):
        score = start + 0.05 * epoch
        records.append({"epoch": epoch, "train_loss": 1.0 / epoch, "train_accuracy": score,
                        "val_loss": 1.1 / epoch, "val_accuracy": score, "val_macro_f1": score})
    return records


def outcome() -> dict[str, Any]:
    """register's outcome: full chosen, compared with champion v1 and promoted."""
    stages = []
    for number, (stage, epochs) in enumerate((("probe", 3), ("partial", 2), ("full", 4))):
        probs = probabilities(number)
        test = classification_metrics(test_labels(), probs.argmax(1), CLASSES, detailed=True)
        stages.append({
            "stage": stage, "run_id": f"run-{stage}", "best_epoch": epochs,
            "val": {"accuracy": 0.6 + 0.1 * number, "macro_f1": 0.55 + 0.1 * number,
                    "loss": 1.0}, "test": test, "wall_seconds": 10.0 * (number + 1),
            "train_images_per_sec": 100.0, "diverged": None,
            "history": history(epochs, 0.4 + 0.1 * number, with_start_point=number > 0),
            "test_mistakes": mistakes(test_labels(), probs)})
    scores = {"val": {"accuracy": 0.81, "macro_f1": 0.7512, "loss": 0.6},
              "test": {"accuracy": 0.79, "macro_f1": 0.7421, "loss": 0.7}}
    champion = {"val": {"accuracy": 0.70, "macro_f1": 0.6234, "loss": 0.9},
                "test": {"accuracy": 0.69, "macro_f1": 0.6123, "loss": 0.95}}
    return {
        "model_name": "fashion", "version": "2", "stage": "full",
        "model_uri": "models:/fashion/2", "promoted": True, "champion_version": "2",
        "previous_champion_version": "1", "selection_metric": "macro_f1",
        "reason": "val macro_f1 on this run's validation split (higher is better): v2 (full) "
                  "0.7512, champion v1 0.6234: beats champion v1 by 0.1278 (margin 0): v2 "
                  "becomes champion.",
        "gate": {"kind": "compared", "metric": "macro_f1", "higher_is_better": True,
                 "margin": 0.0, "challenger": {"stage": "full", **scores},
                 "champion": {"version": "1", **champion}, "class_change": None},
        "stages": stages, "report": None,
    }
