"""The container engine and the thaw image for the container tier (`make image` builds it).

Where no engine answers or the image is not built, the tier skips and says why, except under
CI (CI=true), where it fails: CI must run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest

from thawctl.sandbox import PODMAN_RUN_ARGS as PODMAN_RUN_FLAGS

ROOT = Path(__file__).resolve().parents[2]


def skip_or_fail(reason: str) -> None:
    """Skip with ``reason``, or fail where CI must run the container tier."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"container tier: {reason} (CI=true must run it)", pytrace=False)
    pytest.skip(f"container tier skipped: {reason}")


def _answers(engine: str) -> bool:
    return shutil.which(engine) is not None and subprocess.run(
        [engine, "info"], capture_output=True, check=False).returncode == 0


def detect_engine() -> tuple[str | None, str]:
    """(engine, "") as `make image` picks it (CONTAINER_ENGINE, else podman, else docker),
    or (None, why not)."""
    chosen = os.environ.get("CONTAINER_ENGINE") or os.environ.get("THAW_CONTAINER_ENGINE")
    if chosen:
        return (chosen, "") if _answers(chosen) else (None, f"{chosen} does not answer")
    for engine in ("podman", "docker"):
        if _answers(engine):
            return engine, ""
    return None, "no container engine answers (podman or docker; apt-get install podman runc)"


def image_name() -> str:
    """The image `make image` builds (IMAGE, else REGISTRY/thaw:<version> as make says)."""
    if shutil.which("make"):
        out = subprocess.run(["make", "-s", "-C", str(ROOT), "image-name"], capture_output=True,
                             text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return os.environ.get("IMAGE") or f"ghcr.io/thaw-ml/thaw:{version('thaw')}"


@dataclass(frozen=True)
class Image:
    engine: str
    name: str

    def run(self, *command: str, flags: tuple[str, ...] = (), timeout: int = 300,
            check: bool = True) -> subprocess.CompletedProcess:
        """``command`` in a fresh container of the image, with no network (a step needs none
        from the image itself); stdout and stderr as text."""
        argv = [self.engine, "run", "--rm", "--network", "none",
                *(PODMAN_RUN_FLAGS if self.engine == "podman" else ()), *flags, self.name,
                *command]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done

    def inspect(self, template: str) -> str:
        return subprocess.run([self.engine, "image", "inspect", "--format", template,
                               self.name], capture_output=True, text=True,
                              check=True).stdout.strip()


@pytest.fixture(scope="session")
def thaw_image() -> Image:
    """The built thaw image, or a skip (a failure under CI) saying why there is none."""
    engine, why = detect_engine()
    if engine is None:
        skip_or_fail(why)
    name = image_name()
    if subprocess.run([engine, "image", "inspect", name], capture_output=True,
                      check=False).returncode != 0:
        skip_or_fail(f"image {name} is not built (make image)")
    return Image(engine=engine, name=name)
