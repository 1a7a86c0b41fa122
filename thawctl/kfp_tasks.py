"""Thaw's stages in a run's task details (v2beta1 ``run_details.task_details``), read the way
a real Kubeflow Pipelines backend writes them.

The API server copies them from the run's Argo workflow nodes (``toModelTasks`` /
``toApiPipelineTaskDetail`` in ``backend/src/apiserver/server/api_converter.go``, the same at
2.14.0-2.17.0): one detail per node, sorted by node id; ``display_name`` is the Argo node's
(the workflow's name for the top node, ``root``, ``<task>-driver``, ``<task>``, ``executor``,
``executor(<attempt>)``, ``<task>.onExit``), never the task's display name; ``state`` is the
node phase in v2 terms; no ``error`` and no pod name; ``child_tasks`` hold the children's Argo
node ids. The KFP compiler makes each container task a driver pod ``<task>-driver`` and a DAG
``<task>`` around the ``executor`` pod (``backend/src/v2/compiler/argocompiler/dag.go``,
``container.go``). So a stage is found by its KFP task name in the compiled spec, and its pods
by recomputing Argo's node ids (``Workflow.NodeID``) and pod names (``RetrievePodName``, Argo's
default v2 pod names).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

EXIT_STRATEGY = "ALL_UPSTREAM_TASKS_COMPLETED"  # the trigger policy of an exit handler's task
DRIVER_TEMPLATE = "system-container-driver"
STAGE_PARAMETER = "stage"  # the training component's input that names its stage


@dataclass(frozen=True)
class SpecTask:
    """A container task of the compiled spec: its KFP name, display name (``title``), the Argo
    node name below the workflow's (``node``, e.g. ``root.exit-handler-1.train-2``), whether
    it retries (its executor template is then ``retry-system-container-impl``) and the name a
    person knows it by (``step``, see :func:`step_name`)."""

    name: str
    title: str
    node: str
    retried: bool
    step: str

    @property
    def executor_template(self) -> str:
        return ("retry-" if self.retried else "") + "system-container-impl"


def spec_tasks(spec: dict[str, Any]) -> list[SpecTask]:
    """The container tasks of a compiled pipeline spec, in the spec's (sorted) order."""
    return list(_walk(spec, spec["root"]["dag"], "root"))


def step_name(name: str, task: dict[str, Any]) -> str:
    """The name a person knows the task ``name`` (its spec ``task``) by: a training task's
    stage, the ``stage`` constant it passes (probe, partial, full), else its KFP task name
    (preprocess, evaluate, ...). KFP names the tasks of one component ``train``, ``train-2``,
    ``train-3`` (``Pipeline.add_task`` in kfp/dsl/pipeline_context.py, 2.17.0: unique in the
    whole pipeline), and ``kfp.local`` prints those; the KFP UI shows the display names."""
    stage = task.get("inputs", {}).get("parameters", {}).get(STAGE_PARAMETER, {})
    constant = stage.get("runtimeValue", {}).get("constant")
    return constant if isinstance(constant, str) and constant else name


def step_names(spec: dict[str, Any]) -> dict[str, str]:
    """KFP task name -> :func:`step_name`, for every container task of a compiled spec."""
    return {task.name: task.step for task in spec_tasks(spec)}


def _walk(spec: dict[str, Any], dag: dict[str, Any], node: str) -> Iterator[SpecTask]:
    tasks = dag.get("tasks", {})
    for name in sorted(tasks):
        task = tasks[name]
        # an exit task runs in the onExit node of the task it waits for (Argo's runOnExitNode)
        exits = task.get("triggerPolicy", {}).get("strategy") == EXIT_STRATEGY
        parent = f"{node}.{task['dependentTasks'][0]}.onExit" if exits else node
        component = spec["components"][task["componentRef"]["name"]]
        if "dag" in component:
            yield from _walk(spec, component["dag"], f"{parent}.{name}")
        else:
            yield SpecTask(name, task.get("taskInfo", {}).get("name", name),
                           f"{parent}.{name}", "retryPolicy" in task, step_name(name, task))


