"""The cluster-fidelity runner: executes a compiled pipeline YAML the way a Kubeflow Pipelines
backend does, so that what only a cluster shows fails here too.

``kfp.local`` runs every step in one process tree on one filesystem and ignores the
image, the Kubernetes platform spec, retries and caching. This runner instead, for every
task of the compiled spec, as soon as the tasks it depends on have ended (independent tasks
run side by side, as Argo runs a DAG's ready tasks):

- resolves its inputs (pipeline parameters, constants and run placeholders, upstream
  outputs, the exit handler's final status) as ``backend/src/v2/driver/resolve.go`` does;
- provisions its outputs under ``<root>/<pipeline>/<run id>/<task>/<fresh uuid>/<output>``
  (``driver/driver.go`` ``provisionOutputs``, ``metadata/client.go`` ``GenerateOutputURI``);
- looks it up in the cache when the task enables caching, by the key of
  ``backend/src/v2/cacheutils/cache.go`` (input artifact ids, parameter values, output
  specs, image and command), scoped per pipeline name and namespace (``driver/cache.go``);
- builds the pod's environment from the Secrets and ConfigMaps its Kubernetes platform spec
  names (which this runner plays): a missing one leaves the pod Pending with the kubelet's
  CreateContainerConfigError, which Argo never retries and which never ends the run;
- stages its input artifacts from S3 into fresh folders mounted at ``/s3`` (as the KFP
  launcher does), and nothing else;
- starts the very container command line of the spec (``{{$}}`` = the executor input) in
  a fresh sandbox (a container of the image, or bubblewrap);
- uploads its output artifacts only when it succeeded;
- retries it as Argo does (:mod:`thawctl.argo_retry`), each attempt with empty folders;
- runs the exit handler's task after the handler's DAG, with the final status the driver
  builds.

Task states are the MLMD execution states the driver and launcher publish (``COMPLETE``,
``CACHED``, ``FAILED``; ``RUNNING`` for a pod that never starts), or ``SKIPPED`` for a task
never started because an upstream task failed. The run's state is the API's:
``SUCCEEDED``, ``FAILED``, or ``RUNNING`` when a pod stays Pending.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from thaw import storage
from thaw.errors import ThawError
from thawctl.argo_retry import DEADLINE_MESSAGE, ArgoRetry, ArgoRetryError
from thawctl.console import error_message, highlight
from thawctl.kfp_tasks import step_name
from thawctl.sandbox import STAGING_MOUNTS, Sandbox, StepProcess, venv_env

log = logging.getLogger(__name__)

EXECUTOR_OUTPUT = "/tmp/kfp_outputs/output_metadata.json"
ALL_UPSTREAM_COMPLETED = "ALL_UPSTREAM_TASKS_COMPLETED"
CACHE_FOLDER = ".thaw-cache"
# The launcher records these artifacts' metadata only; they need no file.
METADATA_ONLY = ("system.Metrics", "system.ClassificationMetrics",
                 "system.SlicedClassificationMetrics")
OnStarted = Callable[[str, int, StepProcess], None]

# MLMD execution states (ml_metadata Execution.State names): the driver creates an execution
# RUNNING, publishes a cache hit CACHED (driver/container.go), the launcher publishes COMPLETE
# or FAILED (component/launcher_v2.go), all at 2.14.0-2.17.0.
COMPLETE, CACHED, FAILED, RUNNING = "COMPLETE", "CACHED", "FAILED", "RUNNING"
SKIPPED = "SKIPPED"  # never started: an upstream task failed (Argo omits the node)
ENDED = (COMPLETE, CACHED, FAILED, SKIPPED)
# A DAG's state from its tasks' (metadata/client.go UpdateDAGExecutionsState at 2.14.0-2.17.0)
# and the run state the API reports for it (apiserver/model/run.go).
DONE_IN_DAG = (COMPLETE, CACHED)
RUN_STATE = {COMPLETE: "SUCCEEDED", FAILED: "FAILED", RUNNING: "RUNNING"}
# Kubernetes' generateName suffix: 5 characters of this alphabet (apimachinery util/rand).
NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
POD_CONFIG_ERROR = "CreateContainerConfigError"


@dataclass
class TaskOutcome:
    """What happened to one task: its state, outputs, attempts and log."""

    name: str
    display_name: str
    state: str  # COMPLETE, CACHED, FAILED, SKIPPED; RUNNING: its pod stays Pending
    attempts: int = 0
    seconds: float = 0.0
    log: str = ""
    error: str = ""
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {uri, ...}
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    run_id: str
    state: str  # SUCCEEDED, FAILED, or RUNNING: a pod stays Pending, the run never ends
    tasks: dict[str, TaskOutcome]

    def failed_task(self) -> TaskOutcome | None:
        """The first task that failed or whose pod cannot start."""
        return next((t for t in self.tasks.values()
                     if t.state == FAILED or (t.state == RUNNING and t.error)), None)


@dataclass
class ClusterPlay:
    """The cluster objects the runner stands in for: Secrets and ConfigMaps by name, in the
    namespace the run's pods run in."""

    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    namespace: str = "kubeflow"


