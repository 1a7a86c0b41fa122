"""The whole pipeline through kfp.local on the embedded stack, from s3://, as `make demo`."""

import subprocess
import sys
import uuid

import mlflow
import pytest
from mlflow import MlflowClient

from thaw.backbones import data_config
from thaw.data.prepare import prepare_dataset
from thaw.data.prepared import open_prepared
from thaw.errors import ThawError
from thawctl.local_run import DEMO_PARAMETERS, run_local, upload_sample

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
FAST = {"probe_epochs": 3, "partial_epochs": 1, "full_epochs": 1}


@pytest.fixture(scope="module")
def names(stack):
    suffix = uuid.uuid4().hex[:8]
    uri = upload_sample(f"s3://{stack.bucket}/datasets/sample-{suffix}")
    return {"data_uri": uri, "mlflow_experiment": f"e2e-{suffix}",
            "model_name": f"e2e-model-{suffix}"}


@pytest.fixture(scope="module")
def first_run(names, tmp_path_factory):
    root = tmp_path_factory.mktemp("kfp")
    return run_local({**DEMO_PARAMETERS, **FAST, **names}, root), root


def test_first_run_registers_a_champion(first_run, names):
    outcome, root = first_run
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{names['model_name']}'")
    assert len(versions) == 1
    assert outcome["promoted"] and outcome["version"] == versions[0].version
    champion = client.get_model_version_by_alias(names["model_name"], "champion")
    assert champion.version == versions[0].version
    best_val = max(s["val"]["macro_f1"] for s in outcome["stages"])
    assert next(s for s in outcome["stages"] if s["stage"] == outcome["stage"])["val"][
        "macro_f1"] == best_val
    assert list((root).rglob("manifest.json")), "the prepared dataset artifact exists"
    assert len(list(root.rglob("best.pt"))) == 3, "each stage's model artifact exists"


def test_mlflow_holds_the_parent_and_three_stage_runs(first_run, names):
    runs = mlflow.search_runs(experiment_names=[names["mlflow_experiment"]],
                              output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.data.tags["thaw.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(children) == ["full", "partial", "probe"]
    client = MlflowClient()
    for run in children.values():
        assert run.info.status == "FINISHED"
        assert {"val_macro_f1", "val_accuracy", "train_loss", "test_macro_f1",
                "test_accuracy"} <= set(run.data.metrics)
        curve = client.get_metric_history(run.info.run_id, "val_macro_f1")
        assert [m.step for m in curve] == list(range(len(curve)))  # 0: the starting point
    # The probe's starting point, then its three epochs.
    assert len(client.get_metric_history(children["probe"].info.run_id, "val_loss")) == 4


def test_champion_pyfunc_predicts_held_out_images(first_run, names, tmp_path, sample_dir):
    prepare_dataset(str(sample_dir), tmp_path / "p", data_config=data_config("efficientnet_lite0",
                                                                              64))
    data = open_prepared(tmp_path / "p")
    images, labels = data.images("test"), data.labels("test")
    model = mlflow.pyfunc.load_model(f"models:/{names['model_name']}@champion")
    predicted = model.predict(images)["label"].tolist()
    truth = [data.manifest.classes[i] for i in labels]
    accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    assert accuracy > 0.4, accuracy  # chance is 0.1


@pytest.mark.nightly  # a second whole run; the gate itself: tests/integration/test_champion_gate.py
def test_a_run_that_is_not_better_leaves_the_alias(first_run, names, tmp_path):
    outcome, _ = first_run
    second = run_local({**DEMO_PARAMETERS, **FAST, **names, "promotion_margin": 1.0}, tmp_path)
    assert not second["promoted"] and "does not beat" in second["reason"]
    champion = MlflowClient().get_model_version_by_alias(names["model_name"], "champion")
    assert champion.version == outcome["version"] != second["version"]


def test_a_failing_run_registers_nothing_and_fails_its_mlflow_run(first_run, names, tmp_path):
    before = MlflowClient().search_model_versions(f"name='{names['model_name']}'")
    bad = {**DEMO_PARAMETERS, **FAST, **names, "data_uri": "s3://thaw/datasets/does-not-exist"}
    with pytest.raises(ThawError, match="pipeline failed"):
        run_local(bad, tmp_path)
    after = MlflowClient().search_model_versions(f"name='{names['model_name']}'")
    assert len(after) == len(before)
    newest = mlflow.search_runs(experiment_names=[names["mlflow_experiment"]],
                                output_format="list", order_by=["attributes.start_time DESC"],
                                filter_string="tags.thaw.pipeline_run_id != ''")[0]
    assert newest.info.status == "FAILED"


def test_a_failing_run_local_ends_with_the_step_and_its_error(stack, tmp_path):
    """What a person sees: one line per step, and at the end the failed step's name, its
    ThawError text and where its full log is; no executor JSON, no traceback wall."""
    missing = f"s3://{stack.bucket}/datasets/not-there-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(
        [sys.executable, "-m", "thawctl.cli", "run-local", "--param", f"data_uri={missing}"],
        capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 2
    out = done.stdout + done.stderr
    last = "\n".join(out.strip().splitlines()[-3:])
    assert "source-version" in last
    assert f"nothing found at {missing}" in last
    assert "full log: " in last and ".thaw" in last
    assert "executor_input" not in out and "Traceback" not in out
    assert len(out.splitlines()) < 15, out
