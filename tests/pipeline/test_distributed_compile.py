"""The compiled pipeline when the cluster settings spread the partial and full stages over
GPUs: in the pod (``training.gpus_per_node``) or over nodes through Kubeflow Trainer
(``training.num_nodes``). The defaults are the golden YAML (tests/pipeline/test_compile.py)."""

import pytest
import yaml

from pipelines.settings import SettingsError, settings_from_dict
from pipelines.thaw_pipeline import compile_pipeline
from thaw.config import DISTRIBUTED_ENV

STAGE_TASKS = {"probe": "train", "partial": "train-2", "full": "train-3"}
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _compiled(tmp_path, training: dict) -> dict:
    settings = settings_from_dict({
        "training": training, "image": "registry.example.com/thaw:1.2",
        "gpu": {"node_selector": {"gpu": "h100"}, "tolerations": [TOLERATION]}})
    path = compile_pipeline(tmp_path / "p.yaml", settings)
    pipeline, platform = yaml.safe_load_all(path.read_text())
    tasks = pipeline["components"]["comp-exit-handler-1"]["dag"]["tasks"]

    def task(stage):
        name = STAGE_TASKS[stage]
        label = pipeline["components"][tasks[name]["componentRef"]["name"]]["executorLabel"]
        return {"task": tasks[name],
                "inputs": tasks[name]["inputs"]["parameters"],
                "container": pipeline["deploymentSpec"]["executors"][label]["container"],
                "kubernetes": platform["platforms"]["kubernetes"]["deploymentSpec"]
                ["executors"][label]}
    return {stage: task(stage) for stage in STAGE_TASKS}


def _constant(inputs: dict, name: str):
    return inputs[name]["runtimeValue"]["constant"]


def test_two_nodes_of_four_gpus_make_partial_and_full_launch_trainjobs(tmp_path):
    tasks = _compiled(tmp_path, {"num_nodes": 2, "gpus_per_node": 4})
    for stage in ("partial", "full"):
        spec = tasks[stage]
        job = _constant(spec["inputs"], "trainjob")
        assert job["image"] == "registry.example.com/thaw:1.2"
        assert (job["num_nodes"], job["gpus_per_node"]) == (2, 4)
        assert job["runtime"] == "torch-distributed"
        assert job["node_selector"] == {"gpu": "h100"} and job["tolerations"] == [TOLERATION]
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in job["env"]
                   if "secretKeyRef" in e.get("valueFrom", {})}
        assert secrets == {"AWS_ACCESS_KEY_ID": "thaw-s3-credentials",
                           "AWS_SECRET_ACCESS_KEY": "thaw-s3-credentials"}
        assert not any("value" in e and "SECRET" in e["name"] for e in job["env"])
        assert "THAW_CHECKPOINT_URI" in {e["name"] for e in job["env"]}
        # the launcher itself holds no GPU: the TrainJob's nodes do
        assert "accelerator" not in spec["container"]["resources"]
        assert spec["container"]["resources"]["resourceCpuLimit"] == "1"
        assert "TrainJob, 2 nodes" in spec["task"]["taskInfo"]["name"]
        assert spec["task"]["retryPolicy"]["maxRetryCount"] == 2
    probe = tasks["probe"]
    assert "trainjob" not in probe["inputs"] and "gpus_per_node" not in probe["inputs"]
    assert probe["container"]["resources"]["accelerator"]["resourceCount"] == "1"


def test_four_gpus_in_one_pod_run_torchrun_there(tmp_path):
    tasks = _compiled(tmp_path, {"gpus_per_node": 4})
    for stage in ("partial", "full"):
        spec = tasks[stage]
        assert _constant(spec["inputs"], "gpus_per_node") == 4
        assert "trainjob" not in spec["inputs"]
        assert spec["container"]["resources"]["accelerator"]["resourceCount"] == "4"
        env = {e["name"]: e["value"] for e in spec["container"].get("env", [])}
        assert env.items() >= DISTRIBUTED_ENV.items()
        shm = spec["kubernetes"]["emptyDirMounts"]
        assert {"mountPath": "/dev/shm", "medium": "Memory"}.items() <= next(
            m for m in shm if m["mountPath"] == "/dev/shm").items()
    assert tasks["probe"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert "gpus_per_node" not in tasks["probe"]["inputs"]


@pytest.mark.parametrize(("training", "field"), [
    ({"num_nodes": 0}, "training.num_nodes"),
    ({"gpus_per_node": 0}, "training.gpus_per_node"),
    ({"start_timeout_s": 10, "timeout_s": 5}, "start_timeout_s must not exceed"),
])
def test_bad_training_settings_are_refused_by_name(training, field):
    with pytest.raises(SettingsError, match=field):
        settings_from_dict({"training": training})


def test_several_gpus_per_pod_need_gpu_steps():
    with pytest.raises(SettingsError, match="gpu.count"):
        settings_from_dict({"training": {"gpus_per_node": 2}, "gpu": {"count": 0}})
