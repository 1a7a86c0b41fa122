"""A stand-in for the Kubernetes API on a real loopback HTTP server (pytest-httpserver), for
tests that drive the real kubeflow Trainer SDK (and its kubernetes client, urllib3) against it.

It answers the calls ``thaw.trainjob`` makes, shaped on the published schemas (Kubernetes core/v1,
Trainer v2.3's ``trainer.kubeflow.org/v1alpha1``) and the API server's behaviour: ``Status``
bodies on errors, 201 on create, 409 on a taken name, 404 for what does not exist (the SDK
looks for a namespaced TrainingRuntime before the ClusterTrainingRuntime), JobSet-style node
pods (``<job>-node-0-<index>-<suffix>`` with JobSet's labels), ``text/plain`` pod logs.

A TrainJob's ``GET`` walks through ``frames``: each GET shows the next frame (the last one
stays), a frame being its node pods' phase and, once finished, its status condition, as Trainer
copies it from the JobSet. ``get_outages`` makes the next TrainJob GETs answer 503; ``fail``
makes a route answer an error instead. ``events`` name their object with ``{job}`` for the
TrainJob's name. Every request, and every TrainJob served, is recorded.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.loopback import LoopbackServer, Recorded, serving

NOW = "2026-11-24T10:00:00Z"
TRAINER = "/apis/trainer.kubeflow.org/v1alpha1"
CORE = "/api/v1"
JOBSET_NAME, RJOB_NAME = "jobset.sigs.k8s.io/jobset-name", "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX = "batch.kubernetes.io/job-completion-index"

# ClusterTrainingRuntime torch-distributed as Trainer v2.3 installs it (manifests/base/runtimes).
TORCH_DISTRIBUTED = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1",
    "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "creationTimestamp": NOW,
                 "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {}},
        "template": {"spec": {"replicatedJobs": [{
            "name": "node",
            "template": {
                "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                "spec": {"template": {"spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{"name": "node", "workingDir": "/tmp",
                                    "image": "pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime"}],
                }}},
            },
        }]}},
    },
}


@dataclass
class Frame:
    """What a TrainJob GET shows: the node pods' phase (None: no pods yet) and, when finished,
    ``(condition type, reason, message)``."""

    pods: str | None
    finished: tuple[str, str, str] | None = None


RUNNING = [Frame("Pending"), Frame("Running")]
COMPLETES = [*RUNNING, Frame("Succeeded", ("Complete", "JobSetCompleted", "jobset completed"))]


@dataclass
class K8sStandin(LoopbackServer):
    namespace: str = "kubeflow-user-example-com"
    runtimes: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"torch-distributed": TORCH_DISTRIBUTED})
    frames: list[Frame] = field(default_factory=lambda: list(COMPLETES))
    node0_log: str = "rank 0: epoch 1/1 loss 0.42\nrank 0: saved model\n"
    events: list[dict[str, Any]] = field(default_factory=list)
    get_outages: int = 0
    # route name -> (HTTP status, message): answer that error instead
    fail: dict[str, tuple[int, str]] = field(default_factory=dict)
    # Secrets and ConfigMaps in the namespace: name -> their data's keys and values
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.trainjobs: dict[str, dict[str, Any]] = {}
        self.deleted: list[str] = []
        self.requests: list[Recorded] = []
        self.served: list[dict[str, Any]] = []  # TrainJobs as GET answered them
        self._gets: dict[str, int] = {}
        self._lock = threading.Lock()
        self._suffixes = itertools.count(10000)
        self._server = HTTPServer(host="127.0.0.1", threaded=True)
        ns = re.escape(self.namespace)
        self._routes: list[tuple[str, str, re.Pattern[str], Callable[..., Response]]] = [
            ("GET", "trainer-version", re.compile(
                rf"{CORE}/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public"),
             self._trainer_version),
            ("GET", "trainingruntime", re.compile(
                rf"{TRAINER}/namespaces/{ns}/trainingruntimes/(?P<name>[^/]+)"),
             self._namespaced_runtime),
            ("GET", "clustertrainingruntime", re.compile(
                rf"{TRAINER}/clustertrainingruntimes/(?P<name>[^/]+)"), self._cluster_runtime),
            ("POST", "create", re.compile(rf"{TRAINER}/namespaces/{ns}/trainjobs"), self._create),
            ("GET", "get", re.compile(rf"{TRAINER}/namespaces/{ns}/trainjobs/(?P<name>[^/]+)"),
             self._get),
            ("DELETE", "delete", re.compile(
                rf"{TRAINER}/namespaces/{ns}/trainjobs/(?P<name>[^/]+)"), self._delete),
            ("GET", "pods", re.compile(rf"{CORE}/namespaces/{ns}/pods"), self._pods),
            ("GET", "log", re.compile(rf"{CORE}/namespaces/{ns}/pods/(?P<pod>[^/]+)/log"),
             self._log),
            ("GET", "events", re.compile(rf"{CORE}/namespaces/{ns}/events"), self._events),
            ("GET", "data", re.compile(
                rf"{CORE}/namespaces/{ns}/(?P<kind>secrets|configmaps)/(?P<name>[^/]+)"),
             self._data_object),
        ]

    # -- the server -------------------------------------------------------------------
    def calls(self, method: str, path_pattern: str) -> list[Recorded]:
        pattern = re.compile(path_pattern)
        return [r for r in self.requests if r.method == method and pattern.fullmatch(r.path)]

    @property
    def posted(self) -> dict[str, Any]:
        """The one TrainJob body that was POSTed."""
        (created,) = self.calls("POST", rf"{TRAINER}/namespaces/.+/trainjobs")
        return created.body

    def _handle(self, request: Request) -> Response:
        body = request.get_json(silent=True) if request.data else None
        with self._lock:
            self.requests.append(Recorded(request.method, request.path, dict(request.args), body))
            for method, route, pattern, handler in self._routes:
                match = pattern.fullmatch(request.path)
                if method == request.method and match:
                    if route in self.fail:
                        return _status(*self.fail[route])
                    return handler(request, body, **match.groupdict())
        return _status(404, f"the server could not find the requested resource ({request.path})")

    # -- trainer control plane and runtimes ---------------------------------------------
    def _trainer_version(self, request: Request, body: Any) -> Response:
        return _json({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "kubeflow-trainer-public",
                                   "namespace": "kubeflow-system"},
                      "data": {"kubeflow_trainer_version": "v2.3.0"}})

    def _namespaced_runtime(self, request: Request, body: Any, name: str) -> Response:
        return _status(404, f'trainingruntimes.trainer.kubeflow.org "{name}" not found')

    def _cluster_runtime(self, request: Request, body: Any, name: str) -> Response:
        if name not in self.runtimes:
            return _status(404, f'clustertrainingruntimes.trainer.kubeflow.org "{name}" not found')
        return _json(self.runtimes[name])

    # -- trainjobs ----------------------------------------------------------------------
    def _create(self, request: Request, body: Any) -> Response:
        name = body["metadata"]["name"]
        if name in self.trainjobs:
            return _status(409, f'trainjobs.trainer.kubeflow.org "{name}" already exists')
        job = json.loads(json.dumps(body))
        job["metadata"].update(namespace=self.namespace, creationTimestamp=NOW,
                               uid=f"uid-{name}", resourceVersion="1", generation=1)
        self.trainjobs[name] = job
        return _json(job, 201)

    def _frame(self, name: str, *, advance: bool) -> Frame:
        seen = self._gets.get(name, 0)
        if advance:
            self._gets[name] = seen + 1
        return self.frames[min(seen, len(self.frames) - 1)]

    def _get(self, request: Request, body: Any, name: str) -> Response:
        if name not in self.trainjobs:
            return _status(404, f'trainjobs.trainer.kubeflow.org "{name}" not found')
        if self.get_outages > 0:
            self.get_outages -= 1
            return Response("upstream connect error or disconnect/reset before headers",
                            status=503, mimetype="text/plain")
        frame = self._frame(name, advance=True)
        job = dict(self.trainjobs[name])
        if frame.finished:
            kind, reason, message = frame.finished
            job["status"] = {"conditions": [{"type": kind, "status": "True", "reason": reason,
                                             "message": message, "lastTransitionTime": NOW}]}
        self.served.append(job)
        return _json(job)

    def _delete(self, request: Request, body: Any, name: str) -> Response:
        if self.trainjobs.pop(name, None) is None:
            return _status(404, f'trainjobs.trainer.kubeflow.org "{name}" not found')
        self.deleted.append(name)
        return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                      "details": {"name": name, "group": "trainer.kubeflow.org",
                                  "kind": "trainjobs", "uid": f"uid-{name}"}})

    # -- pods, logs, events --------------------------------------------------------------
    def _pods(self, request: Request, body: Any) -> Response:
        selector = request.args.get("labelSelector", "")
        found = re.match(rf"{re.escape(JOBSET_NAME)}=([a-z0-9-]+),", selector)
        job = self.trainjobs.get(found.group(1)) if found else None
        items = self._node_pods(job) if job else []
        return _json({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})

    def _node_pods(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        name = job["metadata"]["name"]
        phase = self._frame(name, advance=False).pods
        if phase is None:
            return []
        trainer = job["spec"]["trainer"]
        resources = trainer.get("resourcesPerNode", {})
        return [{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{name}-node-0-{index}-abcde", "namespace": self.namespace,
                         "creationTimestamp": NOW,
                         "labels": {JOBSET_NAME: name, RJOB_NAME: "node",
                                    JOB_INDEX: str(index)}},
            "spec": {"containers": [{
                "name": "node", "image": trainer["image"], "command": trainer["command"],
                "resources": resources,
                "env": [{"name": "PET_NPROC_PER_NODE", "value": str(trainer["numProcPerNode"])}],
            }]},
            "status": {"phase": phase},
        } for index in range(trainer["numNodes"])]

    def _log(self, request: Request, body: Any, pod: str) -> Response:
        if not re.fullmatch(r".+-node-0-0-abcde", pod) or request.args.get("container") != "node":
            return _status(400, f"container {request.args.get('container')} is not valid for "
                                f"pod {pod}")
        return Response(self.node0_log, mimetype="text/plain")

    def _events(self, request: Request, body: Any) -> Response:
        items = [{"apiVersion": "v1", "kind": "Event",
                  "metadata": {"name": f"event-{next(self._suffixes)}",
                               "namespace": self.namespace},
                  "involvedObject": {"kind": e["kind"], "name": e["name"].format(job=job),
                                     "namespace": self.namespace},
                  "reason": e["reason"], "message": e["message"], "type": "Warning",
                  "firstTimestamp": NOW, "lastTimestamp": NOW, "count": 1}
                 for e in self.events for job in self.trainjobs]
        return _json({"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": items})

    def _data_object(self, request: Request, body: Any, kind: str, name: str) -> Response:
        """A Secret (values base64, as the API server gives them) or a ConfigMap."""
        store = self.secrets if kind == "secrets" else self.config_maps
        if name not in store:
            return _status(404, f'{kind} "{name}" not found')
        data = {key: base64.b64encode(value.encode()).decode() if kind == "secrets" else value
                for key, value in store[name].items()}
        return _json({"apiVersion": "v1", "kind": "Secret" if kind == "secrets" else "ConfigMap",
                      "metadata": {"name": name, "namespace": self.namespace,
                                   "creationTimestamp": NOW}, "data": data})


def running(**kwargs: Any) -> AbstractContextManager[K8sStandin]:
    return serving(K8sStandin(**kwargs))


def write_kubeconfig(path, standin: K8sStandin) -> None:
    """A kubeconfig whose current context is the stand-in, in its namespace."""
    import yaml

    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "profile",
        "clusters": [{"name": "standin", "cluster": {"server": standin.url}}],
        "users": [{"name": "launcher", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "profile", "context": {
            "cluster": "standin", "user": "launcher", "namespace": standin.namespace}}]}))


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


_REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 409: "AlreadyExists",
            422: "Invalid", 500: "InternalError", 503: "ServiceUnavailable"}


def _status(code: int, message: str) -> Response:
    """A metav1.Status error body, as the API server writes it."""
    return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": message, "reason": _REASONS.get(code, "Unknown"), "code": code},
                 code)
