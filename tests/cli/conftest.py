"""`thaw submit` / `thaw schedule` against the KFP stand-in, through ``thawctl.cli.main``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from kfp_standin import KfpStandin, running

CLEARED = ("KFP_HOST", "KFP_TOKEN", "KFP_NAMESPACE", "KF_PIPELINES_ENDPOINT",
           "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_SA_TOKEN_PATH", "THAW_IMAGE",
           "KUBERNETES_SERVICE_HOST")


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def kfp_env(monkeypatch, tmp_path) -> None:
    """No KFP settings from the developer's environment; kfp's context file kept here; no
    kubeconfig (the kubernetes client reads its default location at import)."""
    import kfp.client.client
    from kubernetes.config import kube_config

    for name in CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kfp.client.client.Client, "_LOCAL_KFP_CONTEXT",
                        str(tmp_path / "kfp-context.json"))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        str(tmp_path / "no-kubeconfig"))


@pytest.fixture
def standin(kfp_env, monkeypatch) -> Iterator[KfpStandin]:
    """A fresh stand-in KFP API (backend MIN_KFP_BACKEND, single-user), KFP_HOST at it."""
    with running() as server:
        monkeypatch.setenv("KFP_HOST", server.url)
        yield server


@pytest.fixture
def thaw(capsys) -> Callable[..., Result]:
    """``thaw(*argv)``: run the CLI in process, return its exit code and output."""
    from thawctl.cli import main

    def run(*argv: str) -> Result:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
