"""The run report: one self-contained HTML page per pipeline run that answers "which stage
won, by how much, on what data, and which images does the model get wrong".

Built by register from its outcome (stage table, choice, champion gate; each stage's test
metrics, worst mistakes and history from evaluate) and the prepared data (classes, counts,
skipped files, test images for the gallery). Self-contained: no script, every picture inline
(``data:`` URIs, one inline SVG), and a Content-Security-Policy that forbids loading anything,
so it reads the same from a file, the MLflow UI or the Kubeflow UI. At most
``MAX_REPORT_BYTES``: thumbnails are scaled down, and the gallery shrinks to fit.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from thaw import storage
from thaw.data.prepared import ImageSplit, Manifest, PreparedDataset
from thaw.errors import ThawError
from thaw.evaluation import CONFUSED_PAIRS, PAIR_EXAMPLES
from thaw.report_figures import THUMBNAIL_PX, curves_svg, thumbnail_uri

REPORT_FILE = "run_report.html"
MAX_REPORT_BYTES = 2_000_000
MATRIX_CLASSES = 30  # a bigger confusion matrix shows the classes with the most mistakes
SKIPPED_LISTED = 100
# No script, nothing fetched: pictures are data: URIs, styles inline.
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
       "form-action 'none'")
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;padding:0 16px;
color:#1d2329}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:32px;
border-bottom:1px solid #d6dbe0}
table{border-collapse:collapse;margin:8px 0}th,td{padding:3px 8px;border:1px solid #d6dbe0;
text-align:right}th:first-child,td:first-child{text-align:left}
tr.chosen{background:#fff4c2;font-weight:600}.note{color:#5a6570}
.verdict{font-size:16px;background:#eef5ff;padding:10px 14px;border-radius:6px}
svg{max-width:100%;height:auto}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:132px;font-size:12px}
figure img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;
background:#f1f3f5;border:1px solid #d6dbe0}
table.matrix td{min-width:28px;text-align:center}
"""
Images = Callable[[int], np.ndarray]  # test image number -> (H, W, 3) uint8


def write_run_report(path: Path, outcome: dict[str, Any], data: PreparedDataset) -> Path:
    """Write the run report of ``outcome`` (register's, with evaluate's stages) to ``path``,
    atomically; test images come from ``data``."""
    test = ImageSplit(data, "test")
    page = render_run_report(outcome, data.manifest,
                             lambda index: test[index][0].permute(1, 2, 0).numpy())
    return storage.write_text_atomic(Path(path), page)


def render_run_report(outcome: dict[str, Any], manifest: Manifest, test_image: Images, *,
                      max_bytes: int = MAX_REPORT_BYTES) -> str:
    """The page. Over ``max_bytes``, the gallery (and the examples of each confused pair
    with it) is halved until the page fits."""
    thumbnails: dict[int, str] = {}

    def thumbnail(index: int) -> str:
        if index not in thumbnails:
            thumbnails[index] = thumbnail_uri(test_image(index))
        return thumbnails[index]

    curves = curves_svg(outcome["stages"], outcome["stage"])
    shown = len(_mistakes(outcome)["worst"])
    while True:
        page = _page(outcome, manifest, curves, thumbnail, shown, max_bytes)
        size = len(page.encode())
        if size <= max_bytes:
            return page
        if shown == 0:
            raise ThawError(f"the run report is {size:,} bytes without its gallery, over its "
                            f"limit of {max_bytes:,}")
        shown //= 2