class FidelityRunner:
    """Runs compiled pipeline specs step by step, each step isolated (see module doc).

    ``pipeline_root`` plays the ``kfp-launcher`` ConfigMap's default root; the cache (the API
    server's task table on a cluster) is kept under it, shared by every run.
    """

    def __init__(self, sandbox: Sandbox, cluster: ClusterPlay, *, pipeline_root: str,
                 work_dir: Path, on_started: OnStarted | None = None,
                 echo: Callable[[str], None] = print) -> None:
        self.sandbox = sandbox
        self.cluster = cluster
        self.default_root = pipeline_root.rstrip("/")
        self.work_dir = Path(work_dir)
        self.on_started = on_started
        self._echo = echo
        self._echo_lock = threading.Lock()
        # boto3's default session is not safe to share between threads while it creates clients
        self.storage_lock = threading.Lock()

    def echo(self, line: str) -> None:
        with self._echo_lock:
            self._echo(line)

    def run(self, spec_path: Path, parameters: dict[str, Any] | None = None,
            run_id: str | None = None) -> RunResult:
        docs = list(yaml.safe_load_all(Path(spec_path).read_text()))
        spec = docs[0]
        platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] \
            if len(docs) > 1 and docs[1] else {}
        run = _Run(self, spec, platform, run_id or str(uuid.uuid4()))
        root_inputs = run.pipeline_inputs(parameters or {})
        state = run.run_dag(spec["root"]["dag"], root_inputs, scope="")
        if state == RUNNING:
            self.echo(f"⏸ run {run.run_id} would never end on a cluster: a pod stays Pending")
        return RunResult(run.run_id, RUN_STATE[state], run.outcomes)


