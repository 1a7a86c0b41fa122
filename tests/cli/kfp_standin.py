"""A stand-in for the Kubeflow Pipelines v2beta1 REST API on a real loopback HTTP server
(pytest-httpserver), for tests that drive the real ``kfp.Client`` (urllib3) against it.

Shaped on kubeflow/pipelines ``backend/api/v2beta1/swagger/*.swagger.json`` and the API
server's behaviour: JSON with proto field names and no unpopulated fields
(``backend/src/apiserver/common/utils.go`` CustomMarshaler), multipart
``pipelines/upload_version`` with 409 on a duplicate version name, list ``filter`` (JSON
predicates, ``EQUALS`` on ``display_name``), ``:enable`` / ``:disable``, and recurring runs
NOT unique by name (``backend/src/apiserver/model/job.go``: no unique index on DisplayName;
``template/v2_template.go``: the ScheduledWorkflow takes a ``GenerateName``; 2.5.0-2.17.0).
It keeps state (pipelines, versions, experiments, runs, recurring runs) and records every
request, so tests check what arrived and how often.

healthz answers as one of the two hosts a user may name (``via_ui``): the API server
(``backend/src/apiserver/main.go`` at 2.5.0-2.17.0: ``commit_sha``, ``tag_name`` — the
image's TAG_NAME, ``"unknown"`` in the official images before 2.16.0 — ``multi_user``, and from
2.14.0 ``pipeline_store``), or the UI server behind the Kubeflow gateway's ``/pipeline``
(``frontend/server/handlers/healthz.ts`` at 2.14.0-2.17.0: the API server's answer renamed,
``apiServer*`` keys, or only the UI's build keys when the API server did not answer).

A run's ``GET`` walks through ``run_frames``: each GET shows the next frame (the last one
stays), a frame being the run's state and, per KFP task name, the Argo phase of its pods; the
stand-in turns it into ``run_details.task_details`` the way the API server does (``_argo_nodes``
and ``_task_details``). ``run_get_outages`` makes the next GETs answer 503 first, as an
ingress gateway may.
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import yaml
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from pipelines.thaw_pipeline import MIN_KFP_BACKEND
from tests.loopback import LoopbackServer, Recorded, serving
from thawctl.kfp_tasks import EXIT_STRATEGY, node_id

API = "/apis/v2beta1"
NOW = "2026-01-02T03:04:05Z"
# grpc status codes, as the gateway writes them
NOT_FOUND, ALREADY_EXISTS, UNAUTHENTICATED, INVALID_ARGUMENT = 5, 6, 16, 3

# KFP task name -> Argo phase of its executor pod, or (phase of the last attempt, attempts)
TaskPhases = dict[str, str | tuple[str, int]]
# Argo node phase -> v2beta1 RuntimeState (RuntimeState.ToV2, backend/src/apiserver/model/run.go)
V2_STATES = {"Pending": "PENDING", "Running": "RUNNING", "Succeeded": "SUCCEEDED",
             "Skipped": "SKIPPED", "Failed": "FAILED", "Error": "FAILED",
             "Omitted": "RUNTIME_STATE_UNSPECIFIED"}
WORKFLOW_PHASES = {"PENDING": "Pending", "RUNNING": "Running", "SUCCEEDED": "Succeeded",
                   "FAILED": "Failed", "CANCELED": "Failed"}
EPOCH = "1970-01-01T00:00:00Z"  # timestamppb.New(time.Unix(0, 0)): a node not finished yet


@dataclass
class Frame:
    """The run's v2beta1 state; per KFP task name the phase of its executor (and attempts);
    ``drivers``: per KFP task name a driver phase other than Succeeded."""

    state: str
    tasks: TaskPhases = field(default_factory=dict)
    drivers: dict[str, str] = field(default_factory=dict)


class KfpStandin(LoopbackServer):
    def __init__(self, version: str = MIN_KFP_BACKEND, *, multi_user: bool = False,
                 token: str | None = None, via_ui: bool = False,
                 api_server_ready: bool = True) -> None:
        self.version = version  # the API server image's TAG_NAME ("unknown": not set)
        self.multi_user = multi_user
        self.token = token
        self.via_ui = via_ui  # healthz answered by the UI server (the gateway's /pipeline)
        self.api_server_ready = api_server_ready  # the UI server reached the API server
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.specs: dict[str, str] = {}  # version id -> the uploaded file's text
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring_runs: dict[str, dict[str, Any]] = {}
        self.requests: list[Recorded] = []
        self.run_frames: list[Frame] = [Frame("SUCCEEDED")]
        self.run_get_outages = 0  # the next this many run GETs answer 503, as a gateway may
        self.lose_upload_race = False  # another client uploads the same version first
        self._gets: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._server = HTTPServer(host="127.0.0.1")
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Response]]] = [
            ("GET", re.compile(r"healthz"), self._healthz),
            ("GET", re.compile(r"pipelines"), self._list_pipelines),
            ("POST", re.compile(r"pipelines"), self._create_pipeline),
            ("POST", re.compile(r"pipelines/upload"), self._upload),
            ("POST", re.compile(r"pipelines/upload_version"), self._upload_version),
            ("GET", re.compile(r"pipelines/(?P<pid>[^/]+)"), self._get_pipeline),
            ("GET", re.compile(r"pipelines/(?P<pid>[^/]+)/versions"), self._list_versions),
            ("GET", re.compile(r"pipelines/(?P<pid>[^/]+)/versions/(?P<vid>[^/]+)"),
             self._get_version),
            ("GET", re.compile(r"experiments"), self._list_experiments),
            ("POST", re.compile(r"experiments"), self._create_experiment),
            ("GET", re.compile(r"experiments/(?P<eid>[^/:]+)"), self._get_experiment),
            ("POST", re.compile(r"runs"), self._create_run),
            ("GET", re.compile(r"runs"), self._list_runs),
            ("GET", re.compile(r"runs/(?P<rid>[^/:]+)"), self._get_run),
            ("POST", re.compile(r"recurringruns"), self._create_recurring),
            ("GET", re.compile(r"recurringruns"), self._list_recurring),
            ("GET", re.compile(r"recurringruns/(?P<rid>[^/:]+)"), self._get_recurring),
            ("DELETE", re.compile(r"recurringruns/(?P<rid>[^/:]+)"), self._delete_recurring),
            ("POST", re.compile(r"recurringruns/(?P<rid>[^/:]+):(?P<verb>enable|disable)"),
             self._set_recurring_mode),
        ]

    # -- the server -------------------------------------------------------------------
    def calls(self, method: str, path_pattern: str) -> list[Recorded]:
        """Recorded requests whose method matches and whose path (after /apis/v2beta1/)
        matches ``path_pattern`` in full."""
        pattern = re.compile(path_pattern)
        return [r for r in self.requests if r.method == method
                and pattern.fullmatch(r.path.removeprefix(API + "/"))]

    def _handle(self, request: Request) -> Response:
        body: Any = request.get_json(silent=True) if request.mimetype == "application/json" \
            else None
        self.requests.append(Recorded(request.method, request.path, dict(request.args), body,
                                      authorization=request.headers.get("Authorization")))
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return _error(401, UNAUTHENTICATED, "Request header error: there is no user "
                                                "identity header.")
        path = request.path.removeprefix(API + "/")
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if method == request.method and match:
                return handler(request, body, **match.groupdict())
        return _error(404, NOT_FOUND, f"Not Found: {request.method} {request.path}")

    # -- healthz ----------------------------------------------------------------------
    def _healthz(self, request: Request, body: Any) -> Response:
        api_server = {"commit_sha": "0123abc", "tag_name": self.version,
                      "multi_user": self.multi_user, "pipeline_store": "database"}
        if not self.via_ui:
            return _json(api_server)
        # getBuildMetadata: TAG_NAME is written by the frontend Dockerfile, empty when the
        # build passes none (as "unknown" on the API server)
        ui = {"buildDate": "Tue Jan  2 03:04:05 UTC 2026", "frontendCommitHash": "0123abc",
              "frontendTagName": "" if self.version == "unknown" else self.version}
        if not self.api_server_ready:  # the fetch failed: only apiServerReady is added
            return _json({**ui, "apiServerReady": False})
        return _json({**ui, "apiServerReady": True,
                      "apiServerCommitHash": api_server["commit_sha"],
                      "apiServerTagName": api_server["tag_name"],
                      "apiServerMultiUser": api_server["multi_user"],
                      "multi_user": api_server["multi_user"],
                      "pipelineStore": api_server["pipeline_store"]})

    # -- pipelines and versions -------------------------------------------------------
    def _new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}"

    def _list_pipelines(self, request: Request, body: Any) -> Response:
        namespace = request.args.get("namespace", "")
        found = [p for p in self.pipelines.values() if p["namespace"] == namespace
                 and _matches(p, request.args.get("filter"))]
        return _json({"pipelines": found, "total_size": len(found)} if found else {})

    def _create_pipeline(self, request: Request, body: Any) -> Response:
        name, namespace = body.get("display_name"), body.get("namespace") or ""
        if any(p["display_name"] == name and p["namespace"] == namespace
               for p in self.pipelines.values()):
            return _error(409, ALREADY_EXISTS, f"Pipeline with name {name} already exists")
        pipeline = {"pipeline_id": self._new_id("pipeline"), "display_name": name,
                    "name": name, "description": body.get("description", ""),
                    "namespace": namespace, "created_at": NOW}
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        return _json(pipeline)

    def _upload(self, request: Request, body: Any) -> Response:
        name = request.args.get("display_name") or request.args.get("name") \
            or request.files["uploadfile"].filename
        namespace = request.args.get("namespace", "")
        if any(p["display_name"] == name and p["namespace"] == namespace
               for p in self.pipelines.values()):
            return _upload_error(409, "Failed to create a pipeline and a pipeline version")
        pipeline = {"pipeline_id": self._new_id("pipeline"), "display_name": name,
                    "name": name, "namespace": namespace, "created_at": NOW}
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        self._add_version(pipeline["pipeline_id"], name, request)
        return _json(pipeline)

    def _upload_version(self, request: Request, body: Any) -> Response:
        pipeline_id = request.args.get("pipelineid", "")
        if pipeline_id not in self.pipelines:
            return _upload_error(400, "Failed to create a pipeline version")
        name = request.args.get("display_name") or request.args.get("name") \
            or request.files["uploadfile"].filename
        if self.lose_upload_race:
            self.lose_upload_race = False
            self._add_version(pipeline_id, name, request)
        if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name
               for v in self.versions.values()):
            return _upload_error(409, "Failed to create a pipeline version")
        return _json(self._add_version(pipeline_id, name, request))

    def _add_version(self, pipeline_id: str, name: str, request: Request) -> dict[str, Any]:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": self._new_id("version"),
                   "display_name": name, "name": name,
                   "description": request.args.get("description", ""), "created_at": NOW}
        self.versions[version["pipeline_version_id"]] = version
        self.specs[version["pipeline_version_id"]] = \
            request.files["uploadfile"].read().decode()
        return version

    def _get_pipeline(self, request: Request, body: Any, pid: str) -> Response:
        if pid not in self.pipelines:
            return _error(404, NOT_FOUND, f"Pipeline {pid} not found")
        return _json(self.pipelines[pid])

    def _list_versions(self, request: Request, body: Any, pid: str) -> Response:
        found = [v for v in self.versions.values() if v["pipeline_id"] == pid
                 and _matches(v, request.args.get("filter"))]
        return _json({"pipeline_versions": found, "total_size": len(found)} if found else {})

    def _get_version(self, request: Request, body: Any, pid: str, vid: str) -> Response:
        version = self.versions.get(vid)
        if version is None or version["pipeline_id"] != pid:
            return _error(404, NOT_FOUND, f"Pipeline version {vid} not found")
        return _json(version)

    # -- experiments ------------------------------------------------------------------
    def _list_experiments(self, request: Request, body: Any) -> Response:
        namespace = request.args.get("namespace", "")
        found = [e for e in self.experiments.values() if e["namespace"] == namespace
                 and _matches(e, request.args.get("filter"))]
        return _json({"experiments": found, "total_size": len(found)} if found else {})

    def _create_experiment(self, request: Request, body: Any) -> Response:
        experiment = {"experiment_id": self._new_id("experiment"),
                      "display_name": body["display_name"],
                      "description": body.get("description") or "",
                      "namespace": body.get("namespace") or "", "created_at": NOW,
                      "storage_state": "AVAILABLE"}
        self.experiments[experiment["experiment_id"]] = experiment
        return _json(experiment)

    def _get_experiment(self, request: Request, body: Any, eid: str) -> Response:
        if eid not in self.experiments:
            return _error(404, NOT_FOUND, f"Experiment {eid} not found")
        return _json(self.experiments[eid])

    # -- runs -------------------------------------------------------------------------
    def _create_run(self, request: Request, body: Any) -> Response:
        problem = self._check_reference(body)
        if problem:
            return _error(400, INVALID_ARGUMENT, problem)
        run = {**body, "run_id": self._new_id("run"), "state": "PENDING",
               "created_at": NOW, "storage_state": "AVAILABLE"}
        self.runs[run["run_id"]] = run
        return _json(run)

    def _list_runs(self, request: Request, body: Any) -> Response:
        runs = list(self.runs.values())
        return _json({"runs": runs, "total_size": len(runs)} if runs else {})

    def _get_run(self, request: Request, body: Any, rid: str) -> Response:
        if rid not in self.runs:
            return _error(404, NOT_FOUND, f"Run {rid} not found")
        if self.run_get_outages > 0:
            self.run_get_outages -= 1
            return Response("upstream connect error or disconnect/reset before headers",
                            status=503, mimetype="text/plain")
        seen = self._gets.get(rid, 0)
        self._gets[rid] = seen + 1
        frame = self.run_frames[min(seen, len(self.run_frames) - 1)]
        run = {**self.runs[rid], "state": frame.state}
        spec = next(yaml.safe_load_all(self.specs[
            run["pipeline_version_reference"]["pipeline_version_id"]]))
        details = _task_details(rid, _argo_nodes(_workflow_name(spec, rid), spec, frame))
        if details:  # toApiRunDetails leaves run_details out while the workflow has no nodes
            run["run_details"] = {"task_details": details}
        return _json(run)

    def _check_reference(self, body: dict[str, Any]) -> str | None:
        ref = body.get("pipeline_version_reference") or {}
        version = self.versions.get(ref.get("pipeline_version_id", ""))
        if version is None or version["pipeline_id"] != ref.get("pipeline_id"):
            return f"no pipeline version {ref}"
        if body.get("experiment_id") not in self.experiments:
            return f"no experiment {body.get('experiment_id')}"
        return None

    # -- recurring runs ---------------------------------------------------------------
    def _create_recurring(self, request: Request, body: Any) -> Response:
        problem = self._check_reference(body)
        if problem:
            return _error(400, INVALID_ARGUMENT, problem)
        namespace = self.experiments[body["experiment_id"]]["namespace"]
        recurring = {**body, "recurring_run_id": self._new_id("recurring"),
                     "namespace": namespace, "created_at": NOW, "updated_at": NOW,
                     "max_concurrency": str(body.get("max_concurrency", "1")),
                     "mode": body.get("mode", "ENABLE"),
                     "status": "ENABLED" if body.get("mode") != "DISABLE" else "DISABLED"}
        self.recurring_runs[recurring["recurring_run_id"]] = recurring
        return _json(recurring)

    def _list_recurring(self, request: Request, body: Any) -> Response:
        experiment = request.args.get("experiment_id")
        namespace = request.args.get("namespace", "")
        found = [r for r in self.recurring_runs.values()
                 if (r["experiment_id"] == experiment if experiment
                     else r["namespace"] == namespace)
                 and _matches(r, request.args.get("filter"))]
        return _json({"recurringRuns": found, "total_size": len(found)} if found else {})

    def _get_recurring(self, request: Request, body: Any, rid: str) -> Response:
        if rid not in self.recurring_runs:
            return _error(404, NOT_FOUND, f"Recurring run {rid} not found")
        return _json(self.recurring_runs[rid])

    def _delete_recurring(self, request: Request, body: Any, rid: str) -> Response:
        if self.recurring_runs.pop(rid, None) is None:
            return _error(404, NOT_FOUND, f"Recurring run {rid} not found")
        return _json({})

    def _set_recurring_mode(self, request: Request, body: Any, rid: str,
                            verb: str) -> Response:
        if rid not in self.recurring_runs:
            return _error(404, NOT_FOUND, f"Recurring run {rid} not found")
        enabled = verb == "enable"
        self.recurring_runs[rid].update(mode="ENABLE" if enabled else "DISABLE",
                                        status="ENABLED" if enabled else "DISABLED",
                                        updated_at=NOW)
        return _json({})


def running(**kwargs: Any) -> AbstractContextManager[KfpStandin]:
    return serving(KfpStandin(**kwargs))


def _workflow_name(spec: dict[str, Any], run_id: str) -> str:
    """The Argo workflow's name: the pipeline's name and a generated suffix (``GenerateName`` in
    ``backend/src/v2/compiler/argocompiler/argo.go``)."""
    return f"{spec['pipelineInfo']['name']}-q{run_id[-4:]}"


@dataclass
class _Node:
    name: str  # Argo's node name: the boundary's name, ".", the DAG task's name
    display_name: str
    phase: str
    children: list[str] = field(default_factory=list)  # node names


def _argo_nodes(workflow: str, spec: dict[str, Any], frame: Frame) -> list[_Node]:
    """The Argo nodes of a run of ``spec`` in ``frame``, as KFP's compiler lays the workflow
    out (``backend/src/v2/compiler/argocompiler/dag.go``, ``container.go`` at 2.14.0-2.17.0:
    ``root-driver`` and ``root`` under the entrypoint; per DAG task ``<t>-driver`` and the DAG
    ``<t>``; per container task the driver pod ``<t>-driver`` and the DAG ``<t>`` holding the
    ``executor`` pod, a Retry node with ``executor(<n>)`` pods when the task retries; the exit
    task inside the ``<t>.onExit`` node of the task it waits for) and Argo names them
    (``workflow/controller/operator.go`` initializeNode, ``exit_handler.go``, v3.6-v4.0).
    Simplified: a node's children are the nodes it contains (Argo lists a DAG's later tasks
    under the tasks they depend on)."""
    if not frame.tasks and not frame.drivers:
        return []
    phase = WORKFLOW_PHASES[frame.state]
    top = _Node(workflow, workflow, phase)
    nodes = [top, _Node(f"{workflow}.root-driver", "root-driver", "Succeeded")]
    root = _Node(f"{workflow}.root", "root", phase)
    top.children = [n.name for n in (nodes[1], root)]
    nodes.append(root)
    nodes += _dag_nodes(spec, spec["root"]["dag"], root, root, frame)
    return nodes


def _dag_nodes(spec: dict[str, Any], dag: dict[str, Any], boundary: _Node, parent: _Node,
               frame: Frame) -> list[_Node]:
    nodes: list[_Node] = []
    tasks = dag.get("tasks", {})
    for name in sorted(tasks):
        task = tasks[name]
        exits = task.get("triggerPolicy", {}).get("strategy") == EXIT_STRATEGY
        here, holder = boundary, parent
        if exits:
            waited = next((n for n in nodes if n.name == f"{boundary.name}."
                           f"{task['dependentTasks'][0]}"), None)
            if waited is None or name not in frame.tasks:
                continue
            here = holder = _Node(f"{waited.name}.onExit", f"{waited.display_name}.onExit",
                                  _phase_of(frame, [name]))
            waited.children.append(here.name)
            nodes.append(here)
        component = spec["components"][task["componentRef"]["name"]]
        if "dag" in component:
            inner = _container_tasks(spec, component["dag"])
            if not set(inner) & (set(frame.tasks) | set(frame.drivers)):
                continue
            driver = _Node(f"{here.name}.{name}-driver", f"{name}-driver", "Succeeded")
            node = _Node(f"{here.name}.{name}", name, _phase_of(frame, inner))
            holder.children += [driver.name, node.name]
            nodes += [driver, node, *_dag_nodes(spec, component["dag"], node, node, frame)]
        elif name in frame.tasks or name in frame.drivers:
            nodes += _container_nodes(name, "retryPolicy" in task, here, holder, frame)
    return nodes


def _container_nodes(name: str, retried: bool, boundary: _Node, holder: _Node,
                     frame: Frame) -> list[_Node]:
    driver = _Node(f"{boundary.name}.{name}-driver", f"{name}-driver",
                   frame.drivers.get(name, "Succeeded"))
    holder.children.append(driver.name)
    if driver.phase != "Succeeded" or name not in frame.tasks:
        return [driver]
    value = frame.tasks[name]
    phase, attempts = value if isinstance(value, tuple) else (value, 1)
    node = _Node(f"{boundary.name}.{name}", name, phase)
    executor = _Node(f"{node.name}.executor", "executor", phase)
    holder.children.append(node.name)
    node.children.append(executor.name)
    nodes = [driver, node, executor]
    if retried:  # a Retry node, one pod per attempt, all but the last failed
        for attempt in range(attempts):
            pod = _Node(f"{executor.name}({attempt})", f"executor({attempt})",
                        phase if attempt == attempts - 1 else "Failed")
            executor.children.append(pod.name)
            nodes.append(pod)
    return nodes


def _container_tasks(spec: dict[str, Any], dag: dict[str, Any]) -> list[str]:
    names = []
    for name, task in dag.get("tasks", {}).items():
        component = spec["components"][task["componentRef"]["name"]]
        names += _container_tasks(spec, component["dag"]) if "dag" in component else [name]
    return names


def _phase_of(frame: Frame, names: list[str]) -> str:
    """A DAG's phase from its tasks': Failed when one failed, else the run's."""
    phases = [frame.drivers.get(n) for n in names] + [
        (v[0] if isinstance(v, tuple) else v) for n, v in frame.tasks.items() if n in names]
    return "Failed" if {"Failed", "Error"} & set(phases) else WORKFLOW_PHASES[frame.state]


