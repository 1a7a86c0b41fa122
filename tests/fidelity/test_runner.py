"""The fidelity runner's own contract, on a tiny pipeline of stdlib components (seconds per
step under bubblewrap): isolation, staging through S3, Secret/ConfigMap env, retries with
fresh folders, caching by inputs, the exit handler's final status."""

import os
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
    return status.state


def _pipeline(marker_uri: str):
    make = {f.__name__: dsl.component(f, base_image="unused:bwrap", install_kfp_package=False)
            for f in (produce, consume, report)}

    @dsl.pipeline(name="fidelity-contract")
    def contract(text: str = "hello"):
        exit_task = make["report"]()
        with dsl.ExitHandler(exit_task):
            first = make["produce"](text=text).set_caching_options(True)
            kubernetes.use_secret_as_env(first, secret_name="creds",
                                         secret_key_to_env={"token": "TOKEN"})
            kubernetes.use_config_map_as_env(first, config_map_name="cfg",
                                             config_map_key_to_env={"region": "REGION"})
            second = make["consume"](data=first.outputs["out"],
                                     producer_path=first.outputs["Output"],
                                     marker_uri=marker_uri).set_caching_options(False)
            second.set_retry(num_retries=1, backoff_duration="0s")
            for task in (first, second):
                kubernetes.use_secret_as_env(task, secret_name="aws",
                                             secret_key_to_env={k: k for k in (
                                                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
                kubernetes.use_config_map_as_env(task, config_map_name="endpoints",
                                                 config_map_key_to_env={
                                                     "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"})

    return contract


@pytest.fixture
def runner_for(stack, tmp_path):
    env = os.environ

    def make(secrets: dict) -> FidelityRunner:
        cluster = ClusterPlay(
            secrets={"aws": {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
                     **secrets},
            config_maps={"endpoints": {"AWS_ENDPOINT_URL": env["AWS_ENDPOINT_URL"]},
                         "cfg": {"region": "eu-north-1"}})
        return FidelityRunner(Sandbox.detect("bwrap"), cluster,
                              pipeline_root=f"s3://{stack.bucket}/fidelity-{uuid.uuid4().hex[:6]}",
                              work_dir=tmp_path / "work", echo=lambda line: None)

    return make


@pytest.fixture
def spec(tmp_path, stack):
    marker = f"s3://{stack.bucket}/markers/{uuid.uuid4().hex}"
    path = tmp_path / "contract.yaml"
    compiler.Compiler().compile(_pipeline(marker), str(path))
    return path


def test_steps_are_isolated_staged_through_s3_retried_cached_and_finalized(runner_for, spec):
    runner = runner_for({"creds": {"token": "s3cret"}})
    result = runner.run(spec, {"text": "hi"})
    tasks = result.tasks
    assert result.state == "SUCCEEDED", {k: (t.state, t.error) for k, t in tasks.items()}
    second = tasks["exit-handler-1/consume"]
    assert second.attempts == 2
    assert second.parameters["Output"] == "hi:s3cret:eu-north-1|isolated"
    produced = tasks["exit-handler-1/produce"].artifacts["out"]["uri"]
    assert storage.exists(produced), "outputs are uploaded to the pipeline root"
    assert tasks["report"].parameters["Output"] == "SUCCEEDED"

    again = runner.run(spec, {"text": "hi"})
    assert again.tasks["exit-handler-1/produce"].state == "CACHED"
    other = runner.run(spec, {"text": "changed"})
    assert other.tasks["exit-handler-1/produce"].state == "SUCCEEDED", "new input, no hit"


def test_a_missing_secret_key_fails_the_step_and_the_exit_handler_sees_it(runner_for, spec):
    result = runner_for({"creds": {}}).run(spec, {"text": "hi"})
    produce_task = result.tasks["exit-handler-1/produce"]
    assert result.state == "FAILED" and produce_task.state == "FAILED"
    assert "'creds' has no key 'token'" in produce_task.error
    assert result.tasks["exit-handler-1/consume"].state == "SKIPPED"
    assert result.tasks["report"].parameters["Output"] == "FAILED"
