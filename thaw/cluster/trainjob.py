"""Run one training stage as a Kubeflow Trainer v2 TrainJob, follow it, and always clean up.

With ``num_nodes`` > 1 a pipeline training step becomes a thin launcher: it creates a TrainJob
(``trainer.kubeflow.org/v1alpha1``, Trainer >= ``MIN_TRAINER``) on a torch runtime running the
thaw image with the stage's command, waits for its nodes to start, streams node-0's log into
the step's log, waits for Complete or Failed, and deletes the job whatever happened.

Retries resume, they do not repeat: the job's name is ``thaw-<stage>-<run key>-<attempt>``,
labelled with the pipeline run's key and the stage, so the next attempt of the step finds the
jobs of the earlier ones (a launcher killed hard leaves its job behind) and deletes them, their
pods included, before creating its own. The job has a deadline (``activeDeadlineSeconds``),
the launcher's pod as owner (KFP's ``KFP_POD_NAME``/``KFP_POD_UID``), and fails fast: the
TrainJob API offers no failure policy (the runtime's JobSet has none, so JobSet fails on the
first failed Job, but each Job restarts its pods up to its default ``backoffLimit`` of 6), so
the launcher declares the job failed at the first failed or restarted node pod, reports the
cause from the pod's status and log, and deletes it; KFP's retry then resumes from the stage's
S3 checkpoint.

The body is created with strict field validation (``fieldValidation=Strict``): a field the
installed Trainer does not know is refused by the API server, naming it, instead of being
dropped. Trainer before ``MIN_TRAINER`` is refused before anything is created.

The TrainJob body is built here and created through the SDK's own Kubernetes client instead of
``TrainerClient.train()``, because ``train()`` cannot express what this needs:

- environment variables taken from Secrets and ConfigMaps: ``CustomTrainerContainer.env`` only
  holds literal values, and Trainer rejects env patches for the ``node`` container, so
  ``valueFrom`` references can only go into ``spec.trainer.env``;
- ``spec.trainer.numProcPerNode``: left to the runtime, a CPU node starts one process per CPU
  of its limit; thaw runs one process per GPU, or one per node on CPU;
- the name, deadline, owner, scratch volumes and strict field validation above.

Everything else goes through the SDK (``kubeflow`` 0.5): connection and namespace (the pod's
own in a cluster, the kubeconfig context's outside), runtime lookup, job status, node-0 logs
and deletion.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from kubeflow.common.types import KubernetesBackendConfig
from kubeflow.trainer import TrainerClient
from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
from kubeflow.trainer.backends.kubernetes.utils import get_container_devices
from kubeflow_trainer_api.models import IoK8sApiCoreV1ResourceRequirements
from kubernetes.client.exceptions import ApiException
from kubernetes.config import ConfigException

from thaw.cluster import nodes
from thaw.config import DISTRIBUTED_ENV
from thaw.errors import ThawError

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE = nodes.NODE_CONTAINER  # the runtime's trainer job and container
PATCH_MANAGER = "thaw/launcher"  # owner of thaw's entry in spec.runtimePatches
SHM_VOLUME, SCRATCH_VOLUME = "dshm", "scratch"
SCRATCH_MOUNT = "/scratch"  # the node's disk: TMPDIR (the data copy) and the shard cache
SCRATCH_ENV = {"TMPDIR": SCRATCH_MOUNT, "THAW_SHARD_CACHE": f"{SCRATCH_MOUNT}/shard-cache"}
# The first Trainer whose TrainJob has spec.runtimePatches and spec.activeDeadlineSeconds
# (manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml at v2.2.0; v2.1 had
# podTemplateOverrides, v2.0 podSpecOverrides) and the kubeflow-trainer-public ConfigMap.
MIN_TRAINER = (2, 2)
NEEDED_FIELDS = ("spec.runtimePatches", "spec.activeDeadlineSeconds")
TRAINER_CONFIG_MAP, TRAINER_VERSION_KEY = "kubeflow-trainer-public", "kubeflow_trainer_version"
# Which job is whose: the pipeline run (hashed: run ids need not be label values), the stage.
RUN_KEY_LABEL, STAGE_LABEL, ATTEMPT_LABEL = "thaw.run-key", "thaw.stage", "thaw.attempt"
OWNER_ENV = ("KFP_POD_NAME", "KFP_POD_UID")  # the launcher pod (KFP argocompiler/common.go)
RUNNING, COMPLETE, FAILED = "Running", "Complete", "Failed"
# Set by the torch runtime for torchrun; Trainer rejects a TrainJob that sets them.
RESERVED_ENV = frozenset({"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK",
                          "PET_MASTER_ADDR", "PET_MASTER_PORT"})
ENV_SOURCES = ("secretKeyRef", "configMapKeyRef")
TOLERATION_KEYS = frozenset({"key", "operator", "value", "effect", "tolerationSeconds"})
LOG_DRAIN_S = 30.0  # after the job ends, how long node-0's log may take to arrive in full
POLL_ERRORS_TOLERATED = 5  # consecutive failed status reads (API server blips) before giving up
EVENTS_SHOWN = 10


@dataclass(frozen=True)
class TrainJobRequest:
    """One stage's TrainJob. ``env`` entries are Kubernetes EnvVars: ``{"name", "value"}`` or
    ``{"name", "valueFrom": {"secretKeyRef" | "configMapKeyRef": {"name", "key"}}}``."""

    image: str
    command: Sequence[str]  # the full container command, e.g. torchrun -m thaw.stage_job ...
    pipeline_run_id: str  # with the stage, names the job and finds earlier attempts' jobs
    stage: str
    num_nodes: int
    gpus_per_node: int  # processes per node = GPUs; 0: CPU, one process per node
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str | None = None  # per node
    memory: str | None = None  # per node
    env: Sequence[Mapping[str, Any]] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    runtime: str = "torch-distributed"
    labels: Mapping[str, str] = field(default_factory=dict)
    shm: bool = True  # a memory-backed /dev/shm: DataLoader workers and NCCL need more than 64 MB
    shm_size: str | None = None  # its size limit (it counts against the node's memory limit)
    scratch: str | None = None  # per node: ephemeral-storage request/limit, scratch size limit

    def __post_init__(self) -> None:
        if not self.image:
            raise ThawError("TrainJob: no image given; pass the thaw image the nodes run "
                            "(registry/thaw:tag).")
        if not self.command:
            raise ThawError("TrainJob: no command given; pass the full container command, "
                            "e.g. ['torchrun', '-m', 'thaw.stage_job', ...].")
        if self.num_nodes < 1:
            raise ThawError(f"TrainJob: num_nodes is {self.num_nodes}; it must be 1 or more.")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", self.stage) or not \
                self.pipeline_run_id:
            raise ThawError(f"TrainJob: stage {self.stage!r} and pipeline run id "
                            f"{self.pipeline_run_id!r} name the job: give a lowercase stage "
                            "name and the KFP run id.")
        if self.gpus_per_node < 0:
            raise ThawError(f"TrainJob: gpus_per_node is {self.gpus_per_node}; use 0 for CPU "
                            "nodes or the number of GPUs each node gets.")
        _check_env(self.env)
        _check_resources(self.resources_per_node)
        for toleration in self.tolerations:
            unknown = set(toleration) - TOLERATION_KEYS
            if unknown:
                raise ThawError(f"TrainJob: toleration {dict(toleration)} has unknown fields "
                                f"{sorted(unknown)}; a toleration has {sorted(TOLERATION_KEYS)}.")

    @property
    def processes_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def resources_per_node(self) -> dict[str, str]:
        """Requested and limited alike (Kubernetes needs GPUs as limits)."""
        gpus = str(self.gpus_per_node) if self.gpus_per_node else None
        return {name: value for name, value in (
            (self.gpu_resource, gpus), ("cpu", self.cpu), ("memory", self.memory),
            ("ephemeral-storage", self.scratch)) if value}

    @property
    def run_key(self) -> str:
        return hashlib.sha256(self.pipeline_run_id.encode()).hexdigest()[:12]

    def job_name(self, attempt: int) -> str:
        """``thaw-<stage>-<run key>-<attempt>``: the same for a retried step's attempt N."""
        return f"thaw-{self.stage[:30]}-{self.run_key}-{attempt}"