class _Run:
    def __init__(self, runner: FidelityRunner, spec: dict[str, Any],
                 platform: dict[str, Any], run_id: str) -> None:
        self.runner = runner
        self.spec = spec
        self.platform = platform
        self.run_id = run_id
        self.name = spec["pipelineInfo"]["name"]
        # The Argo Workflow's name: generateName "<pipeline name>-" (argocompiler/argo.go).
        self.workflow_name = self.name.split("/")[-1] + "-" + "".join(
            random.choices(NAME_SUFFIX_ALPHABET, k=5))
        self.root = (spec.get("defaultPipelineRoot") or runner.default_root).rstrip("/")
        self.outcomes: dict[str, TaskOutcome] = {}
        self.logs = runner.work_dir / run_id
        self.logs.mkdir(parents=True, exist_ok=True)

    # -- inputs ---------------------------------------------------------------------------
    def pipeline_inputs(self, overrides: dict[str, Any]) -> dict[str, Any]:
        definitions = self.spec["root"].get("inputDefinitions", {}).get("parameters", {})
        unknown = sorted(set(overrides) - set(definitions))
        if unknown:
            raise ThawError(f"unknown pipeline parameter(s) {unknown}; the pipeline takes "
                            f"{sorted(definitions)}")
        values = {}
        for name, definition in definitions.items():
            if name in overrides:
                values[name] = overrides[name]
            elif "defaultValue" in definition:
                values[name] = definition["defaultValue"]
            else:
                raise ThawError(f"pipeline parameter {name!r} has no default: pass it")
            values[name] = _coerce(values[name], definition["parameterType"], name)
        return values

    def _resolve_parameter(self, spec: dict[str, Any], task_name: str, task: dict[str, Any],
                           scope_inputs: dict[str, Any], scope: str) -> Any:
        """One input parameter, as ``driver/resolve.go`` ``resolveInputParameter`` does."""
        if "componentInputParameter" in spec:
            return scope_inputs[spec["componentInputParameter"]]
        if "runtimeValue" in spec:
            value = spec["runtimeValue"]["constant"]
            # Whole-value placeholders only; a run here has no display name of its own, so
            # the workflow's name stands in for it.
            placeholders = {"{{$.pipeline_job_name}}": self.workflow_name,
                            "{{$.pipeline_job_resource_name}}": self.workflow_name,
                            "{{$.pipeline_job_uuid}}": self.run_id,
                            "{{$.pipeline_task_name}}": task_name}
            return placeholders.get(value, value) if isinstance(value, str) else value
        if "taskOutputParameter" in spec:
            ref = spec["taskOutputParameter"]
            return self.outcomes[scope + ref["producerTask"]].parameters[ref["outputParameterKey"]]
        if "taskFinalStatus" in spec:
            return self._final_status(task, scope)
        raise ThawError(f"unsupported parameter input {spec}")

    def _final_status(self, task: dict[str, Any], scope: str) -> dict[str, Any]:
        """``PipelineTaskFinalStatus`` as the driver builds it (``driver/resolve.go`` at
        2.14.0-2.17.0): the MLMD state of the task's first dependency (for an exit handler, its
        DAG), that task's name, the Argo Workflow's name, and an empty error (upstream leaves
        code and message unimplemented)."""
        producer = task["dependentTasks"][0]
        return {"state": self.outcomes[scope + producer].state,
                "pipelineTaskName": producer,
                "pipelineJobResourceName": self.workflow_name,
                "error": {}}

    # -- DAG ------------------------------------------------------------------------------
    def run_dag(self, dag: dict[str, Any], inputs: dict[str, Any], scope: str) -> str:
        """Start every task whose dependencies have ended, side by side, until none is left
        that can start; return the DAG's state (COMPLETE, FAILED, or RUNNING while a pod
        stays Pending)."""
        tasks = dag["tasks"]
        waiting = set(tasks)
        with ThreadPoolExecutor(max_workers=len(tasks),
                                thread_name_prefix=f"dag{scope or '-root'}") as pool:
            running: set[Future[TaskOutcome]] = set()
            while True:
                for name in sorted(self._ready(tasks, waiting, scope)):
                    waiting.discard(name)
                    running.add(pool.submit(self.run_task, name, tasks[name], inputs, scope))
                if not running:
                    break
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # an error of the runner itself stops the run
        if waiting and not any(self.outcomes[scope + name].state == RUNNING
                               for name in tasks if scope + name in self.outcomes):
            raise ThawError(f"cycle in the pipeline DAG among {sorted(waiting)}")
        return _dag_state([self.outcomes.get(scope + name) for name in tasks])

    def _ready(self, tasks: dict[str, Any], waiting: Iterable[str], scope: str) -> list[str]:
        return [name for name in waiting
                if all(scope + d in self.outcomes and self.outcomes[scope + d].state in ENDED
                       for d in tasks[name].get("dependentTasks", []))]

    def run_task(self, name: str, task: dict[str, Any], scope_inputs: dict[str, Any],
                 scope: str) -> TaskOutcome:
        display = task["taskInfo"]["name"]
        upstream = [self.outcomes[scope + d] for d in task.get("dependentTasks", [])]
        trigger = task.get("triggerPolicy", {}).get("strategy")
        if trigger != ALL_UPSTREAM_COMPLETED and any(u.state in (FAILED, SKIPPED)
                                                     for u in upstream):
            return self._record(TaskOutcome(scope + name, display, SKIPPED))
        component = self.spec["components"][task["componentRef"]["name"]]
        params = {key: self._resolve_parameter(value, name, task, scope_inputs, scope)
                  for key, value in task.get("inputs", {}).get("parameters", {}).items()}
        if "dag" in component:  # a sub-DAG (the exit handler's body)
            started = time.monotonic()
            state = self.run_dag(component["dag"], params, scope=f"{scope}{name}/")
            return self._record(TaskOutcome(scope + name, display, state,
                                            seconds=time.monotonic() - started))
        artifacts = {}
        for key, ref in task.get("inputs", {}).get("artifacts", {}).items():
            source = ref["taskOutputArtifact"]
            artifacts[key] = self.outcomes[scope + source["producerTask"]].artifacts[
                source["outputArtifactKey"]]
        definitions = component.get("inputDefinitions", {}).get("parameters", {})
        params = {k: _coerce(v, definitions[k]["parameterType"], k) if k in definitions
                  and definitions[k]["parameterType"] != "TASK_FINAL_STATUS" else v
                  for k, v in params.items()}
        step = _Step(self, scope + name, display, task, component, params, artifacts)
        return self._record(step.execute())

    def _record(self, outcome: TaskOutcome) -> TaskOutcome:
        self.outcomes[outcome.name] = outcome
        return outcome


