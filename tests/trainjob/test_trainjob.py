"""thaw.cluster.trainjob against the Kubernetes API stand-in (k8s_standin.py), through the real
kubeflow Trainer SDK: the TrainJob it creates (checked strictly against the TrainJob CRD of every
Trainer release thaw supports, crds/), how it follows the job, fails fast and names the cause,
that retries find earlier attempts' jobs, and that the job is deleted whatever happens."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from crd_schema import SUPPORTED, TOO_OLD, validate
from k8s_standin import (
    COMPLETES,
    JOBSET_FAILED,
    NOW,
    RUNNING,
    SCHEDULER_EVENT,
    TRAINER,
    Frame,
    K8sStandin,
    restarted,
    running,
    write_kubeconfig,
)

from thaw.cluster.trainjob import TrainJobRequest, run_trainjob
from thaw.errors import ThawError

IMAGE = "registry.example/thaw:0.1.0"
COMMAND = ["torchrun", "-m", "thaw.stage_job", "--stage", "full", "--out", "s3://thaw/x"]
FAST = {"start_timeout_s": 5.0, "timeout_s": 10.0, "poll_s": 0.05}
RUN_ID = "3f1c2b9e-7d4a-4e2b-9c1d-0a5b6c7d8e9f"


def _request(**overrides: Any) -> TrainJobRequest:
    settings: dict[str, Any] = dict(
        image=IMAGE, command=COMMAND, pipeline_run_id=RUN_ID, stage="full", num_nodes=2,
        gpus_per_node=4, cpu="8", memory="32Gi", scratch="100Gi", shm_size="8Gi",
        env=[{"name": "MLFLOW_RUN_ID", "value": "abc123"},
             {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {
                 "name": "thaw-s3-credentials", "key": "AWS_ACCESS_KEY_ID"}}},
             {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"configMapKeyRef": {
                 "name": "thaw-config", "key": "MLFLOW_TRACKING_URI"}}}],
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        labels={"pipelines.kubeflow.org/run-id": "run-0001"})
    settings.update(overrides)
    return TrainJobRequest(**settings)


def _run(client, request: TrainJobRequest | None = None, **overrides: Any) -> list[str]:
    """run_trainjob with fast polling; returns what it logged."""
    lines: list[str] = []
    run_trainjob(request or _request(), client=client, log=lines.append, **{**FAST, **overrides})
    return lines


# --- the TrainJob as posted, against the CRD ---------------------------------------------------

def _validate(job: dict[str, Any]) -> None:
    for release in SUPPORTED:
        validate(release, job)


def _node_pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    (patch,) = job["spec"]["runtimePatches"]
    (node_job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node_job["name"] == "node"
    return node_job["template"]["spec"]["template"]["spec"]


def test_the_crd_check_catches_what_the_api_server_rejects_or_prunes():
    """The checks are not vacuous: each of these bodies is wrong for Trainer 2.3."""
    good = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": "thaw-0123456789"},
            "spec": {"runtimeRef": {"name": "torch-distributed"},
                     "trainer": {"numNodes": 2, "env": [{"name": "A", "value": "1"}]}}}
    _validate(good)
    wrong = [
        {**good, "spec": {"trainer": {"numNodes": 2}}},  # runtimeRef is required
        {**good, "spec": {**good["spec"], "trainer": {"numNodes": "2"}}},  # not an integer
        {**good, "spec": {**good["spec"], "trainer": {"numProcPerNode": "auto"}}},  # 2.3: int
        {**good, "spec": {**good["spec"], "activeDeadlineSeconds": 0}},  # minimum 1
        {**good, "spec": {**good["spec"], "podTemplateOverrides": []}},  # Trainer 2.1's API
        {**good, "spec": {**good["spec"], "trainer": {"nodeSelector": {"a": "b"}}}},  # misplaced
        {**good, "metadata": {"name": "Thaw_Job"}},  # not a DNS label
        {**good, "spec": {**good["spec"], "trainer": {"env": [{"name": "A", "value": "1"},
                                                              {"name": "A", "value": "2"}]}}},
    ]
    for body in wrong:
        with pytest.raises((jsonschema.ValidationError, AssertionError)):
            validate("v2.3.0", body)


def test_the_posted_trainjob_is_valid_and_carries_the_request(client, standin: K8sStandin):
    name = run_trainjob(_request(), client=client, log=lambda line: None, **FAST)

    job = standin.posted
    _validate(job)
    assert job["metadata"]["name"] == name
    assert name == _request().job_name(1) == f"thaw-full-{_request().run_key}-1"
    assert job["metadata"]["labels"] == {"app.kubernetes.io/part-of": "thaw",
                                         "pipelines.kubeflow.org/run-id": "run-0001",
                                         "thaw.run-key": _request().run_key,
                                         "thaw.stage": "full", "thaw.attempt": "1"}
    assert "ownerReferences" not in job["metadata"]  # not in a KFP pod
    assert job["spec"]["activeDeadlineSeconds"] == 10
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == IMAGE
    assert trainer["command"] == COMMAND  # plain torchrun: it reads the runtime's PET_* env
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    per_node = {"nvidia.com/gpu": "4", "cpu": "8", "memory": "32Gi",
                "ephemeral-storage": "100Gi"}
    assert trainer["resourcesPerNode"] == {"requests": per_node, "limits": per_node}
    env = {e["name"]: e for e in trainer["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {
        "name": "thaw-s3-credentials", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"] == {"configMapKeyRef": {
        "name": "thaw-config", "key": "MLFLOW_TRACKING_URI"}}
    assert env["MLFLOW_RUN_ID"] == {"name": "MLFLOW_RUN_ID", "value": "abc123"}
    assert env["NCCL_DEBUG"]["value"] == "WARN"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"
    assert env["TMPDIR"]["value"] == "/scratch"  # the data copy (thaw.stage_job)
    assert env["THAW_SHARD_CACHE"]["value"] == "/scratch/shard-cache"
    assert not [n for n in env if n.startswith("PET_")]

    pod = _node_pod_spec(job)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    assert pod["volumes"] == [{"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}},
                              {"name": "dshm", "emptyDir": {"medium": "Memory",
                                                            "sizeLimit": "8Gi"}}]
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert "env" not in container  # Trainer refuses env patches for the node container
    assert container["volumeMounts"] == [{"name": "scratch", "mountPath": "/scratch"},
                                         {"name": "dshm", "mountPath": "/dev/shm"}]


def test_a_cpu_job_runs_one_process_per_node_without_gpus(client, standin):
    _run(client, _request(gpus_per_node=0, cpu="2", memory="4Gi", node_selector={},
                          tolerations=[], shm=False, scratch=None, env=[]))

    job = standin.posted
    _validate(job)
    trainer = job["spec"]["trainer"]
    assert trainer["numProcPerNode"] == 1
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    assert _node_pod_spec(job) == {
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "containers": [{"name": "node", "volumeMounts": [{"name": "scratch",
                                                          "mountPath": "/scratch"}]}]}


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


@pytest.mark.parametrize("release", SUPPORTED)
def test_each_supported_trainer_takes_the_body_strictly_and_keeps_every_field(release):
    """Created with fieldValidation=Strict against that release's CRD (crds/<release>/, from
    kubeflow/trainer manifests/base/crds/ at the tag): nothing is refused, nothing pruned."""
    with running(release=release) as standin:
        run_trainjob(_request(), client=_client(standin), log=lambda line: None, **FAST)

        (create,) = standin.calls("POST", rf"{TRAINER}/namespaces/.+/trainjobs")
        assert create.query.get("fieldValidation") == "Strict"
        validate(release, create.body)
        assert [j["spec"] for j in standin.served][0] == create.body["spec"]  # none pruned


@pytest.mark.parametrize("release", TOO_OLD)
def test_an_older_trainer_is_refused_naming_the_field_before_anything_is_created(release):
    with running(release=release) as standin, pytest.raises(ThawError) as raised:
        run_trainjob(_request(), client=_client(standin), log=lambda line: None, **FAST)

    assert "spec.runtimePatches" in str(raised.value)
    assert "Install Kubeflow Trainer >= 2.2" in str(raised.value)
    assert standin.calls("POST", rf"{TRAINER}/.*") == []


@pytest.mark.parametrize("release", TOO_OLD)
def test_strict_field_validation_refuses_what_an_older_trainer_would_drop(release):
    """Where the version cannot be read, the API server itself refuses the unknown fields
    (without fieldValidation=Strict it would prune them and the job would run without
    scratch, /dev/shm, node selector and deadline)."""
    lines: list[str] = []
    with running(release=release, fail={"trainer-version": (403, "forbidden")}) as standin, \
            pytest.raises(ThawError) as raised:
        run_trainjob(_request(), client=_client(standin), log=lines.append, **FAST)

    message = str(raised.value)
    assert "HTTP 400" in message and 'unknown field "spec.runtimePatches"' in message
    assert 'unknown field "spec.activeDeadlineSeconds"' in message
    assert "thaw needs Kubeflow Trainer >= 2.2" in message
    assert any("cannot read Kubeflow Trainer's version" in line for line in lines)
    with pytest.raises(jsonschema.ValidationError, match="runtimePatches"):
        validate(release, standin.calls("POST", rf"{TRAINER}/.*")[0].body)


def test_a_second_attempt_deletes_the_first_attempts_job_and_its_pods_first(client, standin):
    """The first attempt's launcher could not delete its job (killed hard, or the API refused):
    the retry finds it by its labels, deletes it in the foreground (pods first) and waits until
    it is gone before creating attempt 2."""
    standin.fail["delete"] = (503, "etcdserver: request timed out")
    _run(client)
    first = standin.posted["metadata"]["name"]
    assert first in standin.trainjobs
    del standin.fail["delete"]
    standin.requests.clear()

    lines = _run(client)

    second = _request().job_name(2)
    assert first == _request().job_name(1) and second != first
    deletes = standin.calls("DELETE", rf"{TRAINER}/namespaces/.+/trainjobs/.+")
    assert [d.path.rsplit("/", 1)[1] for d in deletes] == [first, second]
    assert deletes[0].body == {"propagationPolicy": "Foreground"}
    order = [(r.method, r.path.rsplit("/", 1)[1]) for r in standin.requests]
    assert order.index(("GET", first)) > order.index(("DELETE", first))  # waited until gone
    assert order.index(("GET", first)) < order.index(("POST", "trainjobs"))
    assert standin.posted["metadata"]["labels"]["thaw.attempt"] == "2"
    assert any(f"{first} of an earlier attempt is still there" in line for line in lines)
    assert standin.trainjobs == {}


def test_other_stages_and_runs_jobs_are_left_alone(client, standin):
    standin.fail["delete"] = (503, "etcdserver: request timed out")
    _run(client, _request(stage="partial"))
    _run(client, _request(pipeline_run_id="another-run"))
    left = set(standin.trainjobs)
    del standin.fail["delete"]

    _run(client)

    last = standin.calls("POST", rf"{TRAINER}/namespaces/.+/trainjobs")[-1].body
    assert len(left) == 2 and set(standin.trainjobs) == left
    assert last["metadata"]["name"] == _request().job_name(1)


def test_in_a_kfp_pod_the_launcher_pod_owns_the_job(client, standin, monkeypatch):
    """KFP gives its pods KFP_POD_NAME and KFP_POD_UID (kubeflow/pipelines
    backend/src/v2/compiler/argocompiler/common.go at 2.14.0)."""
    monkeypatch.setenv("KFP_POD_NAME", "thaw-run-abc-system-container-impl-123")
    monkeypatch.setenv("KFP_POD_UID", "5e8f0c3a-1b2c-4d5e-8f90-123456789abc")

    _run(client)

    assert standin.posted["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "Pod", "name": "thaw-run-abc-system-container-impl-123",
        "uid": "5e8f0c3a-1b2c-4d5e-8f90-123456789abc"}]
    _validate(standin.posted)


def _client(standin: K8sStandin):
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient
    from kubernetes.client import Configuration

    return TrainerClient(KubernetesBackendConfig(
        namespace=standin.namespace, client_configuration=Configuration(host=standin.url)))


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


def test_a_failed_job_raises_with_the_cause_from_its_pod_and_log_and_is_deleted(client,
                                                                                  standin):
    """The TrainJob's own condition is JobSet's fixed text (k8s_standin.JOBSET_FAILED): the
    cause comes from the failed pod's status and its log."""
    crash = {"state": {"terminated": {"reason": "Error", "exitCode": 1, "startedAt": NOW,
                                      "finishedAt": NOW}}}
    standin.frames = [*RUNNING, Frame("Failed", JOBSET_FAILED, containers={1: crash})]
    standin.node_logs = {1: "rank 5: epoch 1\ntorch.OutOfMemoryError: CUDA out of memory.\n"}

    with pytest.raises(ThawError) as raised:
        _run(client)

    name = standin.posted["metadata"]["name"]
    message = str(raised.value)
    assert f"TrainJob {standin.namespace}/{name} failed." in message
    assert (f"First failure: pod {name}-node-0-1-abcde Failed; container node Error "
            "(exit code 1).") in message
    assert "torch.OutOfMemoryError: CUDA out of memory." in message
    assert f"FailedJobs): jobset failed due to one or more job failures (first failed job: " \
           f"{name}-node-0)" in message
    assert standin.deleted == [name]


