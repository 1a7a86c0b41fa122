"""A stand-in for the Kubernetes API on a real loopback HTTP server (pytest-httpserver), for
tests that drive the real kubeflow Trainer SDK (and its kubernetes client, urllib3) against it.

It answers the calls ``thaw.cluster.trainjob`` makes, shaped on the published schemas and
the API server's behaviour:

- ``Status`` bodies on errors, 201 on create, 409 on a taken name, 404 for what does not exist
  (the SDK looks for a namespaced TrainingRuntime before the ClusterTrainingRuntime);
- the TrainJob CRD of Trainer ``release`` (crds/<release>/, from kubeflow/trainer
  manifests/base/crds/ at that tag): a create with ``fieldValidation=Strict`` and a field the
  CRD does not declare is a 400 naming it, as k8s.io/apiserver
  pkg/endpoints/handlers/rest.go ``transformDecodeError`` words it around apimachinery's
  ``strict decoding error: unknown field "<path>"``; without it the field is pruned (gone);
- Trainer's version in ConfigMap kubeflow-system/kubeflow-trainer-public as its
  manifests/overlays/manager/kustomization.yaml generates it (v2.2.0 on; absent before);
- list by label selector; a foreground delete leaves the TrainJob (``deletionTimestamp``,
  ``foregroundDeletion`` finalizer) for one more GET while its dependents go;
- JobSet-style node pods (``<job>-node-0-<index>-<suffix>`` with JobSet's labels), a container
  restarted in place (``restartCount``, ``lastState.terminated``: the Job's pods run with
  restartPolicy OnFailure, jobset pkg/webhooks/jobset_webhook.go) and ``text/plain`` pod logs,
  ``previous=true`` for a restarted container's earlier run;
- a failed TrainJob's condition is JobSet's fixed one, which Trainer copies
  (trainer pkg/runtime/framework/plugins/jobset/jobset.go at v2.3.0; jobset
  pkg/controllers/failure_policy.go and pkg/constants/constants.go at v0.12.0): the cause is
  only in the pods;
- events as the API serves them: the scheduler's FailedScheduling ones (events.k8s.io/v1,
  ``eventTime`` and no ``firstTimestamp``: kubernetes/kubernetes#80219) as ``SCHEDULER_EVENT``.

A TrainJob's ``GET`` walks through ``frames``: each GET shows the next frame (the last one
stays); pods listed after it show that same frame. ``get_outages`` makes the next TrainJob GETs
answer 503; ``fail`` makes a route answer an error instead. ``events`` are Event bodies whose
strings may name the TrainJob as ``{job}``. Every request, and every TrainJob served, is
recorded.
"""

from __future__ import annotations

import base64
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
from tests.trainjob.crd_schema import prune, unknown_fields

NOW = "2026-11-24T10:00:00Z"
TRAINER = "/apis/trainer.kubeflow.org/v1alpha1"
CORE = "/api/v1"
JOBSET_NAME, RJOB_NAME = "jobset.sigs.k8s.io/jobset-name", "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX = "batch.kubernetes.io/job-completion-index"

# ClusterTrainingRuntime torch-distributed as Trainer v2.3.0 installs it
# (manifests/base/runtimes/torch_distributed.yaml).
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
                                    "image": "pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime"}],
                }}},
            },
        }]}},
    },
}


@dataclass
class Frame:
    """What a TrainJob GET shows: the node pods' phase (None: no pods yet), their
    ``containerStatuses[0]`` by node index where it is more than the phase, and, when finished,
    ``(condition type, reason, message)`` with ``{job}`` for the TrainJob's name."""

    pods: str | None
    finished: tuple[str, str, str] | None = None
    containers: dict[int, dict[str, Any]] = field(default_factory=dict)


# jobset pkg/constants/constants.go (v0.12.0): FailedJobsReason and FailedJobsMessage, with the
# first failed Job (failure_policy.go messageWithFirstFailedJob); Complete as JobSet sets it.
JOBSET_FAILED = ("Failed", "FailedJobs", "jobset failed due to one or more job failures "
                 "(first failed job: {job}-node-0)")
JOBSET_COMPLETED = ("Complete", "AllJobsCompleted", "jobset completed successfully")
RUNNING = [Frame("Pending"), Frame("Running")]
COMPLETES = [*RUNNING, Frame("Succeeded", JOBSET_COMPLETED)]