def node_id(workflow: str, node_name: str) -> str:
    """Argo's ``Workflow.NodeID``: the workflow's name and the FNV-1a hash of the node's name
    (``pkg/apis/workflow/v1alpha1/workflow_types.go``)."""
    if node_name == workflow:
        return workflow
    digest = 0x811C9DC5
    for byte in node_name.encode():
        digest = ((digest ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f"{workflow}-{digest}"


def pod_name(workflow: str, node_name: str, template: str) -> str:
    """Argo's pod name for a node (``RetrievePodName`` in KFP's
    ``backend/src/common/util/workflow.go``; pod names v2)."""
    return f"{workflow}-{template}-{node_id(workflow, node_name).rsplit('-', 1)[1]}"


@dataclass(frozen=True)
class Stage:
    """A spec task as the run shows it: its state (its DAG node's, else its driver's; None
    before either exists), whether it was the driver that failed, and the pods that ran."""

    task: SpecTask
    state: str | None
    driver_failed: bool
    pods: tuple[str, ...]

    def describe(self) -> str:
        state = self.state or "PENDING"
        attempts = sum(1 for pod in self.pods if DRIVER_TEMPLATE not in pod)
        return (f"{state} (its driver, before the step started)" if self.driver_failed
                else f"{state} (attempt {attempts})" if attempts > 1 else state)


def stages(run: Any, tasks: list[SpecTask]) -> list[Stage]:
    """Each spec task's stage in ``run``'s task details."""
    details = list(run.run_details.task_details or []) if run.run_details else []
    by_name = {d.display_name: d for d in details if d.display_name}
    children = {c.pod_name for d in details for c in d.child_tasks or [] if c.pod_name}
    workflow = _workflow_name(details)
    found = []
    for task in tasks:
        node, driver = by_name.get(task.name), by_name.get(task.name + "-driver")
        driver_failed = driver is not None and driver.state == "FAILED" and node is None
        state = (node or driver).state if (node or driver) is not None else None
        pods = tuple(_pods(workflow, task, children)) if workflow else ()
        found.append(Stage(task, state, driver_failed, pods))
    return found


def _workflow_name(details: list[Any]) -> str | None:
    """The top node's display name is the workflow's name: the node whose ``root`` child has
    the id Argo gives ``<workflow>.root``."""
    for detail in details:
        name = detail.display_name or ""
        ids = {c.pod_name for c in detail.child_tasks or []}
        if name and node_id(name, f"{name}.root") in ids:
            return name
    return None


def _pods(workflow: str, task: SpecTask, children: set[str]) -> Iterator[str]:
    """The task's driver pod and executor pods (one per attempt) whose nodes exist."""
    base = f"{workflow}.{task.node}"
    if node_id(workflow, base + "-driver") in children:
        yield pod_name(workflow, base + "-driver", DRIVER_TEMPLATE)
    attempt = 0
    while node_id(workflow, f"{base}.executor({attempt})") in children:
        yield pod_name(workflow, f"{base}.executor({attempt})", task.executor_template)
        attempt += 1
    if not attempt and node_id(workflow, f"{base}.executor") in children:
        yield pod_name(workflow, f"{base}.executor", task.executor_template)


def failure(run: Any, tasks: list[SpecTask], namespace: str) -> str:
    """Why ``run`` did not succeed, from what the API returns: the run's state and error, the
    failed stage (by its display name and KFP task name), its attempts and the pods whose logs
    tell more (``kubectl logs``)."""
    text = f"run {run.run_id} {run.state}"
    if run.error and run.error.message:
        text += f": {run.error.message}"
    failed = [s for s in stages(run, tasks) if s.state == "FAILED"]
    if not failed:
        return text + " (no stage failed)"
    stage = failed[0]
    text += f" at {stage.task.title!r} (task {stage.task.name}: {stage.describe()})"
    if stage.pods:
        text += (f"; its log: kubectl -n {namespace} logs {stage.pods[-1]} -c main"
                 + (f" (pods {', '.join(stage.pods)})" if len(stage.pods) > 1 else ""))
    return text
