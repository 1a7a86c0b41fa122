"""Cluster settings at compile time: `thaw compile --config cluster.yaml`."""

from pathlib import Path

import pytest
import yaml

from pipelines.settings import SettingsError, load_settings, settings_from_dict
from pipelines.thaw_pipeline import compile_pipeline
from thawctl.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "infra" / "cluster.example.yaml"
GPU_TASKS = {"train", "train-2", "train-3", "train-4", "evaluate", "register"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "x.yaml"
    assert main(["compile", "--config", str(EXAMPLE), "--output", str(out)]) == 0
    text = out.read_text()
    pipeline, platform = yaml.safe_load_all(text)
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], text


def _executor_of(pipeline, task):
    dag = pipeline["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    component = dag[task]["componentRef"]["name"] if task in dag else \
        pipeline["root"]["dag"]["tasks"][task]["componentRef"]["name"]
    return pipeline["components"][component]["executorLabel"]


def test_gpu_requests_node_selectors_and_tolerations_sit_on_gpu_steps_only(compiled):
    pipeline, platform, _ = compiled
    dag = pipeline["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    for task in [*dag, "finalize"]:
        label = _executor_of(pipeline, task)
        container = pipeline["deploymentSpec"]["executors"][label]["container"]
        has_gpu = "accelerator" in container.get("resources", {})
        assert has_gpu == (task in GPU_TASKS), task
        assert ("nodeSelector" in platform[label]) == (task in GPU_TASKS), task
        assert ("tolerations" in platform[label]) == (task in GPU_TASKS), task
        if task in GPU_TASKS:
            assert platform[label]["nodeSelector"]["labels"] == {
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
            assert platform[label]["tolerations"][0]["effect"] == "NoSchedule"


def test_secrets_are_references_the_root_and_image_are_set(compiled):
    pipeline, platform, text = compiled
    assert pipeline["defaultPipelineRoot"] == "s3://thaw/pipeline-root"
    for executor in pipeline["deploymentSpec"]["executors"].values():
        assert executor["container"]["image"] == "registry.example.com/ml/thaw:0.1.0"
        env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        # only the tracking URI and botocore's checksum settings are set directly: no secrets
        assert set(env) == {"MLFLOW_TRACKING_URI", "AWS_REQUEST_CHECKSUM_CALCULATION",
                            "AWS_RESPONSE_CHECKSUM_VALIDATION"}
    for executor in platform.values():
        assert executor["secretAsEnv"][0]["secretName"] == "thaw-s3-credentials"
        assert [k["envVar"] for k in executor["secretAsEnv"][0]["keyToEnv"]] == [
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    assert "secretAccessKey:" not in text and "REPLACE" not in text


def test_resources_retries_and_caching_per_step(compiled):
    pipeline, platform, _ = compiled
    dag = pipeline["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    executors = pipeline["deploymentSpec"]["executors"]
    train = executors[_executor_of(pipeline, "train")]["container"]["resources"]
    assert train["memoryLimit"] == 64.0 and train["cpuLimit"] == 8.0
    assert dag["train"]["retryPolicy"]["backoffDuration"] == "60s"
    assert dag["preprocess"]["cachingOptions"] == {"enableCache": True}
    assert dag["register"]["cachingOptions"] == {}
    scratch = platform[_executor_of(pipeline, "preprocess")]["emptyDirMounts"]
    assert scratch == [{"mountPath": "/tmp", "volumeName": "scratch", "sizeLimit": "200Gi"}]


@pytest.mark.parametrize(("data", "message"), [
    ({"imagee": "x"}, "unknown field(s) ['imagee']"),
    ({"gpu": {"count": "two"}}, "gpu.count: expected int"),
    ({"gpu": {"tolerations": [{"operator": "Maybe"}]}}, "operator must be one of"),
    ({"steps": {"trian": {}}}, "unknown step(s) ['trian']"),
    ({"steps": {"train": {"retry": {"num_retries": -1}}}}, "num_retries must be >= 0"),
    ({"pipeline_root": "/local/path"}, "pipeline_root must be an s3://"),
])
def test_bad_settings_are_refused_naming_the_field(data, message):
    with pytest.raises(SettingsError) as err:
        settings_from_dict(data)
    assert message in str(err.value)


def test_a_step_override_keeps_the_other_defaults():
    settings = settings_from_dict({"steps": {"train": {"retry": {"backoff_duration": "1s"}}}})
    assert settings.step("train").retry.backoff_duration == "1s"
    assert settings.step("train").retry.num_retries == 2
    assert settings.step("train").memory == "32G"
    assert load_settings(None) == settings_from_dict({})


def test_the_command_line_says_what_is_wrong(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpu: {count: -1}\n")
    assert main(["compile", "--config", str(bad), "--output", str(tmp_path / "x.yaml")]) == 2
    assert "gpu.count must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_the_default_spec_matches_the_golden_file(tmp_path):
    golden = Path(__file__).resolve().parents[2] / "pipelines" / "thaw_pipeline.yaml"
    assert compile_pipeline(tmp_path / "d.yaml").read_text() == golden.read_text()
