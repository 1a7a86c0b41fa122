"""Run one training stage as a Kubeflow Trainer v2 TrainJob, follow it, and always clean up.

With ``num_nodes`` > 1 a pipeline training step becomes a thin launcher: it creates a TrainJob
(``trainer.kubeflow.org/v1alpha1``, Trainer >= 2.3) on a torch runtime running the thaw image
with the stage's command, waits for its nodes to start, streams node-0's log into the step's
log, waits for Complete or Failed, and deletes the job whatever happened.

The TrainJob body is built here and created through the SDK's own Kubernetes client instead of
``TrainerClient.train()``, because ``train()`` cannot express two things this needs:

- environment variables taken from Secrets and ConfigMaps: ``CustomTrainerContainer.env`` only
  holds literal values, and Trainer rejects env patches for the ``node`` container, so
  ``valueFrom`` references can only go into ``spec.trainer.env``;
- ``spec.trainer.numProcPerNode``: left to the runtime, a CPU node starts one process per CPU
  of its limit; thaw runs one process per GPU, or one per node on CPU.

Everything else goes through the SDK (``kubeflow`` 0.5): connection and namespace (the pod's
own in a cluster, the kubeconfig context's outside), runtime lookup, job status, node-0 logs,
events and deletion.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
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

from thaw.config import DISTRIBUTED_ENV
from thaw.errors import ThawError

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE = "node"  # the runtime's trainer job and container
PATCH_MANAGER = "thaw/launcher"  # owner of thaw's entry in spec.runtimePatches
SHM_VOLUME = "dshm"
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

    def __post_init__(self) -> None:
        if not self.image:
            raise ThawError("TrainJob: no image given; pass the thaw image the nodes run "
                            "(registry/thaw:tag).")
        if not self.command:
            raise ThawError("TrainJob: no command given; pass the full container command, "
                            "e.g. ['torchrun', '-m', 'thaw.stage_job', ...].")
        if self.num_nodes < 1:
            raise ThawError(f"TrainJob: num_nodes is {self.num_nodes}; it must be 1 or more.")
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
            (self.gpu_resource, gpus), ("cpu", self.cpu), ("memory", self.memory)) if value}


def run_trainjob(request: TrainJobRequest, *, client: TrainerClient | None = None,
                 namespace: str | None = None, start_timeout_s: float, timeout_s: float,
                 poll_s: float = 5, log: Callable[[str], None] = print) -> str:
    """Create the TrainJob, wait until its nodes run (within ``start_timeout_s``), stream
    node-0's log to ``log``, wait for Complete (within ``timeout_s`` from creation) and delete
    the job in every case. Returns the job's name; raises ThawError when the job fails, does not
    start or does not finish in time, naming the job, its status, its conditions and events.

    ``client`` defaults to a TrainerClient for ``namespace`` (default: the pod's own namespace
    in a cluster, the kubeconfig context's namespace outside one)."""
    if not 0 < start_timeout_s <= timeout_s:
        raise ThawError(f"TrainJob: start_timeout_s ({start_timeout_s:g}) must be positive and "
                        f"no longer than timeout_s ({timeout_s:g}).")
    client = client or _connect(namespace)
    backend = _kubernetes_backend(client)
    runtime_kind = _runtime_kind(client, backend, request.runtime)
    name = f"thaw-{uuid.uuid4().hex[:10]}"
    job = _Job(client, backend, name, log)
    with _sigterm_raises_system_exit():
        created = time.monotonic()
        try:
            backend.custom_api.create_namespaced_custom_object(
                GROUP, VERSION, backend.namespace, PLURAL, _manifest(request, name, runtime_kind))
        except ApiException as err:
            raise ThawError(f"Kubernetes refused TrainJob {job.ref}: {_api_message(err)}") \
                from err
        except BaseException:
            job.delete()  # the request may have reached the API server before this
            raise
        try:
            log(f"TrainJob {job.ref} created: {request.num_nodes} node(s) x "
                f"{request.processes_per_node} process(es), runtime {request.runtime}")
            job.follow(created, start_timeout_s=start_timeout_s, timeout_s=timeout_s,
                       poll_s=poll_s)
        finally:
            job.delete()
    return name


class _Job:
    """A created TrainJob: its status, its node-0 log, its diagnosis and its deletion."""

    def __init__(self, client: TrainerClient, backend: KubernetesBackend, name: str,
                 log: Callable[[str], None]) -> None:
        self.client, self.backend, self.name, self.log = client, backend, name, log
        self.ref = f"{backend.namespace}/{name}"

    def follow(self, created: float, *, start_timeout_s: float, timeout_s: float,
               poll_s: float) -> None:
        """Wait for the nodes to run, stream node-0's log, wait for the end (deadlines count
        from ``created``, a time.monotonic())."""
        deadline = created + timeout_s
        status = self._wait_for({RUNNING, COMPLETE, FAILED}, created + start_timeout_s, poll_s)
        if status is None:
            raise ThawError(self._diagnosis(
                f"did not start within {start_timeout_s:g} s",
                "Check that enough nodes have the requested GPUs, CPU and memory free and that "
                "the node selector and tolerations match them; raise the start timeout where "
                "nodes are added on demand."))
        self.log(f"TrainJob {self.ref} is {status}; node-0's log follows")
        streamer = threading.Thread(target=self._stream_node0_log, daemon=True,
                                    name=f"log-{self.name}")
        streamer.start()
        status = self._wait_for({COMPLETE, FAILED}, deadline, poll_s)
        if status is None:
            raise ThawError(self._diagnosis(
                f"timed out: not finished {timeout_s:g} s after its creation",
                "Raise the stage's timeout if the training needs longer."))
        streamer.join(timeout=max(0.0, min(LOG_DRAIN_S, deadline - time.monotonic())))
        if status == FAILED:
            raise ThawError(self._diagnosis("failed", "Its node-0 log is above."))
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
        passes (None). A few consecutive failed reads are tolerated: one API server blip must
        not end (and so delete) a training run of hours."""
        errors = 0
        while True:
            try:
                status = self.client.get_job(self.name).status
                errors = 0
            except (RuntimeError, TimeoutError) as err:
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

    def _stream_node0_log(self) -> None:
        try:
            for line in self.client.get_job_logs(self.name, follow=True):
                self.log(line)
        except Exception as err:  # noqa: BLE001 - the job is still watched without its log
            self.log(f"warning: streaming node-0's log of TrainJob {self.ref} stopped "
                     f"({_api_message(err)}); still waiting for the job")

    def _diagnosis(self, what: str, advice: str) -> str:
        """The error message: status, nodes, conditions and recent events, read now (the job is
        deleted right after)."""
        parts = [f"TrainJob {self.ref} {what}."]
        with suppress(Exception):
            job = self.client.get_job(self.name)
            nodes = ", ".join(f"{s.name} {s.status}" for s in job.steps) or "no pods yet"
            parts.append(f"Status {job.status}; nodes: {nodes}.")
        parts.extend(self._conditions())
        parts.append(self._events())
        parts.append(advice)
        return "\n".join(parts)

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
            events = self.client.get_job_events(self.name)[-EVENTS_SHOWN:]
        except Exception as err:  # noqa: BLE001 - best effort, inside an error message
            return f"(events unavailable: {_api_message(err)})"
        if not events:
            return "No events."
        return "Recent events:\n" + "\n".join(
            f"  {e.involved_object_kind}/{e.involved_object_name} {e.reason}: {e.message}"
            for e in events)


def _manifest(request: TrainJobRequest, name: str, runtime_kind: str) -> dict[str, Any]:
    """The TrainJob as created (the TrainJob CRD of Trainer 2.3)."""
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
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": runtime_kind, "name": request.runtime},
        "trainer": trainer,
    }
    pod_spec = _pod_spec_patch(request)
    if pod_spec:
        node_job = {"name": NODE, "template": {"spec": {"template": {"spec": pod_spec}}}}
        spec["runtimePatches"] = [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node_job]}}},
        }]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name,
                     "labels": {"app.kubernetes.io/part-of": "thaw", **request.labels}},
        "spec": spec,
    }


def _pod_spec_patch(request: TrainJobRequest) -> dict[str, Any]:
    """Scheduling and /dev/shm for the node pods (the pipeline's GPU scheduling settings)."""
    spec: dict[str, Any] = {}
    if request.node_selector:
        spec["nodeSelector"] = dict(request.node_selector)
    if request.tolerations:
        spec["tolerations"] = [dict(t) for t in request.tolerations]
    if request.shm:
        # Memory-backed: it counts against the node's memory limit, as the pipeline's own is.
        spec["volumes"] = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}]
        spec["containers"] = [{"name": NODE, "volumeMounts": [
            {"name": SHM_VOLUME, "mountPath": "/dev/shm"}]}]
    return spec


def _env(env: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """DISTRIBUTED_ENV, then the request's (which wins on a shared name)."""
    given = {e["name"] for e in env}
    defaults = [{"name": k, "value": v} for k, v in DISTRIBUTED_ENV.items() if k not in given]
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
            f"cluster-wide ({_api_message(err)}). Install Kubeflow Trainer >= 2.3 with its "
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