def run_trainjob(request: TrainJobRequest, *, client: TrainerClient | None = None,
                 namespace: str | None = None, start_timeout_s: float, timeout_s: float,
                 poll_s: float = 5, log: Callable[[str], None] = print) -> str:
    """Delete the jobs of this step's earlier attempts, create this attempt's TrainJob, wait
    until its nodes run (within ``start_timeout_s``), stream node-0's log to ``log``, wait for
    Complete (within ``timeout_s`` from creation, also the job's own deadline) and delete the
    job in every case. Returns the job's name; raises ThawError when the job fails (at the
    first failed or restarted node), does not start or does not finish in time, naming the job,
    the failed node's cause and log, its conditions and events.

    ``client`` defaults to a TrainerClient for ``namespace`` (default: the pod's own namespace
    in a cluster, the kubeconfig context's namespace outside one)."""
    if not 0 < start_timeout_s <= timeout_s:
        raise ThawError(f"TrainJob: start_timeout_s ({start_timeout_s:g}) must be positive and "
                        f"no longer than timeout_s ({timeout_s:g}).")
    client = client or _connect(namespace)
    backend = _kubernetes_backend(client)
    _check_trainer_version(backend, log)
    runtime_kind = _runtime_kind(client, backend, request.runtime)
    attempt = _clear_earlier_attempts(backend, request, start_timeout_s, poll_s, log)
    name = request.job_name(attempt)
    job = _Job(client, backend, name, log)
    manifest = _manifest(request, name, runtime_kind, attempt, math.ceil(timeout_s))
    with _sigterm_raises_system_exit():
        created = time.monotonic()
        try:
            backend.custom_api.create_namespaced_custom_object(
                GROUP, VERSION, backend.namespace, PLURAL, manifest, field_validation="Strict")
        except ApiException as err:
            raise ThawError(f"Kubernetes refused TrainJob {job.ref}: {_api_message(err)}"
                            + _unknown_field_advice(err)) from err
        except BaseException:
            job.delete()  # the request may have reached the API server before this
            raise
        try:
            log(f"TrainJob {job.ref} created (attempt {attempt}): {request.num_nodes} node(s) x "
                f"{request.processes_per_node} process(es), runtime {request.runtime}")
            job.follow(created, start_timeout_s=start_timeout_s, timeout_s=timeout_s,
                       poll_s=poll_s)
        finally:
            job.delete()
    return name


