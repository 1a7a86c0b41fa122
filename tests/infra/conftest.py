"""Fixtures for tests/infra (helpers live in infra_tree.py)."""

import pytest
from infra_tree import OVERLAYS, render


class _Rendered(dict):
    """overlay name -> its objects, rendered on first use (a broken overlay fails only its own
    tests)."""

    def __missing__(self, overlay: str) -> list[dict]:
        self[overlay] = docs = render(OVERLAYS / overlay)
        return docs


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every overlay's objects as `kubectl apply -k` would send them."""
    return _Rendered()