def test_a_node_that_fails_once_fails_the_job_at_once_instead_of_restarting(client, standin):
    """The stock runtime has no failure policy, and a Job restarts its pods in place up to
    backoffLimit 6 (restartPolicy OnFailure: jobset pkg/webhooks/jobset_webhook.go v0.12.0),
    with the TrainJob still Running: the launcher reports the job failed at the first restart,
    with the earlier run's log, and deletes it, instead of waiting for the timeout."""
    standin.frames = [*RUNNING, Frame("Running", containers={1: restarted("OOMKilled", 137)})]
    standin.previous_logs = {1: "rank 5: loading shards\nKilled\n"}

    with pytest.raises(ThawError) as raised:
        _run(client, timeout_s=60.0)

    name = standin.posted["metadata"]["name"]
    message = str(raised.value)
    assert f"TrainJob {standin.namespace}/{name} failed." in message
    assert (f"pod {name}-node-0-1-abcde Running; container node OOMKilled (exit code 137); "
            "restarted 1 time(s) in place") in message
    assert f"{name}-node-0-1-abcde log (before its restart):\nrank 5: loading shards\nKilled" \
        in message
    assert "Not restarted in place" in message
    assert standin.deleted == [name]
    (previous,) = [c for c in standin.calls("GET", r"/api/v1/.+/log")
                   if c.query.get("previous", "").lower() == "true"]
    assert previous.path.endswith(f"/pods/{name}-node-0-1-abcde/log")