def _check_trainer_version(backend: KubernetesBackend, log: Callable[[str], None]) -> None:
    """Refuse a Trainer older than MIN_TRAINER, whose TrainJob lacks NEEDED_FIELDS. Its version
    is in the ConfigMap Trainer >= 2.2 installs and lets every authenticated user read
    (manifests/base/rbac/public_configmap_role*.yaml); a Trainer without it is older. Unreadable
    for another reason: left to strict field validation, which names an unknown field."""
    system_namespace = os.getenv("KUBEFLOW_SYSTEM_NAMESPACE", "kubeflow-system")
    where = f"ConfigMap {system_namespace}/{TRAINER_CONFIG_MAP}"
    try:
        data = backend.core_api.read_namespaced_config_map(
            TRAINER_CONFIG_MAP, system_namespace).data or {}
    except ApiException as err:
        if err.status != 404:
            log(f"warning: cannot read Kubeflow Trainer's version from {where} "
                f"({_api_message(err)}); relying on strict field validation")
            return
        data = {}
    version = data.get(TRAINER_VERSION_KEY)
    found = re.match(r"v?(\d+)\.(\d+)", version or "")
    if found is None and version:  # a development build ("dev"): newer than any release
        return
    if found is None or (int(found[1]), int(found[2])) < MIN_TRAINER:
        installed = f"version {version}" if version else f"older than v2.2 (no {where})"
        minimum = ".".join(map(str, MIN_TRAINER))
        raise ThawError(f"Kubeflow Trainer {installed} is too old: thaw's TrainJob sets "
                        f"{' and '.join(NEEDED_FIELDS)}, which Trainer has from v{minimum}.0 "
                        f"on. Install Kubeflow Trainer >= {minimum}.")


