"""docker/base-image.sh names no package mirror: it takes the Debian mirrors from this machine's
apt configuration (one-line and deb822 sources), or from MIRROR / SECURITY_MIRROR, and says so
plainly when it finds none. `--print-mirrors` stops before any engine or root is needed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "base-image.sh"
DEB822 = """\
Types: deb
# a comment inside the stanza
URIs: http://mirror.example.test/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: http://security.example.test/debian-security
Suites: bookworm-security
Components: main
"""


def _print_mirrors(apt_etc: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("MIRROR", "SECURITY_MIRROR")}
    return subprocess.run(["bash", str(SCRIPT), "--print-mirrors"], capture_output=True,
                          text=True, check=False, env={**clean, "APT_ETC": str(apt_etc), **env})


def _apt_etc(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "apt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "apt" / "sources.list.d").mkdir(parents=True, exist_ok=True)
    return tmp_path / "apt"


def _mirrors(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def test_the_script_names_no_mirror_host():
    text = SCRIPT.read_text()
    assert "deb.debian.org" not in text and "http://" not in text


def test_mirrors_come_from_deb822_sources(tmp_path):
    apt = _apt_etc(tmp_path, {"sources.list.d/debian.sources": DEB822})
    assert _mirrors(_print_mirrors(apt)) == {
        "MIRROR": "http://mirror.example.test/debian",
        "SECURITY_MIRROR": "http://security.example.test/debian-security"}


def test_mirrors_come_from_one_line_sources_skipping_comments_options_and_others(tmp_path):
    apt = _apt_etc(tmp_path, {
        "sources.list": "# deb http://commented.example.test/debian bookworm main\n"
                        "deb-src http://src.example.test/debian bookworm main\n"
                        "deb [arch=amd64 signed-by=/k.gpg] http://one.example.test/debian "
                        "bookworm main contrib\n"
                        "deb http://one.example.test/debian-security bookworm-security main\n",
        "sources.list.d/vendor.list": "deb https://vendor.example.test/apt stable main\n",
        "sources.list.d/off.sources": "Types: deb\nURIs: http://off.example.test/debian\n"
                                      "Suites: bookworm\nEnabled: no\n",
    })
    assert _mirrors(_print_mirrors(apt)) == {
        "MIRROR": "http://one.example.test/debian",
        "SECURITY_MIRROR": "http://one.example.test/debian-security"}


def test_environment_wins_over_apt(tmp_path):
    apt = _apt_etc(tmp_path, {"sources.list.d/debian.sources": DEB822})
    result = _print_mirrors(apt, MIRROR="http://given.example.test/debian")
    assert _mirrors(result)["MIRROR"] == "http://given.example.test/debian"


@pytest.mark.parametrize(("files", "missing"), [
    ({}, "MIRROR"),
    ({"sources.list": "deb http://one.example.test/debian bookworm main\n"}, "SECURITY_MIRROR"),
])
def test_no_apt_source_is_a_clear_error(tmp_path, files, missing):
    result = _print_mirrors(_apt_etc(tmp_path, files))
    assert result.returncode == 1 and result.stdout == ""
    assert f"set {missing} to a Debian mirror's URL" in result.stderr
    suite = "bookworm-security" if missing == "SECURITY_MIRROR" else "bookworm "
    assert f"no apt source for suite {suite}" in result.stderr
