"""Retries and resources as a Kubeflow Pipelines backend runs them, not as the SDK names them.

KFP's Argo compiler (kubeflow/pipelines ``backend/src/v2/compiler/argocompiler/container.go`` at
2.14.0-2.17.0, ``getTaskRetryParametersWithValues`` / ``getTaskRetryStrategyFromInput``) copies
a task's retryPolicy into Argo's ``retryStrategy``: ``limit``, ``backoff.duration`` and
``backoff.maxDuration`` in whole seconds, ``backoff.factor`` as the double written with Go's
``%v``, and no ``retryPolicy`` (Argo's default: OnFailure). Argo decides each retry in
``processNodeRetries`` (argoproj/argo-workflows ``workflow/controller/operator.go`` at v3.6.7,
v3.7.3, v3.7.8, v4.0.5, the versions those releases pin).
"""

from pathlib import Path

import pytest
import yaml

from pipelines.settings import SettingsError, load_settings, settings_from_dict
from pipelines.thaw_pipeline import compile_pipeline

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "infra" / "cluster.example.yaml"
RETRIED_STAGES = ("train", "train-2", "train-3")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * SECONDS[duration[-1]]


def _argo_stops(policy: dict, attempt_s: int) -> list[str]:
    """Why Argo would stop retrying a step whose every attempt runs ``attempt_s`` and fails
    (empty: every retry starts and may run that long). Replays ``processNodeRetries``
    (workflow/controller/operator.go at v3.7.3): the window closes ``maxDuration`` after the
    FIRST attempt's start; past it nothing is retried ("Max duration limit exceeded"); a wait
    ending after it stops retries ("Backoff would exceed max duration limit"); each retry runs
    with the window's end as its deadline (``opts.executionDeadline = maxDurationDeadline``)."""
    window = _seconds(policy["backoffMaxDuration"])
    wait, factor = _seconds(policy["backoffDuration"]), int(policy["backoffFactor"])
    started = 0
    for attempt in range(policy["maxRetryCount"]):
        ended = started + attempt_s
        if attempt and ended > window:
            return [f"retry {attempt} killed at the window's end", "Max duration limit exceeded"]
        if ended > window:
            return ["Max duration limit exceeded"]
        if ended + wait * factor**attempt > window:
            return ["Backoff would exceed max duration limit"]
        started = ended + wait * factor**attempt
    if policy["maxRetryCount"] and started + attempt_s > window:
        return [f"retry {policy['maxRetryCount']} killed at the window's end"]
    return []


