"""Fixtures for tests/trainjob: the Kubernetes API stand-in and a real TrainerClient on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from k8s_standin import K8sStandin, running


@pytest.fixture
def standin() -> Iterator[K8sStandin]:
    """A fresh stand-in API with Trainer v2.3's torch-distributed runtime installed."""
    with running() as server:
        yield server


@pytest.fixture
def client(standin: K8sStandin):
    """The kubeflow SDK's TrainerClient, talking HTTP to the stand-in."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient
    from kubernetes.client import Configuration

    return TrainerClient(KubernetesBackendConfig(
        namespace=standin.namespace, client_configuration=Configuration(host=standin.url)))
