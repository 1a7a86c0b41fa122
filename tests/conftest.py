"""Shared fixtures: the real sample dataset prepared once at a small size, and one embedded
S3 + MLflow stack per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator:
    """A running S3 + MLflow stack on free loopback ports; its env is set in os.environ for
    the whole session (and restored afterwards)."""
    from thaw.stack import running_stack

    with running_stack(tmp_path_factory.mktemp("stack")) as info:
        saved = {key: os.environ.get(key) for key in info.env()}
        os.environ.update(info.env())
        try:
            yield info
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# The kinds of test files run first, slowest kind first: `make test` hands whole files to
# its worker processes in this order (pytest-xdist --dist loadfile --no-loadscope-reorder),
# so a file of a few long tests does not start last and keep one process busy alone.
SLOW_FIRST = ("e2e", "fidelity", "container", "slow")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def file_of(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    rank: dict[str, int] = {}
    for item in items:
        kind = next((i for i, marker in enumerate(SLOW_FIRST) if item.get_closest_marker(marker)),
                    len(SLOW_FIRST))
        rank[file_of(item)] = min(rank.get(file_of(item), kind), kind)
    items.sort(key=lambda item: rank[file_of(item)])  # stable: files stay whole, in order
