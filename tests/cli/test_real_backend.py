"""`thaw submit` / `thaw schedule` against what a real Kubeflow Pipelines backend answers, as
the stand-in replays it from the upstream files each test names (kubeflow/pipelines at the
release tags)."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from kfp_standin import Frame, running

from pipelines.thaw_pipeline import MIN_KFP_BACKEND
from tests.trainjob.k8s_standin import running as running_k8s
from tests.trainjob.k8s_standin import write_kubeconfig
from thawctl.kfp_tasks import node_id

ROOT = "s3://thaw/pipeline-root"


def _error_line(result) -> str:
    lines = result.err.strip().splitlines()
    assert lines and lines[-1].startswith("thaw: error: "), result.err
    return lines[-1]


def _config(tmp_path, root: str = ROOT):
    config = tmp_path / "cluster.yaml"
    config.write_text(f"pipeline_root: {root}\n")
    return config


# -- healthz through either host -----------------------------------------------------------

def test_the_gateway_host_answers_healthz_from_the_ui_server(kfp_env, thaw, monkeypatch):
    """frontend/server/app.ts + handlers/healthz.ts@2.14.0..2.17.0: the UI server answers
    /apis/v2beta1/healthz itself, with apiServerTagName, not tag_name."""
    with running(version="2.16.0", via_ui=True) as ui:
        monkeypatch.setenv("KFP_HOST", ui.url)
        result = thaw("submit")
        assert result.code == 0, result.err
        assert "Kubeflow Pipelines 2.16.0 at" in result.out and result.err == ""
        assert len(ui.runs) == 1


@pytest.mark.parametrize("via_ui", [False, True])
def test_a_backend_that_says_unknown_is_warned_of_not_refused(kfp_env, thaw, monkeypatch,
                                                               via_ui):
    """backend/Dockerfile@2.5.0..2.17.0: ARG TAG_NAME=unknown; the release builds pass
    TAG_NAME only from 2.16.0 (.github/workflows/build-and-push.yml@2.16.0), so official
    API-server images before it report tag_name "unknown" (kubeflow/pipelines#11573)."""
    with running(version="unknown", via_ui=via_ui) as server:
        monkeypatch.setenv("KFP_HOST", server.url)
        result = thaw("submit")
        assert result.code == 0, result.err
        assert len(server.runs) == 1
    assert "cannot be known" in result.err and f">= {MIN_KFP_BACKEND}" in result.err
    assert "(version unknown)" in result.out


def test_the_ui_server_without_its_api_server_gives_no_version(kfp_env, thaw, monkeypatch):
    """handlers/healthz.ts@2.17.0: when the API server does not answer within a second the UI
    server sends its build keys and apiServerReady false, nothing else."""
    with running(via_ui=True, api_server_ready=False) as ui:
        monkeypatch.setenv("KFP_HOST", ui.url)
        result = thaw("submit")
    assert result.code == 0, result.err
    assert "could not reach the API server" in result.err


def test_a_known_old_backend_is_refused_through_the_ui_too(kfp_env, thaw, monkeypatch):
    """handlers/healthz.ts@2.17.0 copies the API server's tag_name into apiServerTagName."""
    with running(version="2.2.0", via_ui=True) as ui:
        monkeypatch.setenv("KFP_HOST", ui.url)
        result = thaw("submit")
        assert {r.path for r in ui.requests} == {"/apis/v2beta1/healthz"}
    assert result.code == 2
    assert "2.2.0" in _error_line(result) and f">= {MIN_KFP_BACKEND}" in _error_line(result)


def test_multi_user_is_read_from_the_ui_answer(kfp_env, thaw, monkeypatch):
    """handlers/healthz.ts@2.14.0..2.17.0: apiServerMultiUser and multi_user."""
    with running(version="2.16.0", via_ui=True, multi_user=True) as ui:
        monkeypatch.setenv("KFP_HOST", ui.url)
        result = thaw("submit")
        assert result.code == 2 and "multi-user: pass --namespace" in _error_line(result)
        assert thaw("submit", "--namespace", "team-a").code == 0


# -- the pipeline root of every run --------------------------------------------------------

def test_submit_sends_the_compiled_pipeline_root(standin, thaw, tmp_path):
    """backend/src/v2/driver/root_dag.go@2.14.0..2.17.0: the root is runtime_config's
    pipeline_root, else the kfp-launcher ConfigMap's, else minio://mlpipeline/v2/artifacts;
    the spec's defaultPipelineRoot is never read by the backend."""
    assert thaw("submit", "--config", str(_config(tmp_path))).code == 0
    (posted,) = standin.calls("POST", "runs")
    assert posted.body["runtime_config"]["pipeline_root"] == ROOT

    result = thaw("submit")  # the default settings name no root: the cluster's default
    assert result.code == 0 and "the cluster's default" in result.out
    last = standin.calls("POST", "runs")[-1]
    assert not last.body["runtime_config"].get("pipeline_root")


def test_schedule_sends_the_pipeline_root_and_a_new_root_is_a_change(standin, thaw, tmp_path):
    """backend/src/v2/driver/root_dag.go@2.14.0..2.17.0, and api_converter.go toModelJob: a
    recurring run keeps runtime_config.pipeline_root for the runs it starts."""
    nightly = ("schedule", "create", "nightly", "--cron", "0 0 3 * * *")
    assert thaw(*nightly, "--config", str(_config(tmp_path))).code == 0
    (posted,) = standin.calls("POST", "recurringruns")
    assert posted.body["runtime_config"]["pipeline_root"] == ROOT
    assert "nightly unchanged" in thaw(*nightly, "--config", str(_config(tmp_path))).out

    other = tmp_path / "other"
    other.mkdir()
    moved = thaw(*nightly, "--config", str(_config(other, "s3://elsewhere/root")))
    assert moved.code == 2 and f"pipeline root ({ROOT}, not s3://elsewhere/root)" in moved.err


# -- --wait on real task details -----------------------------------------------------------

def _run_json(standin, run_id: str) -> dict:
    with urllib.request.urlopen(f"{standin.url}/apis/v2beta1/runs/{run_id}") as answer:
        return json.load(answer)


def test_wait_names_the_failed_stage_its_attempts_and_its_pod(standin, thaw):
    """Real task details carry Argo node display names (train-2, executor, executor(2)...)
    and no error (backend/src/apiserver/server/api_converter.go@2.14.0..2.17.0 toModelTask /
    toApiPipelineTaskDetail); thaw maps them back to the spec's stages and names the pod
    Argo's RetrievePodName gives (backend/src/common/util/workflow.go@2.17.0)."""
    standin.run_frames = [
        Frame("RUNNING", {"source-version": "Succeeded", "preprocess": "Succeeded",
                          "train": "Succeeded", "train-2": "Running"}),
        Frame("FAILED", {"source-version": "Succeeded", "preprocess": "Succeeded",
                         "train": "Succeeded", "train-2": ("Failed", 3),
                         "finalize": "Succeeded"}),
    ]
    result = thaw("submit", "--wait", "--poll-interval", "0.01")
    assert result.code == 1
    line = _error_line(result)
    assert "FAILED at 'partial: last stage + head' (task train-2: FAILED (attempt 3))" in line
    pod = re.search(r"kubectl -n kubeflow logs (\S+) -c main", line)[1]
    (run_id,) = standin.runs
    details = _run_json(standin, run_id)["run_details"]["task_details"]
    assert not any("error" in d or "pod_name" in d for d in details)
    workflow = details[0]["display_name"]  # the top node sorts first: its id is the name
    (retry,) = [d for d in details if d["display_name"] == "executor"
                and len(d.get("child_tasks", [])) == 3]
    last_attempt = retry["child_tasks"][-1]["pod_name"]
    assert pod == f"{workflow}-retry-system-container-impl-{last_attempt.rsplit('-', 1)[1]}"
    assert re.search(r"partial: last stage \+ head +RUNNING", result.out)


def test_wait_names_a_failed_driver(standin, thaw):
    """A driver pod (``<task>-driver``, template system-container-driver: backend/src/v2/
    compiler/argocompiler/container.go@2.14.0) that fails leaves no ``<task>`` node."""
    standin.run_frames = [Frame("FAILED", {"source-version": "Succeeded"},
                                drivers={"preprocess": "Failed"})]
    result = thaw("submit", "--wait", "--poll-interval", "0.01")
    assert result.code == 1
    line = _error_line(result)
    assert "at 'preprocess: validate, split, resize' (task preprocess: FAILED (its driver" \
        in line
    assert re.search(r"logs thaw-staged-transfer-\S+-system-container-driver-\d+ -c main", line)


def test_node_ids_are_argos_fnv1a():
    """pkg/apis/workflow/v1alpha1/workflow_types.go@v3.6.7 Workflow.NodeID: FNV-1a (32 bit)
    of the node name; FNV-1a("a") is 0xe40c292c."""
    assert node_id("wf", "a") == f"wf-{0xE40C292C}"
    assert node_id("wf", "wf") == "wf"


# -- recurring runs of one name ------------------------------------------------------------

def test_several_recurring_runs_of_one_name_are_refused(standin, thaw):
    """The API server keeps no recurring-run name unique (backend/src/apiserver/model/job.go
    @2.5.0..2.17.0: DisplayName has no unique index; template/v2_template.go: GenerateName):
    the stand-in accepts a second ``nightly``; thaw refuses to pick one."""
    nightly = ("schedule", "create", "nightly", "--cron", "0 0 3 * * *")
    assert thaw(*nightly).code == 0
    (first,) = standin.calls("POST", "recurringruns")
    request = urllib.request.Request(f"{standin.url}/apis/v2beta1/recurringruns",
                                     data=json.dumps(first.body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as answer:
        assert answer.status == 200
    assert len(standin.recurring_runs) == 2
    result = thaw("schedule", "pause", "nightly")
    assert result.code == 2 and "2 recurring runs are named 'nightly'" in _error_line(result)


# -- Secret and ConfigMap keys checked up front --------------------------------------------

@pytest.fixture
def cluster(kfp_env, tmp_path, monkeypatch):
    """A Kubernetes API stand-in in namespace kubeflow (a single-user install's) holding the
    Secret and ConfigMap the default settings name, and a kubeconfig pointing at it."""
    from kubernetes.config import kube_config

    with running_k8s(namespace="kubeflow") as k8s:
        k8s.secrets["thaw-s3-credentials"] = {"AWS_ACCESS_KEY_ID": "id",
                                              "AWS_SECRET_ACCESS_KEY": "secret"}
        k8s.config_maps["thaw-config"] = {key: "x" for key in (
            "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
            "THAW_CHECKPOINT_URI")}
        write_kubeconfig(tmp_path / "kubeconfig", k8s)
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                            str(tmp_path / "kubeconfig"))
        yield k8s


def test_submit_checks_the_secret_and_configmap_keys(cluster, standin, thaw):
    """A missing key leaves the pod Pending with CreateContainerConfigError (kubernetes
    ``pkg/kubelet/kubelet_pods.go`` ``makeEnvironmentVariables``), which Argo never fails nor
    retries (argo-workflows ``workflow/controller/operator.go`` ``getPendingReason`` at
    v3.6.7-v4.0.5); the keys come from the compiled platform spec."""
    ok = thaw("submit")
    assert ok.code == 0, ok.err
    assert "keys checked in namespace kubeflow" in ok.out
    assert cluster.calls("GET", "/api/v1/namespaces/kubeflow/secrets/thaw-s3-credentials")

    del cluster.config_maps["thaw-config"]["THAW_CHECKPOINT_URI"]
    missing = thaw("submit")
    assert missing.code == 2
    line = _error_line(missing)
    assert "ConfigMap thaw-config in namespace kubeflow lacks key(s) ['THAW_CHECKPOINT_URI']" \
        in line and "CreateContainerConfigError" in line
    cluster.config_maps["thaw-config"]["THAW_CHECKPOINT_URI"] = "s3://bucket/checkpoints"
    del cluster.secrets["thaw-s3-credentials"]
    assert "Secret thaw-s3-credentials does not exist" in _error_line(thaw("submit"))
    assert len(standin.runs) == 1


def test_without_a_kubernetes_api_the_keys_are_not_checked(standin, thaw):
    result = thaw("submit")
    assert result.code == 0, result.err
    assert "keys not checked (no Kubernetes configuration" in result.out
    assert len(standin.runs) == 1
