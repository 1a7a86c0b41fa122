"""The compiled pipeline: the spec a person uploads in the Kubeflow UI."""

from pathlib import Path

import pytest
import yaml

from pipelines.thaw_pipeline import compile_pipeline

GOLDEN = Path(__file__).resolve().parents[2] / "pipelines" / "thaw_pipeline.yaml"
STEPS = ["source-version", "preprocess", "train", "train-2", "train-3", "train-4", "evaluate",
         "register"]
TRAINED = {"train", "train-2", "train-3", "train-4"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "p.yaml")
    documents = list(yaml.safe_load_all(path.read_text()))
    return {"pipeline": documents[0], "platform": documents[1], "text": path.read_text()}


def _dag(spec):
    return spec["pipeline"]["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def test_steps_and_their_order(spec):
    tasks = _dag(spec)
    assert sorted(tasks) == sorted(STEPS)
    deps = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert deps["source-version"] == set()
    assert deps["preprocess"] == {"source-version"}
    assert deps["train"] == {"preprocess"}
    assert deps["train-2"] == {"preprocess", "train"}
    assert deps["train-3"] == {"preprocess", "train-2"}
    assert deps["train-4"] == {"preprocess", "train"}  # lora starts from the probe
    assert deps["evaluate"] == {"preprocess"} | TRAINED
    # register gets the models and the data (the champion gate scores the champion on it) as
    # its own inputs, never paths inside another step's pod
    assert deps["register"] == {"preprocess", "evaluate"} | TRAINED
    assert sorted(tasks["register"]["inputs"]["artifacts"]) == [
        "full_model", "lora_model", "partial_model", "prepared", "probe_model", "report"]
    assert "promote_on_class_change" in tasks["register"]["inputs"]["parameters"]
    names = [tasks[t]["taskInfo"]["name"] for t in STEPS]
    assert names[2].startswith("probe") and names[4].startswith("full")


def test_the_lora_stage_starts_from_the_probe_and_its_parameter_switches_it(spec):
    tasks = _dag(spec)
    lora = tasks["train-4"]
    assert lora["taskInfo"]["name"].startswith("lora")
    assert lora["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"] == "lora"
    assert lora["inputs"]["parameters"]["enabled"]["componentInputParameter"] == \
        "pipelinechannel--lora"
    assert lora["inputs"]["parameters"]["epochs"]["componentInputParameter"] == \
        "pipelinechannel--lora_epochs"
    assert lora["inputs"]["artifacts"]["init_model"]["taskOutputArtifact"]["producerTask"] == \
        "train"  # the probe's model, like partial
    assert lora["retryPolicy"]["maxRetryCount"] == 2
    for step in ("evaluate", "register"):
        source = tasks[step]["inputs"]["artifacts"]["lora_model"]["taskOutputArtifact"]
        assert source["producerTask"] == "train-4"
    params = spec["pipeline"]["root"]["inputDefinitions"]["parameters"]
    assert params["lora"]["defaultValue"] is False
    assert {"lora_epochs", "lora_lr"} <= set(params)
    checked = tasks["preprocess"]["inputs"]["parameters"]  # refused before any data is read
    assert {"lora", "lora_epochs", "lora_lr"} <= set(checked)


def test_preprocess_cache_key_includes_the_source_version(spec):
    """Caching on data_uri alone would reuse old shards after the bucket changed."""
    tasks = _dag(spec)
    version = tasks["preprocess"]["inputs"]["parameters"]["source_version"]
    assert version["taskOutputParameter"]["producerTask"] == "source-version"
    assert tasks["source-version"]["cachingOptions"] == {}


def test_exit_handler_closes_the_mlflow_run(spec):
    root = spec["pipeline"]["root"]["dag"]["tasks"]
    assert root["finalize"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert root["finalize"]["dependentTasks"] == ["exit-handler-1"]


def test_training_requests_a_gpu_and_retries_and_caching_is_chosen(spec):
    tasks = _dag(spec)
    executors = spec["pipeline"]["deploymentSpec"]["executors"]
    for name in ("train", "train-2", "train-3"):
        task = tasks[name]
        assert task["retryPolicy"]["maxRetryCount"] == 2
        assert task["cachingOptions"] == {}  # caching off
        executor = executors[spec["pipeline"]["components"][task["componentRef"]["name"]]
                             ["executorLabel"]]
        assert executor["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert tasks["preprocess"]["cachingOptions"] == {"enableCache": True}
    assert tasks["register"]["cachingOptions"] == {}


def test_parameters_have_defaults_from_the_library(spec):
    from thaw.config import DEFAULT_STAGES, PIPELINE_DEFAULTS

    params = spec["pipeline"]["root"]["inputDefinitions"]["parameters"]
    assert params["backbone"]["defaultValue"] == PIPELINE_DEFAULTS.backbone
    assert params["full_lr"]["defaultValue"] == DEFAULT_STAGES["full"].lr
    assert params["promotion_margin"]["parameterType"] == "NUMBER_DOUBLE"


def test_credentials_come_from_a_secret_and_never_appear(spec):
    platform = spec["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for executor in platform.values():
        assert executor["secretAsEnv"][0]["secretName"] == "thaw-s3-credentials"
    assert "aws_secret_access_key:" not in spec["text"].lower()
    for value in ("testing", "minioadmin", "thaw-local-secret"):
        assert value not in spec["text"]


def test_the_default_image_is_what_make_image_builds(spec):
    import subprocess

    root = GOLDEN.parents[1]
    built = subprocess.run(["make", "-s", "-C", str(root), "image-name"], capture_output=True,
                           text=True, check=True).stdout.strip()
    images = {e["container"]["image"]
              for e in spec["pipeline"]["deploymentSpec"]["executors"].values()}
    assert images == {built}


def test_golden_yaml_is_up_to_date(spec):
    """pipelines/thaw_pipeline.yaml is what users upload; regenerate with `make compile`."""
    assert GOLDEN.read_text() == spec["text"], "stale golden YAML: run `make compile`"


def test_the_minimum_kfp_backend_is_stated_where_operators_look(spec):
    from pipelines.thaw_pipeline import MIN_KFP_BACKEND

    root = GOLDEN.parents[1]
    assert f">= {MIN_KFP_BACKEND}" in spec["pipeline"]["pipelineInfo"]["description"]
    for doc in (root / "README.md", root / "infra" / "README.md"):
        assert f"Kubeflow Pipelines >= {MIN_KFP_BACKEND}" in doc.read_text(), doc


def test_every_parameter_has_a_description_for_the_kubeflow_ui(spec):
    params = spec["pipeline"]["root"]["inputDefinitions"]["parameters"]
    missing = [name for name, p in params.items() if len(p.get("description", "")) < 10]
    assert not missing, missing


def test_the_kubeflow_ui_shows_the_chosen_stage_confusion_matrix(spec):
    """Register chose the stage, so register (not evaluate) shows its confusion matrix."""
    components = spec["pipeline"]["components"]
    outputs = components["comp-register"]["outputDefinitions"]["artifacts"]
    assert outputs["confusion"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    assert outputs["summary"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert "confusion" not in components["comp-evaluate"]["outputDefinitions"]["artifacts"]