def restarted(reason: str, exit_code: int) -> dict[str, Any]:
    """The node container's status after the kubelet restarted it in place (OnFailure)."""
    return {"restartCount": 1, "state": {"running": {"startedAt": NOW}},
            "lastState": {"terminated": {"reason": reason, "exitCode": exit_code,
                                         "startedAt": NOW, "finishedAt": NOW}}}


# A FailedScheduling event as the scheduler records it (events.k8s.io/v1 through the
# EventRecorder of pkg/scheduler/schedule_one.go), read through core/v1: eventTime, action and
# reportingController, no firstTimestamp/lastTimestamp (kubernetes/kubernetes#80219).
SCHEDULER_EVENT = {
    "apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": "FailedScheduling",
    "action": "Scheduling", "eventTime": "2026-11-24T10:00:01.000000Z",
    "reportingComponent": "default-scheduler", "reportingInstance": "default-scheduler-node1",
    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes "
               "are available: 3 No preemption victims found for incoming pod.",
    "source": {}, "firstTimestamp": None, "lastTimestamp": None,
    "involvedObject": {"kind": "Pod", "name": "{job}-node-0-1-abcde", "apiVersion": "v1"},
    "metadata": {"name": "{job}-node-0-1-abcde.1812f0", "creationTimestamp": NOW},
}


@dataclass
class K8sStandin(LoopbackServer):
    namespace: str = "kubeflow-user-example-com"
    release: str = "v2.3.0"  # the Trainer whose TrainJob CRD and version ConfigMap it serves
    runtimes: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"torch-distributed": TORCH_DISTRIBUTED})
    frames: list[Frame] = field(default_factory=lambda: list(COMPLETES))
    node0_log: str = "rank 0: epoch 1/1 loss 0.42\nrank 0: saved model\n"
    # node index -> its container's log (node-0's is node0_log) and its run before a restart
    node_logs: dict[int, str] = field(default_factory=dict)
    previous_logs: dict[int, str] = field(default_factory=dict)
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
        self._terminating: set[str] = set()  # foreground deletion under way
        self._lock = threading.Lock()
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
            ("GET", "list", re.compile(rf"{TRAINER}/namespaces/{ns}/trainjobs"), self._list),
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
        if self.release in ("v2.0.1", "v2.1.0"):
            return _status(404, 'configmaps "kubeflow-trainer-public" not found')
        version = "dev" if self.release.startswith("main") else self.release
        return _json({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "kubeflow-trainer-public",
                                   "namespace": "kubeflow-system"},
                      "data": {"kubeflow_trainer_version": version}})

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
        unknown = unknown_fields(self.release, body)
        if unknown and request.args.get("fieldValidation") == "Strict":
            fields = ", ".join(f'unknown field "{path}"' for path in unknown)
            return _status(400, f'TrainJob in version "v1alpha1" cannot be handled as a '
                                f"TrainJob: strict decoding error: {fields}")
        job = prune(self.release, json.loads(json.dumps(body)))
        job["metadata"].update(namespace=self.namespace, creationTimestamp=NOW,
                               uid=f"uid-{name}", resourceVersion="1", generation=1)
        self.trainjobs[name] = job
        return _json(job, 201)

    def _list(self, request: Request, body: Any) -> Response:
        wanted = dict(term.split("=", 1) for term in
                      filter(None, request.args.get("labelSelector", "").split(",")))
        items = [job for job in self.trainjobs.values()
                 if wanted.items() <= (job["metadata"].get("labels") or {}).items()]
        return _json({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList",
                      "metadata": {"resourceVersion": "1"}, "items": items})

    def _frame(self, name: str, *, advance: bool) -> Frame:
        """The frame a GET shows (``advance``) or the one it last showed (pods)."""
        shown = self._gets.get(name, 0) - (0 if advance else 1)
        if advance:
            self._gets[name] = shown + 1
        return self.frames[min(max(shown, 0), len(self.frames) - 1)]

    def _get(self, request: Request, body: Any, name: str) -> Response:
        if name not in self.trainjobs:
            return _status(404, f'trainjobs.trainer.kubeflow.org "{name}" not found')
        if self.get_outages > 0:
            self.get_outages -= 1
            return Response("upstream connect error or disconnect/reset before headers",
                            status=503, mimetype="text/plain")
        frame = self._frame(name, advance=True)
        job = dict(self.trainjobs[name])
        if name in self._terminating:  # the one GET that still sees it
            del self.trainjobs[name]
            self._terminating.discard(name)
            job["metadata"] = {**job["metadata"], "deletionTimestamp": NOW,
                               "finalizers": ["foregroundDeletion"]}
        if frame.finished:
            kind, reason, message = frame.finished
            job["status"] = {"conditions": [{"type": kind, "status": "True", "reason": reason,
                                             "message": message.format(job=name),
                                             "lastTransitionTime": NOW}]}
        self.served.append(job)
        return _json(job)

    def _delete(self, request: Request, body: Any, name: str) -> Response:
        if name not in self.trainjobs or name in self._terminating:
            return _status(404, f'trainjobs.trainer.kubeflow.org "{name}" not found')
        if (body or {}).get("propagationPolicy") == "Foreground":
            self._terminating.add(name)
        else:
            del self.trainjobs[name]
        self.deleted.append(name)
        return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                      "details": {"name": name, "group": "trainer.kubeflow.org",
                                  "kind": "trainjobs", "uid": f"uid-{name}"}})

    # -- pods, logs, events --------------------------------------------------------------
    def _pods(self, request: Request, body: Any) -> Response:
        selector = request.args.get("labelSelector", "")
        found = re.match(rf"{re.escape(JOBSET_NAME)}=([a-z0-9-]+)(?:,|$)", selector)
        job = self.trainjobs.get(found.group(1)) if found else None
        items = self._node_pods(job) if job else []
        return _json({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})

    def _node_pods(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        name = job["metadata"]["name"]
        frame = self._frame(name, advance=False)
        if frame.pods is None:
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
            "status": {"phase": frame.pods, "containerStatuses": [{
                "name": "node", "image": trainer["image"], "imageID": "", "ready": True,
                "restartCount": 0, "state": _state(frame.pods),
                **frame.containers.get(index, {})}]} if frame.pods != "Pending" else {
                "phase": "Pending"},
        } for index in range(trainer["numNodes"])]

    def _log(self, request: Request, body: Any, pod: str) -> Response:
        found = re.fullmatch(r".+-node-0-(\d+)-abcde", pod)
        if not found or request.args.get("container") != "node":
            return _status(400, f"container {request.args.get('container')} is not valid for "
                                f"pod {pod}")
        index = int(found[1])
        if request.args.get("previous", "").lower() == "true":
            if index not in self.previous_logs:
                return _status(400, f'previous terminated container "node" in pod "{pod}" '
                                    "not found")
            text = self.previous_logs[index]
        else:
            text = self.node0_log if index == 0 else self.node_logs.get(index, "")
        if request.args.get("tailLines"):
            text = "".join(text.splitlines(keepends=True)[-int(request.args["tailLines"]):])
        return Response(text, mimetype="text/plain")

    def _events(self, request: Request, body: Any) -> Response:
        items = [_named(event, job) for event in self.events for job in self.trainjobs]
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