def _unknown_field_advice(err: ApiException) -> str:
    if "unknown field" not in _api_message(err):
        return ""
    return (f". The installed Trainer's TrainJob lacks that field: thaw needs Kubeflow Trainer "
            f">= {'.'.join(map(str, MIN_TRAINER))}.")


def _clear_earlier_attempts(backend: KubernetesBackend, request: TrainJobRequest,
                            wait_s: float, poll_s: float, log: Callable[[str], None]) -> int:
    """Delete the TrainJobs that earlier attempts of this step left (pods first: foreground
    deletion, waited for, so two jobs never write the same checkpoint keys); the number of
    this attempt, one past the highest found."""
    selector = f"{RUN_KEY_LABEL}={request.run_key},{STAGE_LABEL}={request.stage}"
    try:
        found = backend.custom_api.list_namespaced_custom_object(
            GROUP, VERSION, backend.namespace, PLURAL, label_selector=selector)["items"]
    except ApiException as err:
        raise ThawError(f"could not look for earlier attempts' TrainJobs ({selector}) in "
                        f"namespace {backend.namespace}: {_api_message(err)}") from err
    attempts = [int((j["metadata"].get("labels") or {}).get(ATTEMPT_LABEL, "0")) for j in found]
    deadline = time.monotonic() + wait_s
    for job in found:
        name = job["metadata"]["name"]
        log(f"TrainJob {backend.namespace}/{name} of an earlier attempt is still there: "
            "deleting it and its pods")
        with suppress(ApiException):  # already gone counts as deleted; waited for below
            backend.custom_api.delete_namespaced_custom_object(
                GROUP, VERSION, backend.namespace, PLURAL, name,
                body={"propagationPolicy": "Foreground"})
        while _exists(backend, name):
            if time.monotonic() > deadline:
                raise ThawError(f"TrainJob {backend.namespace}/{name} of an earlier attempt "
                                f"was not gone {wait_s:g} s after its deletion; delete it with: "
                                f"kubectl -n {backend.namespace} delete trainjob {name}")
            time.sleep(poll_s)
    return max(attempts, default=0) + 1


def _exists(backend: KubernetesBackend, name: str) -> bool:
    try:
        backend.custom_api.get_namespaced_custom_object(
            GROUP, VERSION, backend.namespace, PLURAL, name)
    except ApiException as err:
        if err.status == 404:
            return False
        raise ThawError(f"reading TrainJob {backend.namespace}/{name}: "
                        f"{_api_message(err)}") from err
    return True


