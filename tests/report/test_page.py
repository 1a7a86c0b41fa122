"""The run report's page on a small synthetic outcome (tests/report/synthetic.py): every
section holds the numbers it shows, text is escaped, nothing is loaded from elsewhere, and the
size limit holds."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pytest

from tests.report import synthetic
from thaw.errors import ThawError
from thaw.evaluation import mistakes
from thaw.report import CSP, MAX_REPORT_BYTES, render_run_report


class Page(HTMLParser):
    """Sections (by heading id) with their text, and every tag with its attributes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.sections: dict[str, str] = {}
        self._section = "head"
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "h2":
            self._section = dict(attrs)["id"] or ""

    def handle_data(self, data: str) -> None:
        self.sections[self._section] = self.sections.get(self._section, "") + data + " "

    def text(self, section: str) -> str:
        """The section's text, white space collapsed."""
        return " ".join(self.sections[section].split())

    def count(self, tag: str, **wanted: str) -> int:
        return sum(1 for t, attrs in self.tags
                   if t == tag and all(attrs.get(k) == v for k, v in wanted.items()))


@pytest.fixture(scope="module")
def outcome() -> dict:
    return synthetic.outcome()


@pytest.fixture(scope="module")
def page(outcome) -> str:
    return render_run_report(outcome, synthetic.manifest(), synthetic.test_image)


@pytest.fixture(scope="module")
def parsed(page) -> Page:
    return Page(page)


def test_mistakes_are_the_most_confident_wrong_predictions_and_the_most_confused_pairs():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.0, 1.0, 0.0],
                      [0.5, 0.1, 0.4], [0.2, 0.2, 0.6], [0.4, 0.0, 0.6]])
    found = mistakes(y_true, probs, np.array([10, 11, 12, 13, 14, 15, 16]), worst=2, per_pair=1)
    assert [(m["index"], m["true"], m["predicted"]) for m in found["worst"]] == \
        [(11, 0, 1), (12, 1, 2)]
    assert found["worst"][0]["confidence"] == pytest.approx(0.7)
    assert found["worst"][0]["true_probability"] == pytest.approx(0.2)
    assert [(p["true"], p["predicted"], p["count"]) for p in found["pairs"]] == \
        [(0, 1, 1), (1, 2, 1), (2, 0, 1)]
    assert [[m["index"] for m in p["examples"]] for p in found["pairs"]] == [[11], [12], [14]]


def test_the_verdict_and_the_stage_table_come_first(parsed, outcome):
    assert parsed.text("head").count("full") >= 2 and "version 2" in parsed.text("head")
    assert "beats champion v1 by 0.1278" in parsed.text("head")
    table = parsed.text("stages")
    for stage in outcome["stages"]:
        assert f"{stage['test']['macro_f1']:.3f}" in table
        assert f"{stage['wall_seconds']:.0f}" in table
    assert parsed.count("tr", **{"class": "chosen"}) == 1


def test_the_gate_shows_both_models_numbers(parsed):
    gate = parsed.text("gate")
    assert "v2 (full, new)" in gate and "v1 (champion)" in gate
    for number in ("0.7512", "0.7421", "0.6234", "0.6123"):
        assert number in gate
    assert "Promoted: yes" in gate


def test_the_curves_cover_every_stage_with_its_boundaries(page):
    svg = page[page.index("<svg"):page.index("</svg>")]
    for stage in ("probe", "partial", "full"):
        assert f">{stage}<" in svg
    assert "registered: full, epoch 4" in svg


def test_the_gallery_shows_the_worst_mistakes_with_classes_and_confidence(parsed, outcome):
    worst = outcome["stages"][2]["test_mistakes"]["worst"]
    assert parsed.text("mistakes").count("predicted") == len(worst) > 3
    first = worst[0]
    caption = (f"true {synthetic.CLASSES[first['true']]} predicted "
               f"{synthetic.CLASSES[first['predicted']]} ({first['confidence']:.0%})")
    assert caption in parsed.text("mistakes")
    images = [a["src"] for t, a in parsed.tags if t == "img"]
    pairs = outcome["stages"][2]["test_mistakes"]["pairs"]
    assert len(images) == len(worst) + sum(len(p["examples"]) for p in pairs)
    assert all(src.startswith("data:image/jpeg;base64,") for src in images)


def test_the_confused_pairs_count_what_the_confusion_matrix_counts(parsed, outcome):
    matrix = outcome["stages"][2]["test"]["confusion_matrix"]
    text = parsed.text("confused-pairs")
    for pair in outcome["stages"][2]["test_mistakes"]["pairs"]:
        assert pair["count"] == matrix[pair["true"]][pair["predicted"]]
        assert (f"{synthetic.CLASSES[pair['true']]} taken for "
                f"{synthetic.CLASSES[pair['predicted']]}: {pair['count']}") in text


def test_per_class_results_and_confusion_matrix_are_the_chosen_stages(parsed, outcome):
    test = outcome["stages"][2]["test"]
    per_class = parsed.text("per-class")
    for name in synthetic.CLASSES:
        assert f"{test['per_class'][name]['f1-score']:.3f}" in per_class
    for row in test["confusion_matrix"]:
        assert " ".join(map(str, row)) in parsed.text("confusion")


def test_the_data_section_counts_every_split_and_says_what_was_skipped(parsed):
    data = parsed.text("data")
    assert "s3://bucket/fashion" in data and "ffffffffffff" in data
    assert "Shirt/broken.jpg not an image" in data and "Trouser/tiny.png 2x2 pixels" in data
    assert "2 files skipped" in data and "class Shirt has few validation images" in data
    assert "all 126 20 40 186" in data  # train, val, test, total


def test_text_from_the_data_is_escaped(page, parsed):
    assert "<script>" not in page
    assert parsed.count("script") == 0
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_nothing_is_loaded_from_elsewhere(page, parsed):
    [csp] = [a["content"] for t, a in parsed.tags
             if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp == CSP and "default-src 'none'" in csp and "script-src" not in csp
    for tag, attrs in parsed.tags:
        for name in ("src", "href", "xlink:href", "srcset", "action", "poster", "data"):
            value = attrs.get(name)
            assert value is None or value.startswith(("data:", "#")), (tag, name, value)
    assert not re.search(r"url\((?!#)", page), "CSS url() other than a fragment"
    assert not re.search(r"@import", page)


def test_the_page_is_small(page):
    assert len(page.encode()) < MAX_REPORT_BYTES / 4


def test_over_the_size_limit_the_gallery_shrinks_until_it_fits(page, outcome):
    limit = len(page.encode()) - 20_000
    smaller = render_run_report(outcome, synthetic.manifest(), synthetic.test_image,
                                max_bytes=limit)
    assert len(smaller.encode()) <= limit
    worst = outcome["stages"][2]["test_mistakes"]["worst"]
    assert Page(smaller).text("mistakes").count("predicted") < len(worst)
    assert "shown to keep the page under its size limit" in smaller
    with pytest.raises(ThawError, match="without its gallery, over its limit of 1,000"):
        render_run_report(outcome, synthetic.manifest(), synthetic.test_image, max_bytes=1000)


def test_thumbnails_are_scaled_down(parsed):
    import base64
    import io

    from PIL import Image

    src = next(a["src"] for t, a in parsed.tags if t == "img")
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
        assert image.format == "JPEG" and image.size == (96, 96)  # from 128 px
