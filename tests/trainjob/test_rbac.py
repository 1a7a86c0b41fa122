"""infra/base/trainer-rbac.yaml allows every Kubernetes API call the launcher makes: the calls are
those the real SDK sent to the stand-in while thaw.trainjob ran a job to success and another to
failure, each mapped to its RBAC verb and resource as the API server's authorizer does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_standin import RUNNING, Frame, Recorded

from thaw.errors import ThawError
from thaw.trainjob import TrainJobRequest, run_trainjob

RBAC = Path(__file__).resolve().parents[2] / "infra" / "base" / "trainer-rbac.yaml"
LAUNCHER_ACCOUNT = "default-editor"
# Read by the SDK on connection only to log Trainer's version; refused, it logs a warning.
OPTIONAL = {("", "configmaps", "get")}
PATH = re.compile(r"/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/[^/]+)"
                  r"(?:/namespaces/(?P<namespace>[^/]+))?/(?P<resource>[^/]+)"
                  r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?")
VERBS = {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}


def _attributes(call: Recorded) -> tuple[str, str, str, bool]:
    """(API group, resource[/subresource], verb, namespaced) of a request, as RBAC sees it."""
    match = PATH.fullmatch(call.path)
    assert match, call.path
    resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
    if call.method == "GET":
        verb = "get" if match["name"] else ("watch" if call.query.get("watch") else "list")
    else:
        verb = VERBS[call.method]
    return match["group"] or "", resource, verb, match["namespace"] is not None


def _granted(docs: list[dict[str, Any]], role_kind: str, binding_kind: str,
             subject_matches) -> set[tuple[str, str, str]]:
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == role_kind}
    granted = set()
    for binding in (d for d in docs if d["kind"] == binding_kind):
        if binding["roleRef"]["kind"] != role_kind or not any(
                subject_matches(s) for s in binding["subjects"]):
            continue
        for rule in roles[binding["roleRef"]["name"]]["rules"]:
            granted |= {(group, resource, verb) for group in rule["apiGroups"]
                        for resource in rule["resources"] for verb in rule["verbs"]}
    return granted


def _run_jobs(client, standin) -> None:
    request = TrainJobRequest(image="registry.example/thaw:0.1.0",
                              command=["torchrun", "-m", "thaw.stage_job"], num_nodes=2,
                              gpus_per_node=1)
    fast = {"start_timeout_s": 5.0, "timeout_s": 10.0, "poll_s": 0.05, "log": lambda line: None}
    run_trainjob(request, client=client, **fast)
    standin.frames = [*RUNNING, Frame("Failed", ("Failed", "FailedJobs", "node-1 failed"))]
    standin.events = [{"kind": "Pod", "name": "{job}-node-0-1-abcde", "reason": "BackOff",
                       "message": "Back-off restarting failed container node"}]
    with pytest.raises(ThawError):
        run_trainjob(request, client=client, **fast)


def test_the_rbac_allows_every_call_the_launcher_makes(client, standin):
    _run_jobs(client, standin)
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    in_namespace = _granted(docs, "Role", "RoleBinding", lambda s: (
        s["kind"], s["name"], s.get("namespace")) == ("ServiceAccount", LAUNCHER_ACCOUNT, None))
    # a ClusterRoleBinding to this group covers every service account, the launcher's included
    cluster_wide = _granted(docs, "ClusterRole", "ClusterRoleBinding", lambda s: (
        s["kind"], s["name"]) == ("Group", "system:serviceaccounts"))

    calls = {_attributes(call) for call in standin.requests}
    assert {(g, r) for g, r, _, _ in calls} >= {
        ("trainer.kubeflow.org", "trainjobs"), ("trainer.kubeflow.org", "clustertrainingruntimes"),
        ("", "pods/log"), ("", "events")}, "the runs did not exercise the launcher's calls"
    refused = [(group, resource, verb) for group, resource, verb, namespaced in sorted(calls)
               if (group, resource, verb) not in OPTIONAL
               and (group, resource, verb) not in (in_namespace if namespaced else cluster_wide)]
    assert refused == []


def test_cluster_scoped_runtimes_are_granted_by_a_cluster_role_binding_only():
    """A RoleBinding to a ClusterRole would not reach a cluster-scoped object."""
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    for doc in docs:
        rules = doc.get("rules", [])
        if any("clustertrainingruntimes" in rule["resources"] for rule in rules):
            assert doc["kind"] == "ClusterRole"
            bindings = [d for d in docs if d.get("roleRef", {}).get("name")
                        == doc["metadata"]["name"]]
            assert bindings and {b["kind"] for b in bindings} == {"ClusterRoleBinding"}
