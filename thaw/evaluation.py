"""Classification metrics: accuracy and macro-F1 side by side, per-class report, confusion."""

from __future__ import annotations

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
