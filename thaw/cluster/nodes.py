"""What a TrainJob's node pods and events say, read with the Kubernetes client: the first
failure of any node (fail fast: a restart in place counts as one) and its root cause from the
pod's status, and the events of the job's objects.

Trainer copies JobSet's condition onto the TrainJob, and JobSet's is a fixed text
("jobset failed due to one or more job failures (first failed job: ...)", sigs.k8s.io/jobset
pkg/controllers/failure_policy.go), so the cause has to come from the pods. Events are read
directly: the Trainer SDK drops events without ``firstTimestamp``, and the scheduler's
``FailedScheduling`` events (events.k8s.io, ``eventTime`` only) have none
(kubernetes/kubernetes#80219)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubernetes.client import CoreV1Api

JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # on every pod of the job's JobSet
JOB_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
NODE_CONTAINER = "node"
LOG_TAIL_LINES = 30
SIGTERM_EXIT = 128 + 15


@dataclass(frozen=True)
class NodeFailure:
    """A node pod that failed once: its name, what its status says, and whether its container
    restarted in place (its earlier run's log is then the ``previous`` one)."""

    pod: str
    cause: str
    restarted: bool


def node_pods(core: CoreV1Api, namespace: str, job: str) -> list[Any]:
    return core.list_namespaced_pod(namespace, label_selector=f"{JOBSET_NAME_LABEL}={job}").items


def first_failure(pods: list[Any]) -> NodeFailure | None:
    """The node pod that failed or whose container restarted, else None; of several, one that
    did not just stop on SIGTERM (exit code 143: stopped because another node failed)."""
    failed = [(pod, _node_container(pod)) for pod in pods if _failed(pod)]
    if not failed:
        return None
    pod, container = min(failed, key=lambda found: (
        getattr(_ended(found[1]), "exit_code", None) == SIGTERM_EXIT, found[0].metadata.name))
    status, restarts = pod.status, container.restart_count if container else 0
    parts = [f"pod {pod.metadata.name} {status.phase}"]
    if status.reason or status.message:  # e.g. Evicted: the node was low on ephemeral-storage
        parts.append(f"{status.reason or ''}: {status.message or ''}".strip(": "))
    ended = _ended(container)
    if ended:
        parts.append(f"container {NODE_CONTAINER} {ended.reason or 'terminated'} "
                     f"(exit code {ended.exit_code})"
                     + (f": {ended.message.strip()}" if ended.message else ""))
    if restarts:
        parts.append(f"restarted {restarts} time(s) in place")
    return NodeFailure(pod.metadata.name, "; ".join(parts), restarted=bool(restarts))


def _node_container(pod: Any) -> Any:
    return next((c for c in pod.status.container_statuses or [] if c.name == NODE_CONTAINER),
                None)


def _failed(pod: Any) -> bool:
    container = _node_container(pod)
    return pod.status.phase == "Failed" or bool(container and container.restart_count)


def _ended(container: Any) -> Any:
    """How the node container's current (else its previous) run ended; None if it did not."""
    if container is None:
        return None
    return (container.state and container.state.terminated) or \
        (container.last_state and container.last_state.terminated)


def log_tail(core: CoreV1Api, namespace: str, failure: NodeFailure) -> str:
    """The last lines the failed node wrote (its run before the restart, if it restarted)."""
    text = core.read_namespaced_pod_log(failure.pod, namespace, container=NODE_CONTAINER,
                                        previous=failure.restarted, tail_lines=LOG_TAIL_LINES)
    return text.rstrip("\n")


def job_events(core: CoreV1Api, namespace: str, job: str, limit: int) -> list[str]:
    """The job's events (TrainJob, JobSet, Jobs, pods: all named ``<job>`` or ``<job>-...``),
    oldest first, as ``Kind/name Reason: message``."""
    found = [e for e in core.list_namespaced_event(namespace).items
             if e.involved_object and e.involved_object.name
             and (e.involved_object.name == job or e.involved_object.name.startswith(f"{job}-"))]
    found.sort(key=_when)
    return [f"{e.involved_object.kind}/{e.involved_object.name} {e.reason}: {e.message}"
            + (f" (x{e.count})" if e.count and e.count > 1 else "") for e in found[-limit:]]


def _when(event: Any) -> datetime:
    """When an event last happened: core/v1 events carry lastTimestamp, events.k8s.io ones
    (the scheduler's) eventTime only; creationTimestamp is always set."""
    return event.last_timestamp or event.event_time or event.metadata.creation_timestamp
