"""The fidelity runner's own contract, on tiny pipelines of stdlib components (seconds per
step under bubblewrap): isolation, staging through S3, Secret/ConfigMap env, retries with
fresh folders, caching, the exit handler's final status, independent steps side by side.

Where it imitates the backend, each test names the kubeflow/pipelines (or Argo) file it
follows, at the tags thaw supports (2.14.0-2.17.0).
"""

import os
import re
import shutil
import uuid

import pytest
from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Input, Output

from thaw import storage
from thawctl.fidelity import ClusterPlay, FidelityRunner
from thawctl.sandbox import Sandbox

pytestmark = [pytest.mark.fidelity]

if shutil.which("bwrap") is None:
    reason = "bubblewrap is not installed (apt-get install bubblewrap): fidelity tier skipped"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " — CI must run it", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

PRODUCE, CONSUME = "exit-handler-1/produce", "exit-handler-1/consume"


def produce(text: str, out: Output[Artifact]) -> str:
    import os

    with open(out.path, "w") as f:
        f.write(text + ":" + os.environ["TOKEN"] + ":" + os.environ["REGION"])
    side = os.path.join(os.path.dirname(out.path), "not-an-output.txt")
    with open(side, "w") as f:  # written, but not an artifact: no other step may see it
        f.write("private")
    return side


def consume(data: Input[Artifact], producer_path: str, marker_uri: str) -> str:
    import os

    import boto3

    bucket, _, key = marker_uri[len("s3://"):].partition("/")
    s3 = boto3.client("s3")
    if not s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"attempt 1")
        with open("/tmp/kfp_outputs/leftover", "w") as f:
            f.write("a failed attempt's file")
        raise SystemExit(1)  # the first attempt dies, as a lost pod would
    assert not os.path.exists("/tmp/kfp_outputs/leftover"), "retry must start empty"
    seen = "other step's path visible" if os.path.exists(producer_path) else "isolated"
    return open(data.path).read() + "|" + seen


def report(status: dsl.PipelineTaskFinalStatus) -> str:
    return f"{status.state} {status.pipeline_task_name} {status.error_message}"


def meet(me: str, other: str, marker_prefix: str) -> str:
    """Leave a mark, then wait for the other step's: passes only if both run at once."""
    import time

    import boto3

    bucket, _, prefix = marker_prefix[len("s3://"):].partition("/")
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{me}", Body=b"here")
    for _ in range(240):
        if s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{other}").get("KeyCount"):
            return "met"
        time.sleep(0.5)
    raise SystemExit(f"{other} never ran while {me} was running")


def fail_late(seconds: int) -> None:
    import time

    time.sleep(seconds)
    raise SystemExit(1)


def fail_then_hang(marker_uri: str) -> None:
    import time

    import boto3

    bucket, _, key = marker_uri[len("s3://"):].partition("/")
    s3 = boto3.client("s3")
    if not s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"attempt 1")
        raise SystemExit(1)
    time.sleep(600)


def _component(func):
    return dsl.component(func, base_image="unused:bwrap", install_kfp_package=False)


