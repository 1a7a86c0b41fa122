"""The cluster-fidelity runner: executes a compiled pipeline YAML the way a Kubeflow cluster
does, so that what only a cluster shows fails here too.

``kfp.local`` runs every step in one process tree on one filesystem and ignores the
image, the Kubernetes platform spec, retries and caching. This runner instead, for every
task of the compiled spec, in dependency order:

- resolves its inputs (pipeline parameters, constants, upstream outputs, the run id);
- looks it up in the cache when the task enables caching, by KFP's key: the component
  spec, the container, the input parameter values and the input artifacts' URIs;
- stages its input artifacts from the S3 pipeline root into fresh folders mounted at
  ``/s3`` (as the KFP launcher does), and nothing else;
- starts the very container command line of the spec (``{{$}}`` = the executor input) in
  a fresh sandbox (a container of the image, or bubblewrap), with the environment its
  Kubernetes platform spec maps from Secrets and ConfigMaps (which this runner plays);
- uploads its output artifacts to the pipeline root only when it succeeded;
- retries it by its retry policy, each attempt with empty output folders;
- runs the exit handler's task after the handler's DAG, with its final status.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from thaw import storage
from thaw.errors import ThawError
from thawctl.console import error_message, highlight
from thawctl.sandbox import STAGING_MOUNTS, Sandbox, StepProcess, venv_env

log = logging.getLogger(__name__)

EXECUTOR_OUTPUT = "/tmp/kfp_outputs/output_metadata.json"
ALL_UPSTREAM_COMPLETED = "ALL_UPSTREAM_TASKS_COMPLETED"
CACHE_FOLDER = ".thaw-cache"
# The launcher records these artifacts' metadata only; they need no file.
METADATA_ONLY = ("system.Metrics", "system.ClassificationMetrics",
                 "system.SlicedClassificationMetrics")
OnStarted = Callable[[str, int, StepProcess], None]


@dataclass
class TaskOutcome:
    """What happened to one task: its state, outputs, attempts and log."""

    name: str
    display_name: str
    state: str  # SUCCEEDED, FAILED, SKIPPED, CACHED
    attempts: int = 0
    seconds: float = 0.0
    log: str = ""
    error: str = ""
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {uri, ...}
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    run_id: str
    state: str
    tasks: dict[str, TaskOutcome]

    def failed_task(self) -> TaskOutcome | None:
        return next((t for t in self.tasks.values() if t.state == "FAILED"), None)


@dataclass
class ClusterPlay:
    """The cluster objects the runner stands in for: Secrets and ConfigMaps by name."""

    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)


class FidelityRunner:
    """Runs compiled pipeline specs step by step, each step isolated (see module doc)."""

    def __init__(self, sandbox: Sandbox, cluster: ClusterPlay, *, pipeline_root: str,
                 work_dir: Path, on_started: OnStarted | None = None,
                 echo: Callable[[str], None] = print) -> None:
        self.sandbox = sandbox
        self.cluster = cluster
        self.default_root = pipeline_root.rstrip("/")
        self.work_dir = Path(work_dir)
        self.on_started = on_started
        self.echo = echo

    def run(self, spec_path: Path, parameters: dict[str, Any] | None = None,
            run_id: str | None = None) -> RunResult:
        docs = list(yaml.safe_load_all(Path(spec_path).read_text()))
        spec = docs[0]
        platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] \
            if len(docs) > 1 and docs[1] else {}
        run = _Run(self, spec, platform, run_id or str(uuid.uuid4()))
        root_inputs = run.pipeline_inputs(parameters or {})
        state = run.run_dag(spec["root"]["dag"], root_inputs, scope="")
        return RunResult(run.run_id, state, run.outcomes)


class _Run:
    def __init__(self, runner: FidelityRunner, spec: dict[str, Any],
                 platform: dict[str, Any], run_id: str) -> None:
        self.runner = runner
        self.spec = spec
        self.platform = platform
        self.run_id = run_id
        self.name = spec["pipelineInfo"]["name"]
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

    def _resolve_parameter(self, spec: dict[str, Any], scope_inputs: dict[str, Any],
                           scope: str, status: dict[str, Any] | None) -> Any:
        if "componentInputParameter" in spec:
            return scope_inputs[spec["componentInputParameter"]]
        if "runtimeValue" in spec:
            value = spec["runtimeValue"]["constant"]
            if isinstance(value, str):
                value = value.replace("{{$.pipeline_job_uuid}}", self.run_id)
                value = value.replace("{{$.pipeline_job_name}}", f"{self.name}-{self.run_id}")
            return value
        if "taskOutputParameter" in spec:
            ref = spec["taskOutputParameter"]
            return self.outcomes[scope + ref["producerTask"]].parameters[ref["outputParameterKey"]]
        if "taskFinalStatus" in spec:
            return status
        raise ThawError(f"unsupported parameter input {spec}")

    # -- DAG ------------------------------------------------------------------------------
    def run_dag(self, dag: dict[str, Any], inputs: dict[str, Any], scope: str) -> str:
        tasks = dag["tasks"]
        order = _topological(tasks)
        state = "SUCCEEDED"
        for name in order:
            task = tasks[name]
            upstream = [scope + d for d in task.get("dependentTasks", [])]
            upstream_failed = any(self.outcomes[u].state in ("FAILED", "SKIPPED")
                                  for u in upstream)
            trigger = task.get("triggerPolicy", {}).get("strategy")
            if upstream_failed and trigger != ALL_UPSTREAM_COMPLETED:
                self.outcomes[scope + name] = TaskOutcome(
                    scope + name, task["taskInfo"]["name"], "SKIPPED")
                continue
            status = None
            if trigger == ALL_UPSTREAM_COMPLETED and upstream:
                producer = upstream[0]
                status = {"state": "FAILED" if upstream_failed else "SUCCEEDED",
                          "pipelineJobResourceName": f"{self.name}-{self.run_id}",
                          "pipelineTaskName": producer, "error": {}}
            outcome = self.run_task(name, task, inputs, scope, status)
            if outcome.state == "FAILED":
                state = "FAILED"
        return state

    def run_task(self, name: str, task: dict[str, Any], scope_inputs: dict[str, Any],
                 scope: str, status: dict[str, Any] | None) -> TaskOutcome:
        component = self.spec["components"][task["componentRef"]["name"]]
        params = {key: self._resolve_parameter(value, scope_inputs, scope, status)
                  for key, value in task.get("inputs", {}).get("parameters", {}).items()}
        display = task["taskInfo"]["name"]
        if "dag" in component:  # a sub-DAG (the exit handler's body)
            started = time.monotonic()
            state = self.run_dag(component["dag"], params, scope=f"{scope}{name}/")
            outcome = TaskOutcome(scope + name, display, state,
                                  seconds=time.monotonic() - started)
            self.outcomes[scope + name] = outcome
            return outcome
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
        outcome = step.execute()
        self.outcomes[scope + name] = outcome
        return outcome


class _Step:
    """One container task: cache lookup, attempts, staging, upload."""

    def __init__(self, run: _Run, name: str, display: str, task: dict[str, Any],
                 component: dict[str, Any], params: dict[str, Any],
                 artifacts: dict[str, dict[str, Any]]) -> None:
        self.run = run
        self.name = name
        self.display = display
        self.task = task
        self.component = component
        self.params = params
        self.inputs = artifacts
        executor = component["executorLabel"]
        self.container = run.spec["deploymentSpec"]["executors"][executor]["container"]
        self.platform = run.platform.get(executor, {})
        self.log = run.logs / f"{name.replace('/', '.')}.log"
        self.out_root = f"{run.root}/{run.name}/{run.run_id}/{name.split('/')[-1]}"

    def execute(self) -> TaskOutcome:
        echo = self.run.runner.echo
        started = time.monotonic()
        cached = self._cache_lookup()
        if cached is not None:
            echo(f"= {self.display}: cache hit, outputs of an earlier run reused")
            return TaskOutcome(self.name, self.display, "CACHED", 0, 0.0, str(self.log),
                               artifacts=cached["artifacts"], parameters=cached["parameters"])
        policy = self.task.get("retryPolicy", {})
        attempts = 1 + int(policy.get("maxRetryCount", 0))
        delay = _seconds(policy.get("backoffDuration", "0s"))
        limit = _seconds(policy.get("backoffMaxDuration", "3600s"))
        error = ""
        for attempt in range(1, attempts + 1):
            tries = f" (attempt {attempt}/{attempts})" if attempt > 1 else ""
            echo(f"▶ {self.display}{tries}  (log {self.log})")
            try:
                outputs = self._attempt(attempt)
            except (_AttemptFailed, ThawError) as err:
                error = str(err)
                echo(f"✘ {self.display} attempt {attempt} failed: {error}")
                if attempt < attempts:
                    time.sleep(min(delay, limit))
                    delay *= float(policy.get("backoffFactor", 2.0))
                continue
            outcome = TaskOutcome(self.name, self.display, "SUCCEEDED", attempt,
                                  time.monotonic() - started, str(self.log), **outputs)
            self._cache_store(outputs)
            echo(f"✔ {self.display} succeeded in {outcome.seconds:.0f} s")
            return outcome
        return TaskOutcome(self.name, self.display, "FAILED", attempts,
                           time.monotonic() - started, str(self.log), error=error)

    # -- one attempt ----------------------------------------------------------------------
    def _attempt(self, attempt: int) -> dict[str, Any]:
        work = Path(tempfile.mkdtemp(prefix=f"{self.name.split('/')[-1]}-{attempt}-",
                                     dir=self.run.runner.work_dir))
        try:
            mounts = {inside: work / inside.strip("/").replace("/", "_")
                      for inside in STAGING_MOUNTS}
            for folder in mounts.values():
                folder.mkdir()
                folder.chmod(0o777)  # emptyDirs are world-writable; the image runs as uid 1000
            executor_input = self._executor_input()
            for artifact in self.inputs.values():
                _stage_in(artifact["uri"], _host_path(artifact["uri"], mounts))
            _open_to_the_step(mounts.values())
            command = [part.replace("{{$}}", json.dumps(executor_input))
                       for part in self.container.get("command", []) + self.container.get(
                           "args", [])]
            env = self._environment()
            sandbox = self.run.runner.sandbox
            if sandbox.engine == "bwrap":
                env = {**venv_env(), **env}
            process = sandbox.start(
                name=f"thaw-{self.run.run_id[:8]}-{self.name.split('/')[-1]}-{attempt}",
                image=self.container["image"], command=command, env=env, mounts=mounts,
                log=self.log)
            if self.run.runner.on_started:
                self.run.runner.on_started(self.name.split("/")[-1], attempt, process)
            code = self._follow(process)
            if code != 0:
                raise _AttemptFailed(
                    f"exit code {code}: {error_message(self.log.read_text(errors='replace'))}")
            return self._collect(executor_input, mounts)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _follow(self, process: StepProcess) -> int:
        """Wait for the step, echoing its epoch and summary lines as they are logged."""
        echo = self.run.runner.echo
        with open(self.log, errors="replace") as log:
            log.seek(0, 2)
            while True:
                code = process.popen.poll()
                for line in log.readlines():
                    if (shown := highlight(line.rstrip("\n"))) is not None:
                        echo(shown)
                if code is not None:
                    return code
                time.sleep(0.5)

    def _executor_input(self) -> dict[str, Any]:
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
                    "uri": f"{self.out_root}/{key}", "metadata": {}}]}
                    for key, definition in outputs.get("artifacts", {}).items()},
                "outputFile": EXECUTOR_OUTPUT,
            },
        }

    def _environment(self) -> dict[str, str]:
        """What the pod's env would be: the container's own env, then the Secret and
        ConfigMap keys its platform spec maps (a missing one fails like a pod that cannot
        start: CreateContainerConfigError)."""
        env = {item["name"]: item["value"] for item in self.container.get("env", [])}
        cluster = self.run.runner.cluster
        for kind, store, name_key, key_key in (
                ("secretAsEnv", cluster.secrets, "secretName", "secretKey"),
                ("configMapAsEnv", cluster.config_maps, "configMapName", "configMapKey")):
            for mapping in self.platform.get(kind, []):
                source_name = mapping[name_key]
                source = store.get(source_name)
                for pair in mapping["keyToEnv"]:
                    if source is None or pair[key_key] not in source:
                        if mapping.get("optional"):
                            continue
                        raise _AttemptFailed(
                            f"step {self.display!r} cannot start: {kind[:-5]} "
                            f"{source_name!r} has no key {pair[key_key]!r} "
                            "(CreateContainerConfigError on a cluster)")
                    env[pair["envVar"]] = source[pair[key_key]]
        return env

    def _collect(self, executor_input: dict[str, Any], mounts: dict[str, Path]) -> dict:
        """Read the executor's output metadata and upload every output artifact."""
        metadata_file = mounts["/tmp/kfp_outputs"] / Path(EXECUTOR_OUTPUT).name
        written = json.loads(metadata_file.read_text()) if metadata_file.exists() else {}
        artifacts = {}
        for key, entry in executor_input["outputs"]["artifacts"].items():
            artifact = dict(entry["artifacts"][0])
            reported = written.get("artifacts", {}).get(key, {}).get("artifacts", [{}])[0]
            artifact["metadata"] = reported.get("metadata", {})
            local = _host_path(artifact["uri"], mounts)
            if local.exists():
                artifacts[key] = artifact
            elif artifact["type"]["schemaTitle"] in METADATA_ONLY:
                artifacts[key] = {**artifact, "uri": ""}
            else:
                raise _AttemptFailed(f"output artifact {key!r} was not written")
        for artifact in artifacts.values():  # only once every output is there
            if artifact["uri"]:
                _stage_out(_host_path(artifact["uri"], mounts), artifact["uri"])
        return {"artifacts": artifacts, "parameters": written.get("parameterValues", {})}

    # -- cache ----------------------------------------------------------------------------
    def _cache_key(self) -> str:
        key = {"component": self.component, "container": {
            k: self.container.get(k) for k in ("image", "command", "args")},
            "parameters": self.params,
            "artifacts": {k: v["uri"] for k, v in sorted(self.inputs.items())}}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def _cache_uri(self) -> str:
        return f"{self.run.root}/{CACHE_FOLDER}/{self._cache_key()}.json"

    def _cache_lookup(self) -> dict[str, Any] | None:
        if not self.task.get("cachingOptions", {}).get("enableCache"):
            return None
        uri = self._cache_uri()
        if not storage.exists(uri):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(storage.download_file(uri, Path(tmp) / "entry").read_text())

    def _cache_store(self, outputs: dict[str, Any]) -> None:
        if not self.task.get("cachingOptions", {}).get("enableCache"):
            return
        with tempfile.TemporaryDirectory() as tmp:
            entry = Path(tmp) / "entry.json"
            entry.write_text(json.dumps(outputs))
            storage.upload_file(entry, self._cache_uri())


class _AttemptFailed(Exception):
    pass


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


def _open_to_the_step(folders) -> None:
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


def _topological(tasks: dict[str, Any]) -> list[str]:
    """Task names in an order where every task comes after those it depends on."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ThawError(f"cycle in the pipeline DAG at {name!r}")
        visiting.add(name)
        for dependency in sorted(tasks[name].get("dependentTasks", [])):
            visit(dependency)
        visiting.discard(name)
        order.append(name)

    for name in sorted(tasks):
        visit(name)
    return order


def _seconds(duration: str) -> float:
    return float(str(duration).rstrip("s") or 0)