def _dag_state(outcomes: list[TaskOutcome | None]) -> str:
    """RUNNING while a task's pod stays Pending or waits on one (Argo keeps the DAG node
    running, so the exit handler never starts); else COMPLETE when every task is COMPLETE
    or CACHED, FAILED otherwise (``UpdateDAGExecutionsState``)."""
    states = [o.state if o else RUNNING for o in outcomes]
    if RUNNING in states:
        return RUNNING
    return COMPLETE if all(s in DONE_IN_DAG for s in states) else FAILED


class _Step:
    """One container task: outputs, cache lookup, pod environment, attempts, upload."""

    def __init__(self, run: _Run, name: str, display: str, task: dict[str, Any],
                 component: dict[str, Any], params: dict[str, Any],
                 artifacts: dict[str, dict[str, Any]]) -> None:
        self.run = run
        self.name = name
        self.task_name = name.split("/")[-1]
        self.display = display
        self.task = task
        self.component = component
        self.params = params
        self.inputs = artifacts
        executor = component["executorLabel"]
        self.container = run.spec["deploymentSpec"]["executors"][executor]["container"]
        self.platform = run.platform.get(executor, {})
        self.log = run.logs / f"{step_name(self.task_name, task)}.log"  # probe.log, not train.log
        # One driver run per task: every attempt writes the same, per-execution URIs.
        self.executor_input = self._executor_input(
            f"{run.root}/{run.name}/{run.run_id}/{self.task_name}/{uuid.uuid4()}")
        self.caching = bool(task.get("cachingOptions", {}).get("enableCache"))

    def outcome(self, state: str, attempts: int, started: float, **fields: Any) -> TaskOutcome:
        return TaskOutcome(self.name, self.display, state, attempts,
                           time.monotonic() - started, str(self.log), **fields)

    def execute(self) -> TaskOutcome:
        echo = self.run.runner.echo
        started = time.monotonic()
        cached = self._cache_lookup() if self.caching else None
        if cached is not None:
            echo(f"= {self.display}: cache hit, outputs of an earlier run reused")
            return self.outcome(CACHED, 0, started, artifacts=cached["artifacts"],
                                parameters=cached["parameters"])
        try:
            env = self._environment()
        except _PodPending as pending:
            echo(f"⏸ {self.display}: pod Pending, {pending} (Argo does not retry this, and "
                 "the run never ends: fix the Secret or ConfigMap)")
            return self.outcome(RUNNING, 0, started, error=f"pod Pending, {pending}")
        retry = ArgoRetry.from_policy(self.task.get("retryPolicy", {}))
        first_started = time.monotonic()
        deadline = None
        attempt = 0
        while True:
            attempt += 1
            tries = f" (attempt {attempt})" if attempt > 1 else ""
            echo(f"▶ {self.display}{tries}  (log {self.log})")
            try:
                outputs = self._attempt(attempt, env, deadline)
            except (_AttemptFailed, ThawError) as err:
                error = str(err)
                echo(f"✘ {self.display} attempt {attempt} failed: {error}")
            else:
                outcome = self.outcome(COMPLETE, attempt, started, **outputs)
                if self.caching:
                    self._cache_store(outputs)
                echo(f"✔ {self.display} succeeded in {outcome.seconds:.0f} s")
                return outcome
            if retry is None:
                return self.outcome(FAILED, attempt, started, error=error)
            now = time.monotonic()
            try:
                decision = retry.after_failure(attempt, first_started, now, now)
            except ArgoRetryError as err:
                return self.outcome(FAILED, attempt, started, error=f"{error}; retry: {err}")
            if decision.stop:
                echo(f"✘ {self.display}: not retried: {decision.stop}")
                return self.outcome(FAILED, attempt, started,
                                    error=f"{error} (not retried: {decision.stop})")
            echo(f"↻ {self.display}: retry in {decision.wait_s:.0f} s")
            time.sleep(decision.wait_s)
            deadline = retry.window_end(first_started)

    # -- one attempt ----------------------------------------------------------------------
    def _attempt(self, attempt: int, env: dict[str, str],
                 deadline: float | None) -> dict[str, Any]:
        runner = self.run.runner
        work = Path(tempfile.mkdtemp(prefix=f"{self.task_name}-{attempt}-", dir=runner.work_dir))
        try:
            mounts = {inside: work / inside.strip("/").replace("/", "_")
                      for inside in STAGING_MOUNTS}
            for folder in mounts.values():
                folder.mkdir()
                folder.chmod(0o777)  # emptyDirs are world-writable; the image runs as uid 1000
            with runner.storage_lock:
                for artifact in self.inputs.values():
                    _stage_in(artifact["uri"], _host_path(artifact["uri"], mounts))
            _open_to_the_step(mounts.values())
            executor_input = json.dumps(self.executor_input)
            command = [part.replace("{{$}}", executor_input)
                       for part in self.container.get("command", []) + self.container.get(
                           "args", [])]
            if runner.sandbox.engine == "bwrap":
                env = {**venv_env(), **env}
            process = runner.sandbox.start(
                name=f"thaw-{self.run.run_id[:8]}-{self.task_name}-{attempt}",
                image=self.container["image"], command=command, env=env, mounts=mounts,
                log=self.log)
            if runner.on_started:
                runner.on_started(self.task_name, attempt, process)
            code = self._follow(process, deadline)
            if code is None:
                raise _AttemptFailed(DEADLINE_MESSAGE)
            if code != 0:
                raise _AttemptFailed(
                    f"exit code {code}: {error_message(self.log.read_text(errors='replace'))}")
            return self._collect(mounts)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _follow(self, process: StepProcess, deadline: float | None) -> int | None:
        """Wait for the step, echoing its epoch and summary lines as they are logged; kill
        it at ``deadline`` (then None), as Argo's executor kills a retry at the window's end."""
        echo = self.run.runner.echo
        with open(self.log, errors="replace") as log:
            log.seek(0, 2)
            while True:
                code = process.popen.poll()
                for line in log.readlines():
                    if (shown := highlight(line.rstrip("\n"))) is not None:
                        echo(f"    {self.display}: {shown.strip()}")
                if code is not None:
                    return code
                if deadline is not None and time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    return None
                time.sleep(0.5)

    def _executor_input(self, task_root: str) -> dict[str, Any]:
        outputs = self.component.get("outputDefinitions", {})
        return {
            "inputs": {
                "parameterValues": self.params,
                "artifacts": {key: {"artifacts": [value]} for key, value in self.inputs.items()},
            },
            "outputs": {
                "parameters": {key: {"outputFile": f"/tmp/kfp_outputs/{key}"}
                               for key in outputs.get("parameters", {})},
                "artifacts": {key: {"artifacts": [{
                    "name": key, "type": definition["artifactType"],
                    "uri": f"{task_root}/{key}", "metadata": {}}]}
                    for key, definition in outputs.get("artifacts", {}).items()},
                "outputFile": EXECUTOR_OUTPUT,
            },
        }

    def _environment(self) -> dict[str, str]:
        """The pod's env: the container's own, then the Secret and ConfigMap keys its platform
        spec maps, resolved as the kubelet does (``pkg/kubelet/kubelet_pods.go``
        ``makeEnvironmentVariables``): a missing object or key of a non-optional mapping
        keeps the container from being created."""
        env = {item["name"]: item["value"] for item in self.container.get("env", [])}
        cluster = self.run.runner.cluster
        for kind, store, name_key, key_key in (
                ("Secret", cluster.secrets, "secretName", "secretKey"),
                ("ConfigMap", cluster.config_maps, "configMapName", "configMapKey")):
            for mapping in self.platform.get(f"{kind[0].lower()}{kind[1:]}AsEnv", []):
                source_name = mapping[name_key]
                source = store.get(source_name)
                for pair in mapping["keyToEnv"]:
                    if source is not None and pair[key_key] in source:
                        env[pair["envVar"]] = source[pair[key_key]]
                    elif not mapping.get("optional"):
                        raise _PodPending(_missing(kind, source_name, pair[key_key],
                                                   source is None, cluster.namespace))
        return env

    def _collect(self, mounts: dict[str, Path]) -> dict:
        """Read the executor's output metadata and upload every output artifact, each with
        an id of its own (MLMD's artifact id: what the cache key names it by)."""
        metadata_file = mounts["/tmp/kfp_outputs"] / Path(EXECUTOR_OUTPUT).name
        written = json.loads(metadata_file.read_text()) if metadata_file.exists() else {}
        artifacts = {}
        for key, entry in self.executor_input["outputs"]["artifacts"].items():
            artifact = {**entry["artifacts"][0], "name": uuid.uuid4().hex}
            reported = written.get("artifacts", {}).get(key, {}).get("artifacts", [{}])[0]
            artifact["metadata"] = reported.get("metadata", {})
            local = _host_path(artifact["uri"], mounts)
            if local.exists():
                artifacts[key] = artifact
            elif artifact["type"]["schemaTitle"] in METADATA_ONLY:
                artifacts[key] = {**artifact, "uri": ""}
            else:
                raise _AttemptFailed(f"output artifact {key!r} was not written")
        with self.run.runner.storage_lock:
            for artifact in artifacts.values():  # only once every output is there
                if artifact["uri"]:
                    _stage_out(_host_path(artifact["uri"], mounts), artifact["uri"])
        return {"artifacts": artifacts, "parameters": written.get("parameterValues", {})}

    # -- cache ----------------------------------------------------------------------------
    def _cache_uri(self) -> str:
        """Where the cache entry lives: the fingerprint under the entry's scope, the pipeline
        name and the namespace (``driver/cache.go``: ``GetExecutionCache(fingerPrint,
        "pipeline/" + PipelineName, Namespace)``)."""
        output_types = {key: spec["parameterType"] for key, spec in self.component.get(
            "outputDefinitions", {}).get("parameters", {}).items()}
        fingerprint = cache_fingerprint(self.executor_input, self.container, output_types)
        return (f"{self.run.runner.default_root}/{CACHE_FOLDER}/"
                f"{self.run.runner.cluster.namespace}/pipeline/{self.run.name}/{fingerprint}.json")

    def _cache_lookup(self) -> dict[str, Any] | None:
        uri = self._cache_uri()
        with self.run.runner.storage_lock, tempfile.TemporaryDirectory() as tmp:
            if not storage.exists(uri):
                return None
            return json.loads(storage.download_file(uri, Path(tmp) / "entry").read_text())

    def _cache_store(self, outputs: dict[str, Any]) -> None:
        with self.run.runner.storage_lock, tempfile.TemporaryDirectory() as tmp:
            entry = Path(tmp) / "entry.json"
            entry.write_text(json.dumps(outputs))
            storage.upload_file(entry, self._cache_uri())


