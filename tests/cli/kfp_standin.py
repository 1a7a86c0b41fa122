"""A stand-in for the Kubeflow Pipelines v2beta1 REST API on a real loopback HTTP server
(pytest-httpserver), for tests that drive the real ``kfp.Client`` (urllib3) against it.

Shaped on kubeflow/pipelines ``backend/api/v2beta1/swagger/*.swagger.json`` and the API
server's behaviour: JSON with proto field names, ``/apis/v2beta1/healthz`` answering
``tag_name`` (the server writes it by hand, the swagger model leaves it out), multipart
``pipelines/upload_version`` with 409 on a duplicate version name, list ``filter`` (JSON
predicates, ``EQUALS`` on ``display_name``), recurring runs unique by name in a namespace,
``:enable`` / ``:disable``. It keeps state (pipelines, versions, experiments, runs,
recurring runs) and records every request, so tests check what arrived and how often.

A run's ``GET`` walks through ``run_frames``: each GET shows the next frame (the last one
stays), a frame being the run's state and its tasks' states as ``run_details`` has them;
``run_get_outages`` makes the next GETs answer 503 first, as an ingress gateway may.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.loopback import LoopbackServer, Recorded, serving

API = "/apis/v2beta1"
NOW = "2026-01-02T03:04:05Z"
# grpc status codes, as the gateway writes them
NOT_FOUND, ALREADY_EXISTS, UNAUTHENTICATED, INVALID_ARGUMENT = 5, 6, 16, 3

TaskStates = dict[str, str | tuple[str, str]]  # display name -> state or (state, message)


@dataclass
class Frame:
    state: str
    tasks: TaskStates = field(default_factory=dict)


class KfpStandin(LoopbackServer):
    def __init__(self, version: str = "2.6.0", *, multi_user: bool = False,
                 token: str | None = None) -> None:
        self.version = version
        self.multi_user = multi_user
        self.token = token
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
        return _json({"commit_sha": "0123abc", "tag_name": self.version,
                      "multi_user": self.multi_user, "pipeline_store": "database"})

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
        run = {**self.runs[rid], "state": frame.state,
               "run_details": {"task_details": _task_details(rid, frame)}}
        if frame.state == "FAILED":
            run["error"] = {"code": 2, "message": "run failed"}
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
        if any(r["display_name"] == body["display_name"] and r["namespace"] == namespace
               for r in self.recurring_runs.values()):
            return _error(409, ALREADY_EXISTS, "Failed to create a recurring run: "
                          f"{body['display_name']} already exists")
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


def _task_details(run_id: str, frame: Frame) -> list[dict[str, Any]]:
    """``run_details.task_details`` for a frame: a root DAG task (failed with a generic
    message when a child failed, as KFP's is) and one executor task per entry."""
    tasks = []
    for index, (name, value) in enumerate(frame.tasks.items(), start=1):
        state, message = value if isinstance(value, tuple) else (value, "")
        task = {"run_id": run_id, "task_id": f"{run_id}-task-{index}", "display_name": name,
                "create_time": NOW, "start_time": NOW, "state": state,
                "pod_name": f"{name}-pod-{index}", "parent_task_id": f"{run_id}-root"}
        if message:
            task["error"] = {"code": 2, "message": message}
        tasks.append(task)
    failed = any(t["state"] == "FAILED" for t in tasks)
    root = {"run_id": run_id, "task_id": f"{run_id}-root", "display_name": "root",
            "create_time": NOW, "state": "FAILED" if failed else frame.state,
            "child_tasks": [{"task_id": t["task_id"], "pod_name": t["pod_name"]}
                            for t in tasks]}
    if failed:
        root["error"] = {"code": 2, "message": "the DAG has failed tasks"}
    return [root, *tasks] if tasks else []


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