def test_a_job_that_never_starts_raises_with_its_events_and_is_deleted(client, standin):
    """The scheduler's event has no firstTimestamp (k8s_standin.SCHEDULER_EVENT), which the
    SDK's get_job_events drops: the launcher reads events itself."""
    standin.frames = [Frame("Pending")]
    standin.events = [SCHEDULER_EVENT]

    with pytest.raises(ThawError) as raised:
        _run(client, start_timeout_s=0.3, timeout_s=10.0)

    name = standin.posted["metadata"]["name"]
    message = str(raised.value)
    assert f"TrainJob {standin.namespace}/{name} did not start within 0.3 s" in message
    assert "node-0 Pending" in message and "node-1 Pending" in message
    assert (f"Pod/{name}-node-0-1-abcde FailedScheduling: 0/3 nodes are available: "
            "3 Insufficient nvidia.com/gpu.") in message
    assert standin.deleted == [name]


def test_a_job_pending_then_running_streams_its_log_once_running(client, standin):
    """Pods listed after a GET show that GET's frame: Pending, Pending, then Running."""
    standin.frames = [Frame(None), Frame("Pending"), Frame("Pending"), *COMPLETES[1:]]

    lines = _run(client)

    name = standin.posted["metadata"]["name"]
    assert f"TrainJob {standin.namespace}/{name} is Running; node-0's log follows" in lines
    assert "rank 0: saved model" in lines
    phases = [job.get("status") for job in standin.served]
    assert phases[:3] == [None, None, None]


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
    standin.frames = [Frame("Failed", JOBSET_FAILED)]
    standin.fail["delete"] = (403, 'trainjobs.trainer.kubeflow.org is forbidden: User '
                                   '"system:serviceaccount:ns:default-editor" cannot delete')
    lines: list[str] = []

    with pytest.raises(ThawError, match="jobset failed due to one or more job failures"):
        run_trainjob(_request(), client=client, log=lines.append, **FAST)

    name = standin.posted["metadata"]["name"]
    (warning,) = [line for line in lines if "could not delete" in line]
    assert "HTTP 403" in warning and f"delete trainjob {name}" in warning
    assert standin.deleted == []


# --- refusals before and at creation ----------------------------------------------------------

def test_a_missing_runtime_is_named_and_nothing_is_created(client, standin):
    with pytest.raises(ThawError, match="'torch-distributed-gpu'.*Trainer >= 2.2"):
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