def _state(phase: str) -> dict[str, Any]:
    """A node container's state in a pod of that phase: in a failed job, a pod that did not
    fail itself was stopped with SIGTERM (exit code 143) when its Job was."""
    if phase == "Running":
        return {"running": {"startedAt": NOW}}
    code = {"Succeeded": 0, "Failed": 143}[phase]
    return {"terminated": {"reason": "Completed" if code == 0 else "Error", "exitCode": code,
                           "startedAt": NOW, "finishedAt": NOW}}


def kubelet_event(kind: str, name: str, reason: str, message: str) -> dict[str, Any]:
    """A core/v1 Event as the kubelet or a controller records it (firstTimestamp set)."""
    return {"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": reason,
            "message": message, "firstTimestamp": NOW, "lastTimestamp": NOW, "count": 1,
            "source": {"component": "kubelet"}, "involvedObject": {"kind": kind, "name": name},
            "metadata": {"name": f"{name}.1812f1", "creationTimestamp": NOW}}


def _named(value: Any, job: str) -> Any:
    """``value`` with ``{job}`` in its strings replaced by the TrainJob's name."""
    if isinstance(value, dict):
        return {k: _named(v, job) for k, v in value.items()}
    return value.replace("{job}", job) if isinstance(value, str) else value


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


_REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 409: "AlreadyExists",
            422: "Invalid", 500: "InternalError", 503: "ServiceUnavailable"}


def _status(code: int, message: str) -> Response:
    """A metav1.Status error body, as the API server writes it."""
    return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": message, "reason": _REASONS.get(code, "Unknown"), "code": code},
                 code)
