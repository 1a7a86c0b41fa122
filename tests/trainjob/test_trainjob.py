"""thaw.trainjob against the Kubernetes API stand-in, through the real kubeflow Trainer SDK: the
TrainJob it creates (checked against Trainer v2.3's CRD schema), how it follows the job, and
that the job is deleted whatever happens."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from k8s_standin import RUNNING, TRAINER, Frame, K8sStandin, write_kubeconfig

from thaw.errors import ThawError
from thaw.trainjob import TrainJobRequest, run_trainjob

CRD = Path(__file__).parent / "crds" / "trainer.kubeflow.org_trainjobs.yaml"
IMAGE = "registry.example/thaw:0.1.0"
COMMAND = ["torchrun", "-m", "thaw.stage_job", "--stage", "full", "--out", "s3://thaw/x"]
FAST = {"start_timeout_s": 5.0, "timeout_s": 10.0, "poll_s": 0.05}
# The CRD's CEL rules that apply when a TrainJob is created, as Python; transition rules
# (self == oldSelf) only bind updates.
CREATE_RULES = {
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')":
        lambda job: re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]),
    "size(self.metadata.name) <= 63": lambda job: len(job["metadata"]["name"]) <= 63,
}


def _request(**overrides: Any) -> TrainJobRequest:
    settings: dict[str, Any] = dict(
        image=IMAGE, command=COMMAND, num_nodes=2, gpus_per_node=4, cpu="8", memory="32Gi",
        env=[{"name": "MLFLOW_RUN_ID", "value": "abc123"},
             {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {
                 "name": "thaw-s3-credentials", "key": "AWS_ACCESS_KEY_ID"}}},
             {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"configMapKeyRef": {
                 "name": "thaw-config", "key": "MLFLOW_TRACKING_URI"}}}],
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        labels={"pipelines.kubeflow.org/run-id": "run-0001", "thaw/stage": "full"})
    settings.update(overrides)
    return TrainJobRequest(**settings)


def _run(client, request: TrainJobRequest | None = None, **overrides: Any) -> list[str]:
    """run_trainjob with fast polling; returns what it logged."""
    lines: list[str] = []
    run_trainjob(request or _request(), client=client, log=lines.append, **{**FAST, **overrides})
    return lines


# --- the TrainJob as posted, against the CRD ---------------------------------------------------

def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def _closed(schema: Any) -> Any:
    """The schema with every object closed, as strict field validation treats it: a field the
    CRD does not declare is an error instead of being pruned."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {k: _closed(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        closed["additionalProperties"] = False
    return closed


def _crd_problems(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """What JSON Schema does not check: list-map keys unique, and the create-time CEL rules."""
    problems = []
    for rule in schema.get("x-kubernetes-validations", []):
        if rule["rule"] == "self == oldSelf":
            continue
        assert rule["rule"] in CREATE_RULES, f"{path}: untranslated CEL rule {rule['rule']}"
        if not CREATE_RULES[rule["rule"]](value):
            problems.append(f"{path}: {rule['message']}")
    if isinstance(value, list):
        if schema.get("x-kubernetes-list-type") == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"])
                    for item in value]
            if len(keys) != len(set(keys)):
                problems.append(f"{path}: duplicate list-map keys {keys}")
        for index, item in enumerate(value):
            problems += _crd_problems(schema.get("items", {}), item, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key) or schema.get("additionalProperties")
            if isinstance(sub, dict):
                problems += _crd_problems(sub, item, f"{path}.{key}")
    return problems


def _validate(job: dict[str, Any]) -> None:
    schema = _crd_schema()
    jsonschema.Draft7Validator(_closed(schema)).validate(job)
    assert _crd_problems(schema, job) == []


