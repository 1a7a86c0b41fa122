"""Shared fixtures for the integration tests: one embedded stack per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from thaw.stack import StackInfo, running_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """A running S3 + MLflow stack on free loopback ports; its env is set in os.environ for
    the whole session (and restored afterwards)."""
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