def _page(outcome: dict[str, Any], manifest: Manifest, curves: str,
          thumbnail: Callable[[int], str], shown: int, max_bytes: int) -> str:
    classes = manifest.classes
    chosen = _chosen(outcome)
    found = _mistakes(outcome)
    title = f"{outcome['model_name']} v{outcome['version']}: {outcome['stage']} registered"
    sections = [
        f"<h1>thaw run report: {escape(title)}</h1>",
        f'<p class="verdict">{_verdict(outcome)}</p>',
        "<h2 id='stages'>Stages</h2>", _stage_table(outcome),
        "<h2 id='gate'>Champion gate</h2>", _gate(outcome),
        "<h2 id='curves'>Per-epoch curves</h2>",
        (curves if any(s.get("history") for s in outcome["stages"])
         else "<p class='note'>No per-epoch history was recorded.</p>"),
        f"<h2 id='mistakes'>Worst test mistakes of {escape(outcome['stage'])}</h2>",
        _gallery(found["worst"], classes, thumbnail, shown),
        "<h2 id='confused-pairs'>Most confused classes</h2>",
        _pairs(found["pairs"], classes, thumbnail,
               PAIR_EXAMPLES * shown // max(len(found["worst"]), 1)),
        f"<h2 id='per-class'>Per-class test results of {escape(outcome['stage'])}</h2>",
        _per_class(chosen["test"].get("per_class"), classes),
        f"<h2 id='confusion'>Test confusion matrix of {escape(outcome['stage'])}</h2>",
        _matrix(chosen["test"].get("confusion_matrix"), classes),
        "<h2 id='data'>Data</h2>", _data(manifest),
        f"<p class='note'>Self-contained page (at most {max_bytes:,} bytes; thumbnails at "
        f"most {THUMBNAIL_PX} px); the numbers are also in the parent MLflow run's "
        "outcome.json.</p>",
    ]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def _chosen(outcome: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in outcome["stages"] if s["stage"] == outcome["stage"])


def _mistakes(outcome: dict[str, Any]) -> dict[str, Any]:
    """The chosen stage's worst test mistakes (``thaw.evaluation.mistakes``)."""
    return _chosen(outcome).get("test_mistakes") or {"worst": [], "pairs": []}


def _verdict(outcome: dict[str, Any]) -> str:
    alias = ("now holds the alias <b>champion</b>" if outcome["promoted"]
             else "did not take the alias champion")
    return (f"Stage <b>{escape(outcome['stage'])}</b> had the best validation "
            f"{escape(outcome['selection_metric'])} and was registered as "
            f"<b>{escape(outcome['model_name'])}</b> version {escape(str(outcome['version']))}"
            f", which {alias}.<br>{escape(outcome['reason'])}")


def _table(head: list[str], rows: list[list[str]], row_class: list[str] | None = None,
           table_class: str = "") -> str:
    """An HTML table; cells are HTML already (escape text before)."""
    classes = row_class or [""] * len(rows)
    body = "".join(f"<tr class='{c}'>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for c, row in zip(classes, rows, strict=True))
    return (f"<table class='{table_class}'><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head)
            + f"</tr>{body}</table>")


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "–"


def _stage_table(outcome: dict[str, Any]) -> str:
    rows, marks = [], []
    for s in outcome["stages"]:
        chosen = s["stage"] == outcome["stage"]
        note = "chosen" if chosen else ""
        if s.get("diverged"):
            note = f"diverged: {s['diverged']}"
        rows.append([escape(s["stage"]), *(_number(s[split].get(key)) for split in ("val", "test")
                                           for key in ("accuracy", "macro_f1")),
                     str(s["best_epoch"]), f"{s['wall_seconds']:.0f}", escape(note)])
        marks.append("chosen" if chosen else "")
    return _table(["stage", "val accuracy", "val macro-F1", "test accuracy", "test macro-F1",
                   "best epoch", "time (s)", ""], rows, marks)


def _gate(outcome: dict[str, Any]) -> str:
    gate = outcome.get("gate")
    if not gate:
        return "<p class='note'>No champion gate was recorded.</p>"
    keys = ("accuracy", "macro_f1", "loss")
    models = [(f"v{outcome['version']} ({gate['challenger']['stage']}, new)",
               gate["challenger"])]
    if gate.get("champion") and gate["champion"].get("val"):
        models.append((f"v{gate['champion']['version']} (champion)", gate["champion"]))
    rows = [[escape(name), *(_number(scores[split].get(key), 4)
                             for split in ("val", "test") for key in keys)]
            for name, scores in models]
    direction = "higher" if gate["higher_is_better"] else "lower"
    return (f"<p>Both models scored by the same function on this run's data; validation "
            f"{escape(gate['metric'])} decides ({direction} is better, margin "
            f"{gate['margin']:g}). Promoted: <b>{'yes' if outcome['promoted'] else 'no'}</b>."
            "</p>" + _table(["model", *(f"{split} {key}" for split in ("val", "test")
                                         for key in keys)], rows))


def _caption(mistake: dict[str, Any], classes: list[str]) -> str:
    return (f"true <b>{escape(classes[mistake['true']])}</b><br>predicted "
            f"<b>{escape(classes[mistake['predicted']])}</b> ({mistake['confidence']:.0%})<br>"
            f"p(true) {mistake['true_probability']:.0%} · test #{mistake['index']}")


def _figures(found: list[dict[str, Any]], classes: list[str],
             thumbnail: Callable[[int], str]) -> str:
    return "<div class='gallery'>" + "".join(
        f"<figure class='mistake'><img src='{thumbnail(m['index'])}' alt='test image "
        f"{m['index']}'><figcaption>{_caption(m, classes)}</figcaption></figure>"
        for m in found) + "</div>"


def _gallery(worst: list[dict[str, Any]], classes: list[str],
             thumbnail: Callable[[int], str], shown: int) -> str:
    if not worst:
        return "<p class='note'>No test mistakes were recorded.</p>"
    cut = ("" if shown >= len(worst) else
           f" {shown} of {len(worst)} shown to keep the page under its size limit.")
    return (f"<p class='note'>The most confident wrong predictions first.{cut}</p>"
            + _figures(worst[:shown], classes, thumbnail))


def _pairs(pairs: list[dict[str, Any]], classes: list[str], thumbnail: Callable[[int], str],
           examples: int) -> str:
    if not pairs:
        return "<p class='note'>No test mistakes were recorded.</p>"
    return (f"<p class='note'>The {min(len(pairs), CONFUSED_PAIRS)} most frequent (true, "
            "predicted) pairs, with their most confident examples.</p>" + "".join(
                f"<h3>{escape(classes[p['true']])} taken for {escape(classes[p['predicted']])}: "
                f"{p['count']} test image{'s' if p['count'] != 1 else ''}</h3>"
                + _figures(p["examples"][:examples], classes, thumbnail) for p in pairs))


def _per_class(report: dict[str, Any] | None, classes: list[str]) -> str:
    if not report:
        return "<p class='note'>No per-class results were recorded.</p>"
    rows = [[escape(c), *(_number(report[c][k]) for k in ("precision", "recall", "f1-score")),
             str(int(report[c]["support"]))] for c in classes]
    return _table(["class", "precision", "recall", "F1", "test images"], rows)


def _matrix(matrix: list[list[int]] | None, classes: list[str]) -> str:
    if not matrix:
        return "<p class='note'>No confusion matrix was recorded.</p>"
    counts = np.asarray(matrix)
    keep = np.arange(len(classes))
    note = "Rows: true class, columns: predicted class."
    if len(classes) > MATRIX_CLASSES:
        errors = counts.sum(0) + counts.sum(1) - 2 * np.diag(counts)
        keep = np.sort(np.argsort(-errors, kind="stable")[:MATRIX_CLASSES])
        note += (f" The {MATRIX_CLASSES} of {len(classes)} classes with the most mistakes; the "
                 "whole matrix is in each stage run's confusion_matrix.png.")
    shown = counts[np.ix_(keep, keep)]
    top = max(int(shown.max()), 1)

    def cell(i: int, j: int) -> str:
        shade = int(235 - 175 * shown[i, j] / top)
        colour = "#fff" if shade < 140 else "#1d2329"
        return (f"<span style='display:block;background:rgb({shade},{shade + 10},255);"
                f"color:{colour}'>{shown[i, j]}</span>")

    rows = [[escape(classes[k]), *(cell(i, j) for j in range(len(keep)))]
            for i, k in enumerate(keep)]
    return f"<p class='note'>{note}</p>" + _table(
        ["true \\ predicted", *(classes[k] for k in keep)], rows, table_class="matrix")


def _data(manifest: Manifest) -> str:
    splits = list(manifest.counts)
    rows = [[escape(c), *(str(manifest.counts[s].get(c, 0)) for s in splits),
             str(sum(manifest.counts[s].get(c, 0) for s in splits))] for c in manifest.classes]
    rows.append(["<b>all</b>", *(f"<b>{manifest.split_size(s)}</b>" for s in splits),
                 f"<b>{sum(manifest.split_size(s) for s in splits)}</b>"])
    _, height, width = manifest.input_size
    parts = [f"<p>Source <code>{escape(storage.redact(manifest.source))}</code>, fingerprint "
             f"<code>{escape(manifest.fingerprint[:12])}</code>; {len(manifest.classes)} "
             f"classes, images resized to {width}×{height}.</p>",
             _table(["class", *splits, "total"], rows)]
    parts += [f"<p class='note'>Warning: {escape(w)}</p>" for w in manifest.warnings]
    skipped = manifest.skipped
    if not skipped:
        parts.append("<p>No file was skipped.</p>")
        return "".join(parts)
    more = (f" The first {SKIPPED_LISTED} are listed; all are in the prepared dataset's "
            "validation_report.md." if len(skipped) > SKIPPED_LISTED else "")
    parts.append(f"<p>{len(skipped)} file{'s' if len(skipped) != 1 else ''} skipped.{more}</p>")
    parts.append(_table(["file", "why"], [[escape(storage.redact(s["path"])),
                                            escape(s["reason"])]
                                           for s in skipped[:SKIPPED_LISTED]]))
    return "".join(parts)