def _with_s3(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, secret_name="aws", secret_key_to_env={
        k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    kubernetes.use_config_map_as_env(task, config_map_name="endpoints",
                                     config_map_key_to_env={
                                         "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"})
    return task


def _contract(marker_uri: str, name: str = "fidelity-contract"):
    @dsl.pipeline(name=name)
    def contract(text: str = "hello"):
        exit_task = _component(report)()
        with dsl.ExitHandler(exit_task):
            first = _component(produce)(text=text).set_caching_options(True)
            kubernetes.use_secret_as_env(first, secret_name="creds",
                                         secret_key_to_env={"token": "TOKEN"})
            kubernetes.use_config_map_as_env(first, config_map_name="cfg",
                                             config_map_key_to_env={"region": "REGION"})
            second = _component(consume)(data=first.outputs["out"],
                                         producer_path=first.outputs["Output"],
                                         marker_uri=marker_uri).set_caching_options(False)
            second.set_retry(num_retries=1, backoff_duration="0s")
            for task in (first, second):
                _with_s3(task)

    return contract


@pytest.fixture
def runner_for(stack, tmp_path):
    env = os.environ
    root = f"s3://{stack.bucket}/fidelity-{uuid.uuid4().hex[:6]}"

    def make(secrets: dict, namespace: str = "kubeflow") -> FidelityRunner:
        cluster = ClusterPlay(
            secrets={"aws": {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
                     **secrets},
            config_maps={"endpoints": {"AWS_ENDPOINT_URL": env["AWS_ENDPOINT_URL"]},
                         "cfg": {"region": "eu-north-1"}},
            namespace=namespace)
        return FidelityRunner(Sandbox.detect("bwrap"), cluster, pipeline_root=root,
                              work_dir=tmp_path / "work", echo=lambda line: None)

    return make


@pytest.fixture
def compiled(tmp_path, stack):
    """Compile a pipeline function into a YAML file."""

    def compile_(pipeline, file_name: str = "pipeline.yaml"):
        path = tmp_path / file_name
        compiler.Compiler().compile(pipeline, str(path))
        return path

    return compile_


def _marker(stack) -> str:
    return f"s3://{stack.bucket}/markers/{uuid.uuid4().hex}"


def test_steps_are_isolated_staged_through_s3_retried_cached_and_finalized(
        runner_for, compiled, stack):
    """Task states are the MLMD execution states (``driver/container.go``,
    ``component/launcher_v2.go``); the exit handler gets the struct ``driver/resolve.go``
    builds (state COMPLETE of its DAG, the DAG's task name, an empty error); outputs go to
    ``<root>/<pipeline>/<run id>/<task>/<uuid>/<output>`` (``driver/driver.go``
    ``provisionOutputs`` with a fresh ``uuid.NewString()`` per execution,
    ``driver/container.go``)."""
    spec = compiled(_contract(_marker(stack)))
    runner = runner_for({"creds": {"token": "s3cret"}})
    result = runner.run(spec, {"text": "hi"})
    tasks = result.tasks
    assert result.state == "SUCCEEDED", {k: (t.state, t.error) for k, t in tasks.items()}
    assert {name: t.state for name, t in tasks.items()} == {
        PRODUCE: "COMPLETE", CONSUME: "COMPLETE", "exit-handler-1": "COMPLETE",
        "report": "COMPLETE"}
    assert tasks[CONSUME].attempts == 2
    assert tasks[CONSUME].parameters["Output"] == "hi:s3cret:eu-north-1|isolated"
    assert tasks["report"].parameters["Output"] == "COMPLETE exit-handler-1 None"
    produced = tasks[PRODUCE].artifacts["out"]["uri"]
    uri_form = (re.escape(f"{runner.default_root}/fidelity-contract/{result.run_id}/produce/")
                + r"[0-9a-f-]{36}/out")
    assert re.fullmatch(uri_form, produced), produced
    assert storage.exists(produced), "outputs are uploaded to the pipeline root"

    again = runner.run(spec, {"text": "hi"})
    assert again.tasks[PRODUCE].state == "CACHED"
    assert again.tasks[PRODUCE].artifacts["out"]["uri"] == produced, "the cached outputs"
    other = runner.run(spec, {"text": "changed"})
    assert other.tasks[PRODUCE].state == "COMPLETE", "new input, no hit"


def test_the_cache_is_scoped_per_pipeline_name_and_namespace(runner_for, compiled, stack):
    """``driver/cache.go`` looks a fingerprint up with ``"pipeline/" + PipelineName`` and the
    run's namespace; the fingerprint (``cacheutils/cache.go`` ``GenerateCacheKey``) holds no
    pipeline root and no input URI."""
    marker = _marker(stack)
    spec = compiled(_contract(marker))
    secrets = {"creds": {"token": "s3cret"}}
    assert runner_for(secrets).run(spec).tasks[PRODUCE].state == "COMPLETE"
    assert runner_for(secrets).run(spec).tasks[PRODUCE].state == "CACHED"

    other_namespace = runner_for(secrets, namespace="team-b").run(spec)
    assert other_namespace.tasks[PRODUCE].state == "COMPLETE"
    renamed = compiled(_contract(marker, name="fidelity-contract-copy"), "copy.yaml")
    assert runner_for(secrets).run(renamed).tasks[PRODUCE].state == "COMPLETE"


@pytest.mark.parametrize(("secrets", "shown"), [
    ({"creds": {}}, "couldn't find key token in Secret kubeflow/creds"),
    ({}, 'secret "creds" not found'),
])
def test_a_missing_secret_leaves_the_pod_pending_never_retried_and_the_run_unfinished(
        runner_for, compiled, stack, secrets, shown):
    """The kubelet cannot build the container's env (``pkg/kubelet/kubelet_pods.go``
    ``makeEnvironmentVariables``): the pod stays Pending with CreateContainerConfigError,
    Argo shows "<reason>: <message>" (``workflow/controller/operator.go``
    ``getPendingReason``) and never fails the node, so nothing is retried, nothing
    downstream starts, and the exit handler never runs."""
    result = runner_for(secrets).run(compiled(_contract(_marker(stack))), {"text": "hi"})
    stuck = result.tasks[PRODUCE]
    assert (result.state, stuck.state, stuck.attempts) == ("RUNNING", "RUNNING", 0)
    assert stuck.error == f"pod Pending, CreateContainerConfigError: {shown}"
    assert result.failed_task() is stuck
    assert CONSUME not in result.tasks and "report" not in result.tasks


def test_independent_steps_run_side_by_side(runner_for, compiled, stack):
    """Argo starts every DAG task whose dependencies are done: two tasks with no dependency
    between them run at once (each waits for the other's mark)."""
    prefix = _marker(stack)

    @dsl.pipeline(name="fidelity-side-by-side")
    def side_by_side():
        for me, other in (("left", "right"), ("right", "left")):
            _with_s3(_component(meet)(me=me, other=other, marker_prefix=prefix)
                     .set_caching_options(False))

    result = runner_for({}).run(compiled(side_by_side))
    assert result.state == "SUCCEEDED", {k: t.error for k, t in result.tasks.items()}
    assert {t.parameters["Output"] for t in result.tasks.values()} == {"met"}


def test_retries_stay_inside_argos_window_from_the_first_start(runner_for, compiled, stack):
    """``backoff.maxDuration`` is counted from the first attempt's start
    (``workflow/controller/operator.go`` ``processNodeRetries`` at v3.6.7-v4.0.5): a step
    that fails after the window is not retried, and a retry is killed at the window's end
    (its ``executionDeadline``; ``workflow/executor/executor.go`` ``monitorDeadline``)."""
    marker = _marker(stack)

    @dsl.pipeline(name="fidelity-retry-window")
    def retry_window():
        _component(fail_late)(seconds=4).set_caching_options(False).set_retry(
            num_retries=2, backoff_duration="0s", backoff_max_duration="2s")
        _with_s3(_component(fail_then_hang)(marker_uri=marker).set_caching_options(False)
                 ).set_retry(num_retries=2, backoff_duration="0s", backoff_max_duration="30s")

    tasks = runner_for({}).run(compiled(retry_window)).tasks
    late, hung = tasks["fail-late"], tasks["fail-then-hang"]
    assert (late.state, late.attempts) == ("FAILED", 1)
    assert late.error.endswith("(not retried: Max duration limit exceeded)")
    assert (hung.state, hung.attempts) == ("FAILED", 2)
    assert hung.error == "Step exceeded its deadline (not retried: Max duration limit exceeded)"