class _Job:
    """A created TrainJob: its status, its node-0 log, its diagnosis and its deletion."""

    def __init__(self, client: TrainerClient, backend: KubernetesBackend, name: str,
                 log: Callable[[str], None]) -> None:
        self.client, self.backend, self.name, self.log = client, backend, name, log
        self.ref = f"{backend.namespace}/{name}"
        self.failure: nodes.NodeFailure | None = None
        self.finished = threading.Event()

    def follow(self, created: float, *, start_timeout_s: float, timeout_s: float,
               poll_s: float) -> None:
        """Wait for the nodes to run, stream node-0's log, wait for the end (deadlines count
        from ``created``, a time.monotonic())."""
        deadline = created + timeout_s
        status = self._wait_for({RUNNING, COMPLETE, FAILED}, created + start_timeout_s, poll_s)
        if status is None:
            raise ThawError(self._diagnosis(
                f"did not start within {start_timeout_s:g} s",
                "Check that enough nodes have the requested GPUs, CPU, memory and "
                "ephemeral storage free and that the node selector and tolerations match them; "
                "raise the start timeout where nodes are added on demand."))
        streamer = threading.Thread(target=self._stream_node0_log, daemon=True,
                                    name=f"log-{self.name}")
        if status == RUNNING:
            self.log(f"TrainJob {self.ref} is {status}; node-0's log follows")
            streamer.start()
            status = self._wait_for({COMPLETE, FAILED}, deadline, poll_s)
        self.finished.set()
        if status is None:
            raise ThawError(self._diagnosis(
                f"timed out: not finished {timeout_s:g} s after its creation",
                "Raise the stage's timeout if the training needs longer."))
        if streamer.is_alive():
            streamer.join(timeout=max(0.0, min(LOG_DRAIN_S, deadline - time.monotonic())))
        if status == FAILED:
            raise ThawError(self._diagnosis(
                "failed", "Not restarted in place: the step's retry (if any) resumes from the "
                          "stage's last checkpoint."))
        self.log(f"TrainJob {self.ref} completed")

    def delete(self) -> None:
        """Delete the job; a failure is logged, never raised over the error in flight."""
        try:
            self.client.delete_job(self.name)
        except Exception as err:  # noqa: BLE001 - must not hide the original error
            if _status_code(err) == 404:
                return
            self.log(f"warning: could not delete TrainJob {self.ref} ({_api_message(err)}); "
                     f"delete it with: kubectl -n {self.backend.namespace} delete trainjob "
                     f"{self.name}")
        else:
            self.log(f"TrainJob {self.ref} deleted")

    def _wait_for(self, wanted: set[str], deadline: float, poll_s: float) -> str | None:
        """Poll the job's status until it is one of ``wanted`` (returned) or the deadline
        passes (None). A node pod that failed or restarted makes it FAILED at once. A few
        consecutive failed reads are tolerated: one API server blip must not end (and so
        delete) a training run of hours."""
        errors = 0
        while True:
            try:
                status = self._status()
                errors = 0
            except (RuntimeError, TimeoutError, ApiException) as err:
                errors += 1
                if errors >= POLL_ERRORS_TOLERATED:
                    raise ThawError(f"TrainJob {self.ref}: reading its status failed "
                                    f"{errors} times in a row ({_api_message(err)}).") from err
                self.log(f"warning: reading TrainJob {self.ref} failed ({_api_message(err)}); "
                         "retrying")
                status = None
            if status in wanted:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(poll_s, left))

    def _status(self) -> str:
        status = self.client.get_job(self.name).status
        if status == COMPLETE:
            return status
        self.failure = nodes.first_failure(nodes.node_pods(
            self.backend.core_api, self.backend.namespace, self.name))
        return FAILED if self.failure else status

    def _stream_node0_log(self) -> None:
        try:
            for line in self.client.get_job_logs(self.name, follow=True):
                self.log(line)
        except Exception as err:  # noqa: BLE001 - the job is still watched without its log
            self.log(f"warning: streaming node-0's log of TrainJob {self.ref} stopped "
                     f"({_api_message(err)}); still waiting for the job")
            return
        if not self.finished.is_set():
            self.log(f"warning: node-0's log of TrainJob {self.ref} ended before the job did "
                     "(its container stopped or restarted); the cause follows when the job ends")

    def _diagnosis(self, what: str, advice: str) -> str:
        """The error message: status, nodes, the failed node's cause and log, conditions and
        recent events, read now (the job is deleted right after)."""
        parts = [f"TrainJob {self.ref} {what}."]
        with suppress(Exception):
            job = self.client.get_job(self.name)
            steps = ", ".join(f"{s.name} {s.status}" for s in job.steps) or "no pods yet"
            parts.append(f"Status {job.status}; nodes: {steps}.")
        parts.extend(self._root_cause())
        parts.extend(self._conditions())
        parts.append(self._events())
        parts.append(advice)
        return "\n".join(parts)

    def _root_cause(self) -> list[str]:
        core, namespace = self.backend.core_api, self.backend.namespace
        try:
            failure = self.failure or nodes.first_failure(
                nodes.node_pods(core, namespace, self.name))
        except Exception as err:  # noqa: BLE001 - best effort, inside an error message
            return [f"(node pods unavailable: {_api_message(err)})"]
        if failure is None:
            return []
        lines = [f"First failure: {failure.cause}."]
        try:
            tail = nodes.log_tail(core, namespace, failure)
        except Exception as err:  # noqa: BLE001 - best effort, inside an error message
            return [*lines, f"(its log is unavailable: {_api_message(err)})"]
        which = "before its restart" if failure.restarted else "last lines"
        return [*lines, f"{failure.pod} log ({which}):\n{tail}"]

    def _conditions(self) -> list[str]:
        try:
            job = self.backend.custom_api.get_namespaced_custom_object(
                GROUP, VERSION, self.backend.namespace, PLURAL, self.name)
        except Exception as err:  # noqa: BLE001 - best effort, inside an error message
            return [f"(conditions unavailable: {_api_message(err)})"]
        conditions = (job.get("status") or {}).get("conditions") or []
        return [f"{c.get('type')} ({c.get('reason')}): {c.get('message')}"
                for c in conditions if c.get("status") == "True"]

    def _events(self) -> str:
        try:
            events = nodes.job_events(self.backend.core_api, self.backend.namespace, self.name,
                                      EVENTS_SHOWN)
        except Exception as err:  # noqa: BLE001 - best effort, inside an error message
            return f"(events unavailable: {_api_message(err)})"
        if not events:
            return "No events."
        return "Recent events:\n" + "\n".join(f"  {e}" for e in events)


