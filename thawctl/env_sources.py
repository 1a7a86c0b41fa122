"""The Secret and ConfigMap keys the compiled steps read, checked in the Kubernetes API before a
run starts.

A step whose pod names a missing Secret, ConfigMap or key does not fail: the kubelet leaves it
Pending with ``CreateContainerConfigError``, which Argo never retries, and the run hangs. The
keys come from the compiled spec's platform section (kfp-kubernetes' ``secretAsEnv`` /
``configMapAsEnv`` of each executor, ``optional`` ones may be absent); the check uses the
kubernetes client with the in-cluster configuration or the kubeconfig, and when neither
reaches the API it says that nothing was checked and goes on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thaw.errors import ThawError

REQUEST_TIMEOUT_S = (5, 10)  # connect, read


@dataclass(frozen=True)
class EnvSource:
    kind: str  # "Secret" or "ConfigMap"
    name: str
    keys: frozenset[str]


def env_sources(platform: dict[str, Any]) -> list[EnvSource]:
    """The non-optional Secrets and ConfigMaps the executors read, with the keys they read."""
    executors = (platform.get("platforms", {}).get("kubernetes", {})
                 .get("deploymentSpec", {}).get("executors", {}))
    keys: dict[tuple[str, str], set[str]] = {}
    for executor in executors.values():
        for kind, field, name_key, key_key in (
                ("Secret", "secretAsEnv", "secretName", "secretKey"),
                ("ConfigMap", "configMapAsEnv", "configMapName", "configMapKey")):
            for source in executor.get(field, []):
                if source.get("optional") or not source.get(name_key):
                    continue
                keys.setdefault((kind, source[name_key]), set()).update(
                    entry[key_key] for entry in source.get("keyToEnv", []))
    return [EnvSource(kind, name, frozenset(found))
            for (kind, name), found in sorted(keys.items())]


def check_env_sources(sources: list[EnvSource], namespace: str,
                      echo: Callable[[str], None]) -> None:
    """Refuse when a source or key is missing in ``namespace``; echo that nothing was checked
    when the Kubernetes API cannot be reached or read."""
    if not sources:
        return
    api = _core_api()
    if isinstance(api, str):
        echo(f"Secret/ConfigMap keys not checked ({api})")
        return
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    for source in sources:
        read = (api.read_namespaced_secret if source.kind == "Secret"
                else api.read_namespaced_config_map)
        try:
            found = read(source.name, namespace, _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as err:
            if err.status == 404:
                raise ThawError(f"{source.kind} {source.name} does not exist in namespace "
                                f"{namespace}: {_stuck}") from err
            echo(f"Secret/ConfigMap keys not checked (the Kubernetes API answered {err.status} "
                 f"{err.reason} for {source.kind} {source.name} in {namespace})")
            return
        except HTTPError as err:
            echo(f"Secret/ConfigMap keys not checked (Kubernetes API unreachable: {err})")
            return
        present = set(found.data or {}) | set(getattr(found, "binary_data", None) or {})
        missing = sorted(source.keys - present)
        if missing:
            raise ThawError(f"{source.kind} {source.name} in namespace {namespace} lacks "
                            f"key(s) {missing}: {_stuck}")
    echo(f"Secret/ConfigMap keys checked in namespace {namespace}: "
         + ", ".join(f"{s.kind} {s.name}" for s in sources))


_stuck = ("every step's pod would stay Pending (CreateContainerConfigError), which Argo "
          "never retries; create it (infra/README.md) or fix the name in the settings")


def _core_api() -> Any:
    """A ``CoreV1Api`` on the in-cluster configuration or the kubeconfig, or why there is
    none."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as err:
        return f"no Kubernetes configuration: {err}"
    return client.CoreV1Api(client.ApiClient(configuration))