def _node_pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    (patch,) = job["spec"]["runtimePatches"]
    (node_job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node_job["name"] == "node"
    return node_job["template"]["spec"]["template"]["spec"]


def test_the_crd_check_catches_what_the_api_server_rejects_or_prunes():
    """The checks above are not vacuous: each of these bodies is wrong for Trainer 2.3."""
    good = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": "thaw-0123456789"},
            "spec": {"runtimeRef": {"name": "torch-distributed"},
                     "trainer": {"numNodes": 2, "env": [{"name": "A", "value": "1"}]}}}
    _validate(good)
    wrong = [
        {**good, "spec": {"trainer": {"numNodes": 2}}},  # runtimeRef is required
        {**good, "spec": {**good["spec"], "trainer": {"numNodes": "2"}}},  # not an integer
        {**good, "spec": {**good["spec"], "trainer": {"numProcPerNode": "auto"}}},  # 2.3: int
        {**good, "spec": {**good["spec"], "podTemplateOverrides": []}},  # Trainer 2.1's API
        {**good, "spec": {**good["spec"], "trainer": {"nodeSelector": {"a": "b"}}}},  # misplaced
        {**good, "metadata": {"name": "Thaw_Job"}},  # not a DNS label
        {**good, "spec": {**good["spec"], "trainer": {"env": [{"name": "A", "value": "1"},
                                                              {"name": "A", "value": "2"}]}}},
    ]
    for body in wrong:
        with pytest.raises((jsonschema.ValidationError, AssertionError)):
            _validate(body)


def test_the_posted_trainjob_is_valid_and_carries_the_request(client, standin: K8sStandin):
    name = run_trainjob(_request(), client=client, log=lambda line: None, **FAST)

    job = standin.posted
    _validate(job)
    assert job["metadata"]["name"] == name
    assert job["metadata"]["labels"] == {"app.kubernetes.io/part-of": "thaw",
                                         "pipelines.kubeflow.org/run-id": "run-0001",
                                         "thaw/stage": "full"}
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == IMAGE
    assert trainer["command"] == COMMAND  # plain torchrun: it reads the runtime's PET_* env
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    per_node = {"nvidia.com/gpu": "4", "cpu": "8", "memory": "32Gi"}
    assert trainer["resourcesPerNode"] == {"requests": per_node, "limits": per_node}
    env = {e["name"]: e for e in trainer["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {
        "name": "thaw-s3-credentials", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"] == {"configMapKeyRef": {
        "name": "thaw-config", "key": "MLFLOW_TRACKING_URI"}}
    assert env["MLFLOW_RUN_ID"] == {"name": "MLFLOW_RUN_ID", "value": "abc123"}
    assert env["NCCL_DEBUG"]["value"] == "WARN"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"
    assert not [n for n in env if n.startswith("PET_")]

    pod = _node_pod_spec(job)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    (volume,) = pod["volumes"]
    assert volume["emptyDir"] == {"medium": "Memory"}
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert "env" not in container  # Trainer refuses env patches for the node container
    assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/dev/shm"}]


def test_a_cpu_job_runs_one_process_per_node_without_gpus_or_patches(client, standin):
    _run(client, _request(gpus_per_node=0, cpu="2", memory="4Gi", node_selector={},
                          tolerations=[], shm=False, env=[]))

    job = standin.posted
    _validate(job)
    trainer = job["spec"]["trainer"]
    assert trainer["numProcPerNode"] == 1
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    assert "runtimePatches" not in job["spec"]


def test_the_request_env_wins_over_the_distributed_defaults(client, standin):
    _run(client, _request(env=[{"name": "NCCL_DEBUG", "value": "INFO"}]))

    env = standin.posted["spec"]["trainer"]["env"]
    _validate(standin.posted)
    assert [e for e in env if e["name"] == "NCCL_DEBUG"] == [{"name": "NCCL_DEBUG",
                                                              "value": "INFO"}]


def test_the_stand_in_serves_trainjobs_of_the_crd_shape(client, standin):
    """What the tests below are run against is itself a valid TrainJob, status included."""
    _run(client)

    assert [bool(job.get("status")) for job in standin.served][-1]
    for job in standin.served:
        _validate(job)


# --- following the job ------------------------------------------------------------------------

def test_success_streams_node0_log_and_deletes_the_job(client, standin):
    lines = _run(client)

    name = standin.posted["metadata"]["name"]
    assert "rank 0: epoch 1/1 loss 0.42" in lines and "rank 0: saved model" in lines
    assert lines.index("rank 0: saved model") < lines.index(
        f"TrainJob {standin.namespace}/{name} completed")
    assert standin.deleted == [name]
    assert standin.trainjobs == {}
    # the log came from node-0's pod, container "node", followed
    (log_call,) = standin.calls("GET", r"/api/v1/namespaces/.+/pods/.+/log")
    assert log_call.path.endswith(f"/pods/{name}-node-0-0-abcde/log")
    assert log_call.query["container"] == "node" and log_call.query["follow"].lower() == "true"


