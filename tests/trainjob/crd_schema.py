"""The TrainJob CRD of each Trainer release (crds/<release>/, see crds/README.md) as the API
server applies it to a create: the structural schema with every object closed (strict field
validation: an undeclared field is an error, k8s.io/apiextensions-apiserver's pruning under
fieldValidation=Strict), list-map keys, and the create-time CEL rules translated to Python."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).parent / "crds"
SUPPORTED = ("v2.2.0", "v2.2.1", "v2.3.0", "main-8c0f505")
TOO_OLD = ("v2.0.1", "v2.1.0")
# The CRDs' CEL rules that bind a create, as Python; transition rules (self == oldSelf) only
# bind updates.
CREATE_RULES = {
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')":
        lambda job: re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]),
    "size(self.metadata.name) <= 63": lambda job: len(job["metadata"]["name"]) <= 63,
    "self >= 1": lambda value: value >= 1,
    "has(self.lastUpdatedTime)": lambda value: "lastUpdatedTime" in value,
    "self == '' || self.matches('^[A-Za-z][A-Za-z0-9+.-]*://.+$')":
        lambda value: value == "" or re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://.+", value),
    "self in ['trainer.kubeflow.org/trainjob-controller', 'kueue.x-k8s.io/multikueue']":
        lambda value: value in ("trainer.kubeflow.org/trainjob-controller",
                                "kueue.x-k8s.io/multikueue"),
}


@cache
def schema(release: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / release / "trainer.kubeflow.org_trainjobs.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(release: str, value: Any) -> list[str]:
    """Paths of the fields the release's schema does not declare (``spec.runtimePatches``), as
    the API server names them; metadata is the API server's own (ObjectMeta), not the CRD's."""
    return _unknown(schema(release), value, "", top=True)


def _unknown(node: dict[str, Any], value: Any, path: str, top: bool = False) -> list[str]:
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, list):
        return [f for item in value for f in _unknown(node.get("items", {}), item, path)]
    if not isinstance(value, dict) or not ("properties" in node or
                                           "additionalProperties" in node):
        return []
    found = []
    for key, item in value.items():
        sub = f"{path}.{key}" if path else key
        if top and key in ("apiVersion", "kind", "metadata", "status"):
            continue
        declared = node.get("properties", {}).get(key) or node.get("additionalProperties")
        if not isinstance(declared, dict):
            found.append(sub)
        else:
            found += _unknown(declared, item, sub)
    return found


def prune(release: str, value: Any) -> Any:
    """``value`` without its unknown fields: what the API server stores under the default
    field validation (Warn/Ignore) - the fields vanish."""
    dropped = set(unknown_fields(release, value))

    def walk(item: Any, path: str) -> Any:
        if isinstance(item, list):
            return [walk(v, path) for v in item]
        if isinstance(item, dict):
            return {k: walk(v, f"{path}.{k}" if path else k) for k, v in item.items()
                    if (f"{path}.{k}" if path else k) not in dropped}
        return item
    return walk(value, "")


def closed(node: Any) -> Any:
    """The schema with every object closed, as strict field validation treats it."""
    if isinstance(node, list):
        return [closed(s) for s in node]
    if not isinstance(node, dict):
        return node
    shut = {k: closed(v) for k, v in node.items()}
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        shut["additionalProperties"] = False
    return shut


def rule_problems(node: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """What JSON Schema does not check: list-map keys unique, and the create-time CEL rules."""
    problems = []
    for rule in node.get("x-kubernetes-validations", []):
        if rule["rule"] == "self == oldSelf":
            continue
        assert rule["rule"] in CREATE_RULES, f"{path}: untranslated CEL rule {rule['rule']}"
        if not CREATE_RULES[rule["rule"]](value):
            problems.append(f"{path}: {rule['message']}")
    if isinstance(value, list):
        if node.get("x-kubernetes-list-type") == "map":
            keys = [tuple(item.get(k) for k in node["x-kubernetes-list-map-keys"])
                    for item in value]
            if len(keys) != len(set(keys)):
                problems.append(f"{path}: duplicate list-map keys {keys}")
        for index, item in enumerate(value):
            problems += rule_problems(node.get("items", {}), item, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            sub = node.get("properties", {}).get(key) or node.get("additionalProperties")
            if isinstance(sub, dict):
                problems += rule_problems(sub, item, f"{path}.{key}")
    return problems


def validate(release: str, job: dict[str, Any]) -> None:
    """Raise (jsonschema.ValidationError or AssertionError) unless ``job`` is a valid TrainJob
    of ``release`` under strict field validation."""
    jsonschema.Draft7Validator(closed(schema(release))).validate(job)
    assert rule_problems(schema(release), job) == []