def _manifest(request: TrainJobRequest, name: str, runtime_kind: str, attempt: int,
              deadline_s: int) -> dict[str, Any]:
    """The TrainJob as created (valid for the TrainJob CRD of every Trainer from MIN_TRAINER)."""
    trainer: dict[str, Any] = {
        "image": request.image,
        "command": list(request.command),
        "numNodes": request.num_nodes,
        "numProcPerNode": request.processes_per_node,
        "env": _env(request.env),
    }
    resources = request.resources_per_node
    if resources:
        trainer["resourcesPerNode"] = {"requests": resources, "limits": dict(resources)}
    node_job = {"name": NODE, "template": {"spec": {"template": {"spec": _pod_spec_patch(
        request)}}}}
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": runtime_kind, "name": request.runtime},
        "trainer": trainer,
        # Counted by Trainer from the job's start; the launcher's timeout from its creation.
        "activeDeadlineSeconds": deadline_s,
        "runtimePatches": [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node_job]}}},
        }],
    }
    metadata: dict[str, Any] = {"name": name, "labels": {
        "app.kubernetes.io/part-of": "thaw", **request.labels, RUN_KEY_LABEL: request.run_key,
        STAGE_LABEL: request.stage, ATTEMPT_LABEL: str(attempt)}}
    owner = [os.environ.get(key, "") for key in OWNER_ENV]
    if all(owner):  # the launcher pod: deleting it (KFP's pod GC) deletes the job
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": owner[0],
                                        "uid": owner[1]}]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob", "metadata": metadata,
            "spec": spec}


def _pod_spec_patch(request: TrainJobRequest) -> dict[str, Any]:
    """Scheduling, scratch disk and /dev/shm for the node pods (the pipeline's GPU scheduling
    settings; the scratch emptyDir counts against the ephemeral-storage request and limit)."""
    spec: dict[str, Any] = {}
    if request.node_selector:
        spec["nodeSelector"] = dict(request.node_selector)
    if request.tolerations:
        spec["tolerations"] = [dict(t) for t in request.tolerations]
    volumes = [(SCRATCH_VOLUME, SCRATCH_MOUNT, _empty_dir(None, request.scratch))]
    if request.shm:
        # Memory-backed: it counts against the node's memory limit, as the pipeline's own is.
        volumes.append((SHM_VOLUME, "/dev/shm", _empty_dir("Memory", request.shm_size)))
    spec["volumes"] = [{"name": name, "emptyDir": empty_dir} for name, _, empty_dir in volumes]
    spec["containers"] = [{"name": NODE, "volumeMounts": [
        {"name": name, "mountPath": path} for name, path, _ in volumes]}]
    return spec


def _empty_dir(medium: str | None, size_limit: str | None) -> dict[str, str]:
    return {key: value for key, value in (("medium", medium), ("sizeLimit", size_limit))
            if value}


