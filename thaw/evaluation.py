"""Classification metrics: accuracy and macro-F1 side by side, per-class report, confusion;
the mistakes a person looks at first."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], *, detailed: bool = False
) -> dict[str, Any]:
    """Accuracy and macro-F1 (every class counts the same, so a rare class that is never
    predicted shows up even when accuracy looks fine). ``detailed`` adds the per-class
    precision/recall/F1 report and the confusion matrix (rows: true, columns: predicted)."""
    labels = list(range(len(classes)))
    metrics: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro",
                                   zero_division=0)),
    }
    if detailed:
        report = classification_report(y_true, y_pred, labels=labels, target_names=classes,
                                       output_dict=True, zero_division=0)
        metrics["per_class"] = {c: report[c] for c in classes}
        metrics["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return metrics


# How many mistakes a stage's evaluation keeps: bounded, since they travel in the evaluation
# report and outcome.json; enough for a run report's gallery (thaw.report).
WORST_MISTAKES = 48
CONFUSED_PAIRS = 6
PAIR_EXAMPLES = 4


def mistakes(y_true: np.ndarray, probs: np.ndarray, image_index: np.ndarray | None = None, *,
             worst: int = WORST_MISTAKES, pairs: int = CONFUSED_PAIRS,
             per_pair: int = PAIR_EXAMPLES) -> dict[str, Any]:
    """The wrongly classified images a person looks at first: the ``worst`` (most confident
    mistakes), and the ``pairs`` most confused (true, predicted) class pairs with how often
    each happened and its ``per_pair`` most confident mistakes.

    ``probs`` are the class probabilities of image ``image_index[i]`` of the split (default
    ``i``). A mistake is ``{index, true, predicted, confidence, true_probability}``, classes as
    indices, ``confidence`` the predicted class's probability."""
    predicted = probs.argmax(1)
    rows = np.arange(len(y_true))
    confidence, true_probability = probs[rows, predicted], probs[rows, y_true]
    index = rows if image_index is None else np.asarray(image_index)
    wrong = np.flatnonzero(predicted != y_true)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]

    def record(row: int) -> dict[str, Any]:
        return {"index": int(index[row]), "true": int(y_true[row]),
                "predicted": int(predicted[row]), "confidence": float(confidence[row]),
                "true_probability": float(true_probability[row])}

    counts = Counter(zip(y_true[wrong].tolist(), predicted[wrong].tolist(), strict=True))
    most = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:pairs]
    return {
        "worst": [record(row) for row in wrong[:worst]],
        "pairs": [{"true": true, "predicted": pred, "count": count, "examples": [
            record(row) for row in
            wrong[(y_true[wrong] == true) & (predicted[wrong] == pred)][:per_pair]]}
            for (true, pred), count in most],
    }


def confusion_matrix_figure(matrix: list[list[int]], classes: list[str], title: str):
    """A matplotlib figure of the confusion matrix with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = counts.max() / 2 if counts.size else 0
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center",
                color="white" if n > threshold else "black", fontsize=8)
    fig.tight_layout()
    return fig