def _task_details(run_id: str, nodes: list[_Node]) -> list[dict[str, Any]]:
    """``run_details.task_details`` from Argo nodes, as the API server writes them
    (``toModelTasks`` / ``toApiPipelineTaskDetail`` in ``backend/src/apiserver/server/
    api_converter.go``, the task store's ``CreateOrUpdateTasks``, 2.14.0-2.17.0): sorted by
    node id; the store's UUID as ``task_id``; the node's display name and phase in v2 terms;
    the children's node ids as ``child_tasks[].pod_name``; no ``error``, no ``pod_name``, no
    ``parent_task_id`` or ``execution_id`` (unpopulated, so left out)."""
    workflow = nodes[0].name if nodes else ""
    details = []
    for node in nodes:
        ident = node_id(workflow, node.name)
        state = V2_STATES[node.phase]
        finished = state in ("SUCCEEDED", "SKIPPED", "FAILED")
        detail = {"run_id": run_id, "task_id": str(uuid.uuid5(uuid.NAMESPACE_OID, ident)),
                  "display_name": node.display_name, "create_time": NOW, "start_time": NOW,
                  "end_time": NOW if finished else EPOCH, "state": state,
                  "state_history": [{"update_time": NOW, "state": state}]}
        if node.children:
            detail["child_tasks"] = [{"pod_name": node_id(workflow, child)}
                                     for child in node.children]
        details.append((ident, detail))
    return [detail for _, detail in sorted(details, key=lambda pair: pair[0])]


def _matches(item: dict[str, Any], filter_json: str | None) -> bool:
    if not filter_json:
        return True
    for predicate in json.loads(filter_json).get("predicates", []):
        operation = predicate.get("operation")
        value = predicate.get("stringValue", predicate.get("string_value"))
        if operation not in ("EQUALS", 1):
            raise AssertionError(f"the stand-in only knows EQUALS, got {predicate}")
        if str(item.get(predicate["key"])) != value:
            return False
    return True


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


def _error(status: int, code: int, message: str) -> Response:
    return _json({"error": message, "code": code, "message": message, "details": []}, status)


def _upload_error(status: int, message: str) -> Response:
    return _json({"error_message": message, "error_details": message}, status)