def cache_fingerprint(executor_input: dict[str, Any], container: dict[str, Any],
                      output_parameter_types: dict[str, str]) -> str:
    """The sha256 of the cache key ``cacheutils/cache.go`` ``GenerateCacheKey`` builds
    (2.14.0-2.17.0; ``driver/cache.go`` ``getFingerPrint`` passes the raw command + args):
    the input artifacts by id (MLMD's, not their URIs), the input parameter values, the
    output artifacts with their URIs wiped, the output parameters' types, the image and the
    command line. Field names are the CacheKey proto's JSON names."""
    inputs, outputs = executor_input["inputs"], executor_input["outputs"]
    key = {
        "inputArtifactNames": {
            name: {"artifactNames": [artifact["name"] for artifact in listed["artifacts"]]}
            for name, listed in inputs["artifacts"].items()},
        "inputParameterValues": inputs["parameterValues"],
        "outputArtifactsSpec": {
            name: {k: listed["artifacts"][0][k] for k in ("name", "type", "metadata")}
            for name, listed in outputs["artifacts"].items() if listed["artifacts"]},
        "outputParametersSpec": {name: output_parameter_types[name]
                                 for name in outputs["parameters"]},
        "containerSpec": {"image": container["image"],
                          "cmdArgs": [*container.get("command", []),
                                      *container.get("args", [])]},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


class _AttemptFailed(Exception):
    pass


class _PodPending(Exception):
    """The container cannot be created: the pod stays Pending with this reason and message."""


def _missing(kind: str, name: str, key: str, object_missing: bool, namespace: str) -> str:
    """What Argo shows for the Pending pod (``getPendingReason``: "<reason>: <message>"), in
    the kubelet's words: the secret/configmap manager's NotFound, or the missing key."""
    if object_missing:
        return f'{POD_CONFIG_ERROR}: {kind.lower()} "{name}" not found'
    return f"{POD_CONFIG_ERROR}: couldn't find key {key} in {kind} {namespace}/{name}"


def _host_path(uri: str, mounts: dict[str, Path]) -> Path:
    """Where the executor sees ``uri`` (``s3://b/k`` -> ``/s3/b/k``), on the host."""
    scheme, _, rest = uri.partition("://")
    inside = {"s3": "/s3", "minio": "/minio", "gs": "/gcs"}.get(scheme)
    if inside is None:
        raise ThawError(f"pipeline root scheme {scheme!r} is not supported here: use s3://")
    return mounts[inside] / rest


def _stage_in(uri: str, dest: Path) -> None:
    """Download an artifact: a single object, or every object under the prefix."""
    if storage.exists(uri):
        storage.download_file(uri, dest)
    else:
        storage.download_prefix(uri, dest)


def _open_to_the_step(folders: Iterable[Path]) -> None:
    """The launcher downloads as the step's own user; this runner downloads as its own, so
    it hands the staged tree over (the image runs as an unprivileged user)."""
    for folder in folders:
        for path in folder.rglob("*"):
            path.chmod(0o777 if path.is_dir() else 0o666)


def _stage_out(local: Path, uri: str) -> None:
    if local.is_dir():
        storage.upload_dir(local, uri)
    else:
        storage.upload_file(local, uri)


def _coerce(value: Any, parameter_type: str, name: str) -> Any:
    """Parameter values as the KFP driver passes them (integers stored as 64.0 in YAML)."""
    try:
        if parameter_type == "NUMBER_INTEGER":
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if parameter_type == "NUMBER_DOUBLE":
            return float(value)
        if parameter_type == "STRING":
            return str(value)
        if parameter_type == "BOOLEAN":
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise ValueError
                return value.lower() == "true"
            return bool(value)
    except (TypeError, ValueError):
        raise ThawError(f"parameter {name!r} must be {parameter_type.lower()}, "
                        f"got {value!r}") from None
    return value
