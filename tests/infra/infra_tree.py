"""Helpers for tests/infra: the kustomize tree under infra/, rendered with `kubectl kustomize`.

kubectl (with its built-in kustomize) is a system tool, not a Python package: without it the
rendering tests skip locally and fail under CI (CI=true), where a skip would hide a broken tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
BASE = INFRA / "base"
OVERLAYS = INFRA / "overlays"
OVERLAY_NAMES = sorted(p.parent.name for p in OVERLAYS.glob("*/kustomization.yaml"))


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def kubectl_path() -> str:
    """kubectl, or skip (fail when CI=true) saying it is missing."""
    path = shutil.which("kubectl")
    if path:
        return path
    message = ("kubectl not found on PATH: the infra tests render infra/overlays/* with "
               "`kubectl kustomize` (kubectl v1.32 with kustomize v5.5, e.g. from the "
               "google-cloud-cli Debian packages)")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def render(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR`, parsed; a kustomize error fails the test with its message."""
    result = subprocess.run([kubectl_path(), "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return load_docs(result.stdout)


def find(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def container(workload: dict, name: str) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, f"container {name} in {workload['metadata']['name']}"
    return found[0]


def env_of(c: dict) -> dict[str, dict]:
    """name -> the env entry (with `value` or `valueFrom`)."""
    return {e["name"]: e for e in c.get("env", [])}
