"""Shared fixtures: the real sample dataset, prepared once per session at a small size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import thaw  # noqa: E402

SAMPLE_DIR = Path(thaw.__file__).parent / "sample_data" / "fashion-mnist-sample"
TEST_ARCH = "efficientnet_lite0"
TEST_IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory):
    """The committed Fashion-MNIST sample, prepared for EfficientNet-Lite0 at 64 px."""
    from thaw.backbones import data_config
    from thaw.data.prepare import prepare_dataset
    from thaw.data.prepared import open_prepared

    out = tmp_path_factory.mktemp("prepared") / "sample"
    prepare_dataset(str(SAMPLE_DIR), out, data_config=data_config(TEST_ARCH, TEST_IMAGE_SIZE))
    return open_prepared(out)