def _compiled(tmp_path: Path, settings) -> tuple[dict, dict]:
    pipeline, platform = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml",
                                                             settings).read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _dag(pipeline: dict) -> dict:
    return pipeline["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def _executor(pipeline: dict, task: str) -> str:
    return pipeline["components"][_dag(pipeline)[task]["componentRef"]["name"]]["executorLabel"]


@pytest.mark.parametrize("training", [{}, {"num_nodes": 2, "gpus_per_node": 4}],
                         ids=["in-pod", "trainjob launchers"])
def test_a_training_step_that_fails_after_hours_is_still_retried(tmp_path, training):
    """kubeflow/pipelines#13452, #14245: with backoff_max_duration=3600s (the SDK's default, and
    thaw's until now) a stage that fails after an hour is never retried. Every attempt may now
    run the whole training budget (training.timeout_s, plus start_timeout_s for a TrainJob)."""
    example = yaml.safe_load(EXAMPLE.read_text())
    settings = settings_from_dict({**example, "training": {**example["training"], **training}})
    pipeline, _ = _compiled(tmp_path, settings)
    for task in RETRIED_STAGES:
        launches_trainjob = "trainjob" in _dag(pipeline)[task]["inputs"]["parameters"]
        budget = settings.training.timeout_s + (
            settings.training.start_timeout_s if launches_trainjob else 0)
        policy = _dag(pipeline)[task]["retryPolicy"]
        assert policy["maxRetryCount"] == 2
        assert _argo_stops(policy, attempt_s=5 * 3600) == [], task
        assert _argo_stops(policy, attempt_s=budget) == [], task


def test_the_argo_replay_stops_an_hour_long_window():
    """The replay itself, on the policy the SDK writes by default (backoffMaxDuration 3600s)."""
    policy = {"maxRetryCount": 2, "backoffDuration": "60s", "backoffFactor": 2.0,
              "backoffMaxDuration": "3600s"}
    assert _argo_stops(policy, attempt_s=2 * 3600) == ["Max duration limit exceeded"]
    assert _argo_stops(policy, attempt_s=50 * 60) == [
        "retry 1 killed at the window's end", "Max duration limit exceeded"]
    assert _argo_stops(policy, attempt_s=60) == []


def test_an_explicit_window_is_kept_and_one_too_short_for_a_retry_is_refused(tmp_path):
    settings = settings_from_dict({"steps": {"train": {"retry": {
        "backoff_max_duration": "12h"}}}})
    pipeline, _ = _compiled(tmp_path, settings)
    assert _dag(pipeline)["train"]["retryPolicy"]["backoffMaxDuration"] == "43200s"
    with pytest.raises(SettingsError, match=r"steps\.train\.retry\.backoff_max_duration is a "
                                            r"window counted from the first attempt's start"):
        settings_from_dict({"steps": {"train": {"retry": {"backoff_max_duration": "60s"}}}})
    with pytest.raises(SettingsError, match=r"steps\.train\.retry\.backoff_duration must be a "
                                            r"duration such as 90s"):
        settings_from_dict({"steps": {"train": {"retry": {"backoff_duration": "1 minute"}}}})


@pytest.mark.parametrize("factor", [1.5, 0.5, 2.25])
def test_a_backoff_factor_argo_cannot_read_as_an_integer_is_refused(factor):
    """KFP 2.14.0-2.17.0 writes backoffFactor into ``backoff.factor`` with Go's ``%v``
    (argocompiler/container.go: ``wfapi.AnyStringPtr(retryPolicy.GetBackoffFactor())``), and
    Argo reads it with ``strconv.Atoi`` (util/intstr/parametrizable.go at v3.7.3): "1.5" errors
    the node ("value '1.5' cannot be resolved to an int") instead of retrying it."""
    with pytest.raises(SettingsError, match=r"steps\.train\.retry\.backoff_factor must be a "
                                            r"whole number >= 1"):
        settings_from_dict({"steps": {"train": {"retry": {"backoff_factor": factor}}}})


@pytest.mark.parametrize("factor", [1, 2, 3.0])
def test_whole_backoff_factors_compile_to_what_go_prints_as_an_integer(tmp_path, factor):
    """Go's ``%v`` prints float64(3) as "3", which Atoi reads."""
    settings = settings_from_dict({"steps": {"train": {"retry": {"backoff_factor": factor}}}})
    pipeline, _ = _compiled(tmp_path, settings)
    written = _dag(pipeline)["train"]["retryPolicy"]["backoffFactor"]
    assert float(written).is_integer() and written == factor


@pytest.mark.parametrize(("field", "value"), [
    ("scratch", "100 GB"), ("scratch", "lots"), ("scratch", "-5Gi"), ("scratch", "10gi"),
    ("memory", "16K"), ("memory", "1.5Gi"), ("memory", "32GB"), ("cpu", "two"), ("cpu", "1k"),
])
def test_quantities_the_driver_or_the_sdk_would_refuse_are_refused_naming_the_field(field,
                                                                                     value):
    """The driver builds the scratch emptyDir with ``k8sres.MustParse(sizeLimit)``
    (kubeflow/pipelines backend/src/v2/driver/k8s.go at 2.14.0-2.17.0), which panics on a
    string outside Kubernetes' quantity grammar (apimachinery pkg/api/resource/quantity.go);
    cpu and memory must also pass the KFP SDK's own checks (kfp/dsl/pipeline_task.py)."""
    with pytest.raises(SettingsError, match=rf"steps\.preprocess\.{field} must be"):
        settings_from_dict({"steps": {"preprocess": {field: value}}})


def test_valid_quantities_are_accepted():
    settings = settings_from_dict({"steps": {"preprocess": {
        "scratch": "1.5Gi", "memory": "30Gi", "cpu": "500m"}, "train": {
        "scratch": "5e9", "memory": "64G", "cpu": "0.5"}}})
    assert settings.step("train").scratch == "5e9"


def _shm(platform: dict, label: str) -> dict:
    return next(m for m in platform[label]["emptyDirMounts"] if m["mountPath"] == "/dev/shm")


def test_dev_shm_is_limited_to_a_quarter_of_the_step_memory(tmp_path):
    """A memory-backed emptyDir is bounded only by its sizeLimit, and its pages count against
    the pod's memory limit: without one, DataLoader workers can fill it until the step is
    OOM-killed."""
    pipeline, platform = _compiled(tmp_path, load_settings(EXAMPLE))
    assert _shm(platform, _executor(pipeline, "train")) == {
        "mountPath": "/dev/shm", "volumeName": "dshm", "medium": "Memory", "sizeLimit": "16G"}
    assert _shm(platform, _executor(pipeline, "evaluate"))["sizeLimit"] == "4G"


def test_an_explicit_shm_size_must_stay_below_the_step_memory(tmp_path):
    settings = settings_from_dict({"gpu": {"shm_size": "6Gi"}})
    pipeline, platform = _compiled(tmp_path, settings)
    assert _shm(platform, _executor(pipeline, "train"))["sizeLimit"] == "6Gi"
    with pytest.raises(SettingsError, match=r"gpu\.shm_size \(16G\) must be below "
                                            r"steps\.evaluate\.memory \(16G\)"):
        settings_from_dict({"gpu": {"shm_size": "16G"}})


def test_the_error_state_argo_does_not_retry_is_documented():
    """KFP compiles no Argo ``retryPolicy`` (argocompiler/container.go at 2.14.0-2.17.0), so
    Argo's default OnFailure (``RetryPolicyActual``, pkg/apis/workflow/v1alpha1/
    workflow_types.go at v3.7.3) leaves a node in Error — "pod deleted", operator.go — unretried
    (kubeflow/pipelines#13386). infra/README.md must say so and what to do."""
    readme = (REPO / "infra" / "README.md").read_text()
    assert "kubeflow/pipelines#13386" in readme and "pod deleted" in readme
    assert "THAW_CHECKPOINT_URI" in readme.split("kubeflow/pipelines#13386")[1][:1500]
