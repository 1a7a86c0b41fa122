"""`thaw submit` / `thaw schedule` against the KFP stand-in, through ``thawctl.cli.main``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from kfp_standin import KfpStandin, running

from pipelines.settings import ClusterSettings
from thawctl.compiled import CompiledPipeline

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


# One compile per cluster settings and pipeline defaults for the whole test process; see
# the ``thaw`` fixture.
_COMPILED: dict[tuple[str, str], CompiledPipeline] = {}


@pytest.fixture
def thaw(capsys, monkeypatch) -> Callable[..., Result]:
    """``thaw(*argv)``: run the CLI in process, return its exit code and output.

    The commands compile the pipeline before anything else, and in a process that has torch
    loaded a compile takes seconds (kfp 2.x calls ``inspect.stack()`` for every task setting,
    ``PipelineTask._ensure_container_spec_exists``, and each frame's module is looked up
    among thousands). The same settings compile to the same text, so the CLI tests share one
    compile per (settings, pipeline defaults); a test that changes either gets its own.
    ``tests/pipeline`` tests the compiler itself, uncached."""
    import pipelines.thaw_pipeline as pipeline
    import thawctl.compiled
    import thawctl.kfp_cli
    from thawctl.cli import main

    compile_once = thawctl.compiled.compile_spec

    def compile_spec(settings: ClusterSettings) -> CompiledPipeline:
        key = (repr(settings), repr(pipeline.D))
        if key not in _COMPILED:
            _COMPILED[key] = compile_once(settings)
        return _COMPILED[key]

    monkeypatch.setattr(thawctl.compiled, "compile_spec", compile_spec)
    monkeypatch.setattr(thawctl.kfp_cli, "compile_spec", compile_spec)

    def run(*argv: str) -> Result:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
