"""Fixtures for the data tests: tiny image folders made with PIL, and a real S3 server (moto)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA_CONFIG = {"input_size": (3, 16, 16), "mean": [0.5] * 3, "std": [0.5] * 3,
               "interpolation": "bicubic"}  # fmt: skip

_unique = itertools.count()


def write_image(path: Path, size: tuple[int, int] = (12, 10)) -> Path:
    """A PNG of random pixels that no other call produces."""
    rng = np.random.default_rng(next(_unique))
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def write_png() -> Callable[..., Path]:
    return write_image


@pytest.fixture
def data_config() -> dict:
    return dict(DATA_CONFIG)


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    """`make_folder({"cat": 5, "train/dog": 3}, name="src")` writes distinct PNGs."""

    def make(layout: dict[str, int], name: str = "src") -> Path:
        root = tmp_path / name
        for folder, count in layout.items():
            for i in range(count):
                write_image(root / folder / f"img{i:03d}.png")
        return root

    return make


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._server.server_port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty bucket on the moto server, with the AWS env pointing at it."""
    from thaw.storage import ensure_bucket

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    uri = f"s3://bucket-{next(_unique)}"
    ensure_bucket(uri)
    return uri
