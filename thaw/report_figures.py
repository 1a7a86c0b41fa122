"""The pictures of the run report (``thaw.report``), as text that goes inline in its page:
the per-epoch curves as an SVG element, test images as ``data:`` URIs of small JPEGs."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np

THUMBNAIL_PX = 96  # longest side of a gallery thumbnail; smaller images are kept as they are
THUMBNAIL_QUALITY = 85
# (history key, line style, label): losses on the left panel, scores on the right
LOSSES = (("train_loss", "--", "train loss"), ("val_loss", "-", "val loss"))
SCORES = (("train_accuracy", "--", "train accuracy"), ("val_accuracy", ":", "val accuracy"),
          ("val_macro_f1", "-", "val macro-F1"))


def thumbnail_uri(image: np.ndarray, max_px: int = THUMBNAIL_PX) -> str:
    """An (H, W, 3) uint8 image as a ``data:image/jpeg`` URI, its longest side at most
    ``max_px``."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image))
    picture.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def curves_svg(stages: list[dict[str, Any]], chosen: str) -> str:
    """Every stage's per-epoch curves (``history``) as one ``<svg>`` element: losses left,
    scores right, epochs counted on across stages in training order, a line at each stage
    boundary with the stage's name above its span, the chosen stage's best epoch starred.
    Text stays text (``svg.fonttype`` none), which keeps the page small."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "thaw-report"}):
        figure, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
        try:
            _draw(axes, stages, chosen)
            buffer = io.StringIO()
            figure.savefig(buffer, format="svg",
                           metadata={"Date": None, "Creator": None, "Format": None,
                                     "Type": None})
        finally:
            plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _draw(axes, stages: list[dict[str, Any]], chosen: str) -> None:
    import matplotlib.pyplot as plt

    loss_ax, score_ax = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    offset = 0
    for number, stage in enumerate(s for s in stages if s.get("history")):
        color = colors[number % len(colors)]
        history = stage["history"]
        epochs = [offset + record["epoch"] for record in history]
        for ax, series in ((loss_ax, LOSSES), (score_ax, SCORES)):
            for key, style, _ in series:
                points = [(x, r[key]) for x, r in zip(epochs, history, strict=True) if key in r]
                if points:
                    ax.plot(*zip(*points, strict=True), style, color=color, marker=".",
                            linewidth=2.2 if stage["stage"] == chosen else 1.3)
            if offset:
                ax.axvline(offset, color="0.55", linewidth=0.9, linestyle=(0, (4, 3)))
            ax.text((epochs[0] + epochs[-1]) / 2, 1.01, stage["stage"], color=color,
                    ha="center", va="bottom", fontweight="bold" if stage["stage"] == chosen
                    else "normal", transform=ax.get_xaxis_transform())
        best = [r for r in history if r["epoch"] == stage.get("best_epoch")]
        if stage["stage"] == chosen and best and math.isfinite(best[0].get("val_macro_f1",
                                                                           math.nan)):
            score_ax.plot(offset + best[0]["epoch"], best[0]["val_macro_f1"], "*",
                          color=color, markersize=14, markeredgecolor="black",
                          label=f"registered: {chosen}, epoch {best[0]['epoch']}")
        offset = epochs[-1]
    for ax, series, title in ((loss_ax, LOSSES, "loss"), (score_ax, SCORES, "score")):
        for _, style, label in series:
            ax.plot([], [], style, color="0.3", label=label)
        ax.set(xlabel="epoch (counted across stages)", ylabel=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
