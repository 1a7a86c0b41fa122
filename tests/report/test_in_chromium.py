"""The run report opened in headless Chromium (Debian's ``chromium``, installed by .ci/run):
it renders its gallery and curves, and it asks the network for nothing.

Requests are read from Chromium's NetLog (``--log-net-log``; checked with Chromium
156.0.8078.129 of Debian bookworm): a ``URL_REQUEST_START_JOB`` event per request, whose
``network_isolation_key`` names the top frame's site, ``file://`` for the page, so the
browser's own background requests (update checks, ...) are told apart. A control page with an
external image shows that such a request is seen; the same image put into the report shows
that its Content-Security-Policy stops it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.report import synthetic
from thaw.report import render_run_report

pytestmark = pytest.mark.slow

EXTERNAL = "http://127.0.0.1:9/tracker.png"  # the discard port: nothing needs to answer
# After load: how many gallery images decoded, how wide the curves are (a script the report
# itself forbids, so the probe's copy allows inline scripts).
PROBE = """<script>window.addEventListener('load', () => {
  const images = [...document.querySelectorAll('figure.mistake img')];
  const curves = document.querySelector('#curves + svg');
  document.body.dataset.images = images.length;
  document.body.dataset.decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.curvesWidth = curves ? Math.round(curves.getBoundingClientRect().width)
                                             : 0;
  document.body.dataset.curveLines = curves ? curves.querySelectorAll('path').length : 0;
});</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        message = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run this test", pytrace=False)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def report() -> str:
    return render_run_report(synthetic.outcome(), synthetic.manifest(), synthetic.test_image)


def _open(chromium: str, page: str, folder: Path, name: str, *flags: str) -> str:
    """Load ``page`` from a file in a fresh profile; its DOM after the load event."""
    path = folder / f"{name}.html"
    path.write_text(page, encoding="utf-8")
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", f"--user-data-dir={folder / (name + '-profile')}",
         "--window-size=1200,2000", *flags, "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def _page_requests(chromium: str, page: str, folder: Path, name: str) -> list[str]:
    """The URLs Chromium requested on behalf of ``page``."""
    log = folder / f"{name}-netlog.json"
    _open(chromium, page, folder, name, f"--log-net-log={log}")
    netlog = json.loads(log.read_text())
    start_job = netlog["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [event["params"]["url"] for event in netlog["events"]
            if event["type"] == start_job
            and event.get("params", {}).get("network_isolation_key", "").startswith("file://")]


def test_it_renders_the_gallery_and_the_curves(chromium, report, tmp_path) -> None:
    outcome = synthetic.outcome()
    found = outcome["stages"][2]["test_mistakes"]
    expected = len(found["worst"]) + sum(len(p["examples"]) for p in found["pairs"])
    probe = report.replace("default-src 'none';", "default-src 'none'; script-src "
                           "'unsafe-inline';").replace("</body>", PROBE + "</body>")
    dom = _open(chromium, probe, tmp_path, "probe")
    body = dict(re.findall(r'data-([a-z-]+)="(\d+)"', re.search(r"<body[^>]*>", dom).group()))
    assert int(body["images"]) == expected > 10
    assert body["decoded"] == body["images"], "a thumbnail did not decode"
    assert int(body["curves-width"]) > 600
    assert int(body["curve-lines"]) > 20


def test_it_requests_nothing(chromium, report, tmp_path) -> None:
    external = f'<img src="{EXTERNAL}" alt="">'
    control = f"<!DOCTYPE html><html><body>{external}</body></html>"
    assert _page_requests(chromium, control, tmp_path, "control") == [EXTERNAL], \
        "the check cannot see a page's requests"
    assert _page_requests(chromium, report, tmp_path, "report") == []
    injected = report.replace("</body>", external + "</body>")
    assert _page_requests(chromium, injected, tmp_path, "injected") == [], \
        "the Content-Security-Policy let an external image through"