def _env(env: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """DISTRIBUTED_ENV and the scratch folders, then the request's (which wins on a shared
    name)."""
    given = {e["name"] for e in env}
    defaults = [{"name": k, "value": v} for k, v in {**DISTRIBUTED_ENV, **SCRATCH_ENV}.items()
                if k not in given]
    return defaults + [dict(e) for e in env]


def _check_env(env: Sequence[Mapping[str, Any]]) -> None:
    names: set[str] = set()
    for entry in env:
        name = entry.get("name")
        if not name:
            raise ThawError(f"TrainJob env entry {dict(entry)} has no name.")
        if name in names:
            raise ThawError(f"TrainJob env {name} is given twice; give each name once.")
        names.add(name)
        if name in RESERVED_ENV:
            raise ThawError(f"TrainJob env {name} is set by the torch runtime (torchrun's "
                            "PET_* flags); leave it out.")
        has_value, source = "value" in entry, entry.get("valueFrom")
        if has_value == (source is not None):
            raise ThawError(f"TrainJob env {name} needs exactly one of 'value' or 'valueFrom'.")
        if source is None:
            if not isinstance(entry["value"], str):
                raise ThawError(f"TrainJob env {name}: the value must be a string, got "
                                f"{entry['value']!r}.")
            continue
        refs = [k for k in ENV_SOURCES if k in source]
        if len(refs) != 1 or len(source) != 1 or not {"name", "key"} <= set(source[refs[0]]):
            raise ThawError(f"TrainJob env {name}: valueFrom must be one of "
                            f"{', '.join(ENV_SOURCES)} with a name and a key, got {source}.")


def _check_resources(resources: dict[str, str]) -> None:
    """The SDK reads each node's device (GPU, CPU...) from its limits and fails every status
    read of a job whose limits name none it knows (memory alone, an unknown GPU resource)."""
    if not resources:
        return
    try:
        get_container_devices(IoK8sApiCoreV1ResourceRequirements.from_dict({"limits": resources}))
    except Exception as err:  # noqa: BLE001 - the SDK raises bare Exception here
        raise ThawError(f"TrainJob resources per node {resources}: the Trainer SDK cannot tell "
                        f"the nodes' device from them ({err}); give the nodes' cpu as well.") \
            from err


def _connect(namespace: str | None) -> TrainerClient:
    try:
        return TrainerClient(KubernetesBackendConfig(namespace=namespace))
    except ConfigException as err:
        raise ThawError(f"No Kubernetes API to create the TrainJob on ({err}): run in a pod "
                        "with a service account, or set KUBECONFIG.") from err


def _kubernetes_backend(client: TrainerClient) -> KubernetesBackend:
    if not isinstance(client.backend, KubernetesBackend):
        raise ThawError(f"TrainJobs need a TrainerClient on Kubernetes, not "
                        f"{type(client.backend).__name__}.")
    return client.backend


def _runtime_kind(client: TrainerClient, backend: KubernetesBackend, name: str) -> str:
    """The runtime's kind (a namespaced TrainingRuntime wins over a ClusterTrainingRuntime, as
    in Trainer); ThawError if it is missing, unreadable or not a torch runtime."""
    try:
        runtime = client.get_runtime(name)
    except (RuntimeError, TimeoutError) as err:
        raise ThawError(
            f"Trainer runtime {name!r} could not be read in namespace {backend.namespace} or "
            f"cluster-wide ({_api_message(err)}). Install Kubeflow Trainer >= 2.2 with its "
            "runtimes or name an installed torch runtime; HTTP 403 means the pipeline's service "
            "account lacks the permissions in infra/base/trainer-rbac.yaml.") from err
    if runtime.trainer.framework != "torch":
        raise ThawError(f"Trainer runtime {name!r} is a {runtime.trainer.framework!r} runtime; "
                        "thaw's nodes run torchrun and need a torch runtime.")
    return runtime.kind.value


@contextmanager
def _sigterm_raises_system_exit() -> Iterator[None]:
    """A cancelled pipeline run stops its pods with SIGTERM, which by default ends Python
    without running ``finally``: turn it into SystemExit so the TrainJob is still deleted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _root_api_exception(err: BaseException) -> ApiException | None:
    """The ApiException behind an SDK error (the SDK re-raises them as RuntimeError)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ApiException):
            return seen
        seen = seen.__cause__
    return None


def _status_code(err: BaseException) -> int | None:
    found = _root_api_exception(err)
    return found.status if found is not None else None


def _api_message(err: BaseException) -> str:
    """What the API server said (HTTP status and its Status message), else the error text."""
    found = _root_api_exception(err)
    if found is None:
        return str(err)
    message = found.reason or ""
    with suppress(ValueError, TypeError, AttributeError):
        message = json.loads(found.body or "{}").get("message") or message
    return f"HTTP {found.status}: {message}"
