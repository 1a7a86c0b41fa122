"""infra/base/trainer-rbac.yaml allows every Kubernetes API call the launcher makes: the calls
are those the real SDK sent to the stand-in while thaw.cluster.trainjob ran a job to success
(left behind, as by a killed launcher), a retry that deleted it, and a job to failure, each
mapped to its RBAC verb and resource as the API server's authorizer does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_standin import JOBSET_FAILED, RUNNING, Frame, Recorded, kubelet_event

from thaw.cluster.trainjob import TrainJobRequest, run_trainjob
from thaw.errors import ThawError

RBAC = Path(__file__).resolve().parents[2] / "infra" / "base" / "trainer-rbac.yaml"
LAUNCHER_ACCOUNT = "default-editor"
# Trainer's version, read by the SDK on connection and by the launcher (it refuses Trainer
# < 2.2): ConfigMap kubeflow-system/kubeflow-trainer-public, which Trainer >= 2.2 lets every
# authenticated user read with its own Role and RoleBinding in its namespace (kubeflow/trainer
# manifests/base/rbac/public_configmap_role.yaml and public_configmap_role_binding.yaml at
# v2.3.0: group system:authenticated, resourceNames [kubeflow-trainer-public], get/list/watch).
TRAINER_PUBLIC = ("kubeflow-system", "kubeflow-trainer-public")
TRAINER_GRANTS = {("", "configmaps", "get"), ("", "configmaps", "list"),
                  ("", "configmaps", "watch")}
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
                              gpus_per_node=1, pipeline_run_id="run-1", stage="full")
    fast = {"start_timeout_s": 5.0, "timeout_s": 10.0, "poll_s": 0.05, "log": lambda line: None}
    standin.fail["delete"] = (503, "etcdserver: request timed out")
    run_trainjob(request, client=client, **fast)  # left behind: the next one lists and deletes
    del standin.fail["delete"]
    standin.frames = [*RUNNING, Frame("Failed", JOBSET_FAILED)]
    standin.events = [kubelet_event("Pod", "{job}-node-0-1-abcde", "BackOff",
                                    "Back-off restarting failed container node")]
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

    trainer_public = [call for call in standin.requests
                      if call.path.endswith("/namespaces/{}/configmaps/{}".format(*TRAINER_PUBLIC))]
    calls = {_attributes(call) for call in standin.requests if call not in trainer_public}
    assert {(g, r, v) for g, r, v, _ in calls} >= {
        ("trainer.kubeflow.org", "trainjobs", verb) for verb in ("create", "get", "list",
                                                                 "delete")} | {
        ("trainer.kubeflow.org", "clustertrainingruntimes", "get"), ("", "pods/log", "get"),
        ("", "pods", "list"), ("", "events", "list")}, "the runs missed some launcher calls"
    refused = [(group, resource, verb) for group, resource, verb, namespaced in sorted(calls)
               if (group, resource, verb) not in (in_namespace if namespaced else cluster_wide)]
    assert refused == []
    assert trainer_public, "the launcher did not read Trainer's version"
    assert {_attributes(call)[:3] for call in trainer_public} <= TRAINER_GRANTS


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