def test_a_failed_job_raises_with_its_message_and_is_deleted(client, standin):
    standin.frames = [*RUNNING, Frame("Failed", (
        "Failed", "FailedJobs", "jobset failed: ReplicatedJob node has 1 failed pod: "
        "CUDA error: out of memory"))]

    with pytest.raises(ThawError) as raised:
        _run(client)

    name = standin.posted["metadata"]["name"]
    message = str(raised.value)
    assert f"TrainJob {standin.namespace}/{name} failed" in message
    assert "FailedJobs" in message and "CUDA error: out of memory" in message
    assert standin.deleted == [name]


def test_a_job_that_never_starts_raises_with_its_events_and_is_deleted(client, standin):
    standin.frames = [Frame("Pending")]
    standin.events = [{"kind": "Pod", "name": "{job}-node-0-1-abcde",
                       "reason": "FailedScheduling",
                       "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]

    with pytest.raises(ThawError) as raised:
        _run(client, start_timeout_s=0.3, timeout_s=10.0)

    name = standin.posted["metadata"]["name"]
    message = str(raised.value)
    assert f"TrainJob {standin.namespace}/{name} did not start within 0.3 s" in message
    assert "node-0 Pending" in message and "node-1 Pending" in message
    assert (f"Pod/{name}-node-0-1-abcde FailedScheduling: 0/3 nodes are available: "
            "3 Insufficient nvidia.com/gpu.") in message
    assert standin.deleted == [name]


def test_a_job_that_runs_too_long_times_out_and_is_deleted(client, standin):
    standin.frames = RUNNING  # stays Running

    with pytest.raises(ThawError) as raised:
        _run(client, start_timeout_s=0.4, timeout_s=0.6)

    name = standin.posted["metadata"]["name"]
    assert f"TrainJob {standin.namespace}/{name} timed out" in str(raised.value)
    assert "Status Running" in str(raised.value)
    assert standin.deleted == [name]


def test_a_broken_log_stream_is_reported_and_the_job_still_followed_and_deleted(client, standin):
    standin.fail["log"] = (500, "error dialing backend: dial tcp 10.0.0.7:10250: i/o timeout")

    lines = _run(client)

    name = standin.posted["metadata"]["name"]
    assert any("streaming node-0's log" in line and "i/o timeout" in line for line in lines)
    assert lines[-2:] == [f"TrainJob {standin.namespace}/{name} completed",
                          f"TrainJob {standin.namespace}/{name} deleted"]
    assert standin.deleted == [name]


def test_an_interrupt_while_following_deletes_the_job(client, standin):
    standin.frames = RUNNING

    def log(line: str) -> None:
        if line.startswith("rank 0"):
            return
        if " is Running" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_trainjob(_request(), client=client, log=log, **FAST)

    assert standin.deleted == [standin.posted["metadata"]["name"]]


def test_sigterm_while_following_deletes_the_job(client, standin):
    """A cancelled pipeline run stops the launcher's pod with SIGTERM."""
    standin.frames = RUNNING
    previous = signal.getsignal(signal.SIGTERM)

    def log(line: str) -> None:
        if " is Running" in line:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as raised:
        run_trainjob(_request(), client=client, log=log, **FAST)

    assert raised.value.code == 128 + signal.SIGTERM
    assert standin.deleted == [standin.posted["metadata"]["name"]]
    assert signal.getsignal(signal.SIGTERM) == previous


def test_a_few_failed_status_reads_are_tolerated(client, standin):
    standin.get_outages = 2

    lines = _run(client)

    assert sum("retrying" in line for line in lines) == 2
    assert standin.deleted == [standin.posted["metadata"]["name"]]


def test_a_failed_delete_is_logged_and_does_not_hide_the_jobs_failure(client, standin):
    standin.frames = [Frame("Failed", ("Failed", "FailedJobs", "node-1 exited with code 1"))]
    standin.fail["delete"] = (403, 'trainjobs.trainer.kubeflow.org is forbidden: User '
                                   '"system:serviceaccount:ns:default-editor" cannot delete')
    lines: list[str] = []

    with pytest.raises(ThawError, match="node-1 exited with code 1"):
        run_trainjob(_request(), client=client, log=lines.append, **FAST)

    name = standin.posted["metadata"]["name"]
    (warning,) = [line for line in lines if "could not delete" in line]
    assert "HTTP 403" in warning and f"delete trainjob {name}" in warning
    assert standin.deleted == []


# --- refusals before and at creation ----------------------------------------------------------

def test_a_missing_runtime_is_named_and_nothing_is_created(client, standin):
    with pytest.raises(ThawError, match="'torch-distributed-gpu'.*Trainer >= 2.3"):
        _run(client, _request(runtime="torch-distributed-gpu"))

    assert standin.calls("POST", rf"{TRAINER}/.*") == []


def test_a_non_torch_runtime_is_refused(client, standin):
    standin.runtimes["mpi-distributed"] = {
        **standin.runtimes["torch-distributed"],
        "metadata": {"name": "mpi-distributed", "labels": {
            "trainer.kubeflow.org/framework": "mpi"}}}

    with pytest.raises(ThawError, match="'mpi' runtime"):
        _run(client, _request(runtime="mpi-distributed"))


def test_a_refused_create_raises_the_servers_message_and_deletes_nothing(client, standin):
    standin.fail["create"] = (422, 'admission webhook "validator.trainjob.trainer.kubeflow.org" '
                                   "denied the request: spec.trainer.numNodes: must be positive")

    with pytest.raises(ThawError, match="HTTP 422.*denied the request"):
        _run(client)

    assert standin.calls("DELETE", rf"{TRAINER}/.*") == []


@pytest.mark.parametrize(("overrides", "complaint"), [
    ({"image": ""}, "no image"),
    ({"command": []}, "no command"),
    ({"num_nodes": 0}, "num_nodes is 0"),
    ({"gpus_per_node": -1}, "gpus_per_node is -1"),
    ({"env": [{"name": "PET_NNODES", "value": "2"}]}, "set by the torch runtime"),
    ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "given twice"),
    ({"env": [{"name": "A"}]}, "exactly one of"),
    ({"env": [{"name": "A", "value": 1}]}, "must be a string"),
    ({"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}]}, "a name and a key"),
    ({"tolerations": [{"key": "gpu", "efect": "NoSchedule"}]}, "unknown fields"),
    ({"gpus_per_node": 0, "cpu": None, "memory": "4Gi"}, "give the nodes' cpu"),
    ({"gpu_resource": "amd.com/gpu", "cpu": None}, "give the nodes' cpu"),
])
def test_bad_requests_are_refused_with_what_to_fix(overrides, complaint):
    with pytest.raises(ThawError, match=complaint):
        _request(**overrides)


def test_the_start_timeout_must_fit_in_the_timeout(client, standin):
    with pytest.raises(ThawError, match="start_timeout_s"):
        _run(client, start_timeout_s=20.0, timeout_s=10.0)
    assert standin.calls("POST", rf"{TRAINER}/.*") == []


# --- connecting without a client --------------------------------------------------------------

@pytest.fixture
def kubeconfig_at(monkeypatch):
    """Point the kubernetes client's default kubeconfig at a path (its KUBECONFIG is read at
    import), and keep its process-wide default configuration from leaking out of the test."""
    from kubernetes.client import Configuration
    from kubernetes.config import kube_config

    if Path("/var/run/secrets/kubernetes.io").is_dir():
        pytest.skip("running in a pod: the SDK would use the in-cluster configuration")
    monkeypatch.setattr(Configuration, "_default", Configuration._default)

    def point(path: Path) -> None:
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))

    return point


def test_without_a_client_it_uses_the_kubeconfig_and_its_namespace(standin, tmp_path,
                                                                    kubeconfig_at):
    write_kubeconfig(tmp_path / "kubeconfig", standin)
    kubeconfig_at(tmp_path / "kubeconfig")

    name = run_trainjob(_request(), log=lambda line: None, **FAST)

    assert standin.deleted == [name]
    assert standin.calls("POST", rf"{TRAINER}/namespaces/{standin.namespace}/trainjobs")


def test_without_a_client_or_a_cluster_it_says_what_is_missing(tmp_path, kubeconfig_at):
    kubeconfig_at(tmp_path / "no-kubeconfig")

    with pytest.raises(ThawError, match="No Kubernetes API.*KUBECONFIG"):
        run_trainjob(_request(), log=lambda line: None, **FAST)
