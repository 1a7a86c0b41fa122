"""The champion gate against a real MLflow server (the embedded stack) with real models on the
committed sample: the champion is scored on the new run's data, never by its recorded tags."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from thaw import champion, tracking
from thaw.backbones import create_backbone
from thaw.checkpoint import save_checkpoint
from thaw.config import stage_config
from thaw.data.prepared import PreparedDataset
from thaw.errors import ThawError
from thaw.serving import log_classifier
from thaw.stack import StackInfo
from thaw.stages import run_stage, score_checkpoint
from thaw.steps import OUTCOME_FILE, register_step

pytestmark = pytest.mark.slow
ARCH = "efficientnet_lite0"


# -- the rules, no server needed ---------------------------------------------------------

def test_unknown_metric_names_the_allowed_ones() -> None:
    with pytest.raises(ThawError, match=r"unknown selection metric 'auc': expected one of "
                                        r"accuracy, loss, macro_f1"):
        champion.check_metric("auc")


def test_direction_margin_and_ties() -> None:
    assert champion.beats("macro_f1", 0.81, 0.80, 0.0)
    assert not champion.beats("macro_f1", 0.80, 0.80, 0.0), "a tie never promotes"
    assert not champion.beats("macro_f1", 0.805, 0.80, 0.01)
    assert champion.beats("macro_f1", 0.81, 0.80, 0.01), "a gain equal to the margin counts"
    assert champion.beats("loss", 0.40, 0.50, 0.05), "lower loss is better"
    assert not champion.beats("loss", 0.50, 0.40, 0.0)
    assert not champion.beats("loss", 0.50, 0.50, 0.0)
    stages = [{"stage": "probe", "score": {"loss": 0.3}}, {"stage": "full", "score": {"loss": 0.3}},
              {"stage": "partial", "score": {"loss": 0.5}}]
    assert champion.choose(stages, "loss")["stage"] == "full", "a tie goes to the later stage"


# -- two real models on the sample -------------------------------------------------------

@pytest.fixture(scope="module")
def models(prepared_sample: PreparedDataset, tmp_path_factory) -> dict[str, Path]:
    """``trained``: a probed head (real ImageNet backbone); ``untrained``: the same backbone
    with a random head; ``other_classes``: a model of another class list."""
    root = tmp_path_factory.mktemp("models")
    run_stage(prepared_sample, stage_config("probe", epochs=4), root / "trained", arch=ARCH,
              weights="packaged")
    meta = {"classes": prepared_sample.manifest.classes, "stage": "probe",
            "data_config": prepared_sample.manifest.data_config()}
    torch.manual_seed(7)
    model = create_backbone(ARCH, len(meta["classes"]), "packaged")
    save_checkpoint(root / "untrained" / "best.pt", model, meta)
    other = [*meta["classes"][:-1], "Hat"]
    save_checkpoint(root / "other_classes" / "best.pt", model, {**meta, "classes": other})
    return {name: root / name / "best.pt" for name in ("trained", "untrained", "other_classes")}


@pytest.fixture(scope="module")
def scores(models, prepared_sample) -> dict[str, dict]:
    out = {name: score_checkpoint(models[name], prepared_sample, "val")
           for name in ("trained", "untrained")}
    assert out["trained"]["macro_f1"] > out["untrained"]["macro_f1"] + 0.2, out
    assert out["trained"]["loss"] < out["untrained"]["loss"], out
    return out


def _parent() -> str:
    return tracking.ensure_parent_run(f"gate-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex)


def _champion(model: str, checkpoint: Path, **tags: str) -> str:
    """Register ``checkpoint`` as ``model``'s champion directly, with ``tags``."""
    run = tracking.start_stage_run(_parent(), "probe", {})
    info = log_classifier(checkpoint, run_id=run, registered_model_name=model)
    version = info.registered_model_version
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model, version, key, value)
    client.set_registered_model_alias(model, "champion", version)
    return str(version)


def _candidate(parent: str, stage: str, checkpoint: Path, val: float = 0.99) -> dict:
    """A finished stage run whose training claims validation ``val``."""
    run_id = tracking.start_stage_run(parent, stage, {})
    return {"stage": stage, "run_id": run_id, "checkpoint": str(checkpoint),
            "val": {"accuracy": val, "macro_f1": val, "loss": 0.01}, "test": {}}


def _register(data: PreparedDataset, model: str, checkpoint: Path, **options) -> dict:
    parent = _parent()
    return tracking.register_best(
        parent_run_id=parent, model_name=model, candidates=[_candidate(parent, "full", checkpoint)],
        data=data, data_fingerprint=data.manifest.fingerprint, pipeline_run_id="p", **options)


def _report(data: PreparedDataset, dirs: dict[str, Path]) -> dict:
    stages = [{"stage": stage, "run_id": tracking.start_stage_run(_parent(), stage, {}),
               "val": {"accuracy": 0.99, "macro_f1": 0.99, "loss": 0.01},
               "test": {"accuracy": 0.5, "macro_f1": 0.5}, "best_epoch": 1,
               "wall_seconds": 1.0, "train_images_per_sec": 1.0} for stage in dirs]
    return {"classes": data.manifest.classes, "fingerprint": data.manifest.fingerprint,
            "stages": stages}


def test_better_on_its_own_validation_but_worse_here_is_not_promoted(
        stack: StackInfo, prepared_sample, models, scores) -> None:
    """The champion's recorded val tag is absurdly low and the challenger's training claims
    0.99: the gate scores both on this run's val split and keeps the champion."""
    client = MlflowClient()
    model = f"gate-{uuid.uuid4().hex[:8]}"
    old = _champion(model, models["trained"], val_macro_f1="0.01")
    experiment, pipeline_run = f"gate-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    dirs = {"full": models["untrained"].parent}
    outcome = register_step(_report(prepared_sample, dirs), dirs, prepared_sample.root,
                            experiment=experiment, pipeline_run_id=pipeline_run,
                            model_name=model, selection_metric="macro_f1", promotion_margin=0.0)

    assert not outcome["promoted"] and outcome["champion_version"] == old
    assert client.get_model_version_by_alias(model, "champion").version == old
    gate = outcome["gate"]
    assert gate["champion"]["val"]["macro_f1"] == pytest.approx(scores["trained"]["macro_f1"])
    assert gate["challenger"]["val"]["macro_f1"] == pytest.approx(
        scores["untrained"]["macro_f1"])
    reason = outcome["reason"]
    assert f"champion v{old} {scores['trained']['macro_f1']:.4f}" in reason
    assert f"v{outcome['version']} (full) {scores['untrained']['macro_f1']:.4f}" in reason
    assert "does not beat champion" in reason and "Test macro_f1" in reason

    version = client.get_model_version(model, outcome["version"])
    assert version.tags["thaw.promotion"] == reason
    assert float(version.tags["val_macro_f1"]) == pytest.approx(scores["untrained"]["macro_f1"])
    parent = tracking.ensure_parent_run(experiment, pipeline_run)
    assert client.get_run(parent).data.tags["thaw.promotion"] == reason
    assert client.get_run(parent).data.tags["thaw.promoted"] == "false"
    recorded = mlflow.artifacts.load_dict(f"runs:/{parent}/{OUTCOME_FILE}")
    assert recorded["reason"] == reason and recorded["gate"]["champion"]["version"] == old
    summary = mlflow.artifacts.load_text(f"runs:/{parent}/summary.md")
    assert f"| v{old} (champion) | {scores['trained']['macro_f1']:.4f} |" in summary
    assert f"Why: {reason}" in summary


def test_a_better_challenger_is_promoted_and_a_tie_is_not(
        stack: StackInfo, prepared_sample, models, scores) -> None:
    client = MlflowClient()
    model = f"gate-{uuid.uuid4().hex[:8]}"
    old = _champion(model, models["untrained"], val_macro_f1="0.99")
    better = _register(prepared_sample, model, models["trained"])
    assert better["promoted"] and better["previous_champion_version"] == old
    assert client.get_model_version_by_alias(model, "champion").version == better["version"]
    assert f"beats champion v{old} by" in better["reason"]
    assert f"{scores['untrained']['macro_f1']:.4f}" in better["reason"]

    tie = _register(prepared_sample, model, models["trained"])
    assert not tie["promoted"] and "(a tie)" in tie["reason"]
    assert client.get_model_version_by_alias(model, "champion").version == better["version"]


def test_loss_is_lower_is_better(stack: StackInfo, prepared_sample, models, scores) -> None:
    model = f"gate-{uuid.uuid4().hex[:8]}"
    _champion(model, models["untrained"])
    better = _register(prepared_sample, model, models["trained"], selection_metric="loss")
    assert better["promoted"], better["reason"]
    assert "lower is better" in better["reason"]
    assert float(MlflowClient().get_model_version(model, better["version"]).tags[
        "val_loss"]) == pytest.approx(scores["trained"]["loss"])
    worse = _register(prepared_sample, model, models["untrained"], selection_metric="loss")
    assert not worse["promoted"] and "does not beat" in worse["reason"]


def test_a_class_change_is_refused_with_its_reason_unless_asked(
        stack: StackInfo, prepared_sample, models) -> None:
    client = MlflowClient()
    model = f"gate-{uuid.uuid4().hex[:8]}"
    old = _champion(model, models["other_classes"], val_macro_f1="0.0")
    refused = _register(prepared_sample, model, models["trained"])
    assert not refused["promoted"]
    assert client.get_model_version_by_alias(model, "champion").version == old
    reason = refused["reason"]
    assert "classes changed" in reason and "promote_on_class_change" in reason
    assert "only the champion has ['Hat']; only this run has ['Trouser']" in reason
    assert "'Ankle_boot'" in reason
    assert refused["gate"]["class_change"]["champion"][-1] == "Hat"

    allowed = _register(prepared_sample, model, models["trained"], promote_on_class_change=True)
    assert allowed["promoted"] and "promote_on_class_change is set" in allowed["reason"]
    assert client.get_model_version_by_alias(model, "champion").version == allowed["version"]


@pytest.mark.parametrize("with_champion", [True, False], ids=["previous", "none"])
def test_a_failure_after_the_alias_moved_gives_it_back(
        stack: StackInfo, prepared_sample, models, monkeypatch, with_champion) -> None:
    """summary.md cannot be written (the server refuses, say) after the alias moved: the
    previous champion gets the alias back (or none has it), and the new version is gone."""
    client = MlflowClient()
    model = f"gate-{uuid.uuid4().hex[:8]}"
    old = _champion(model, models["untrained"]) if with_champion else None
    moved_to = []
    real_set_alias = MlflowClient.set_registered_model_alias

    def set_alias(self, name, alias, version):
        moved_to.append(version)
        return real_set_alias(self, name, alias, version)

    def refuse(self, run_id, text, artifact_file):
        assert [str(v) for v in moved_to] == ["1" if old is None else "2"], "alias not moved"
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_alias)
    monkeypatch.setattr(MlflowClient, "log_text", refuse)
    dirs = {"full": models["trained"].parent}
    experiment, pipeline_run = f"gate-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with pytest.raises(OSError, match="artifact store unreachable"):
        register_step(_report(prepared_sample, dirs), dirs, prepared_sample.root,
                      experiment=experiment, pipeline_run_id=pipeline_run,
                      model_name=model, selection_metric="macro_f1", promotion_margin=0.0)
    monkeypatch.undo()

    versions = [v.version for v in client.search_model_versions(f"name = '{model}'")]
    assert versions == ([old] if old else [])
    aliases = client.get_registered_model(model).aliases
    assert aliases == ({"champion": old} if old else {})
    tags = client.get_run(tracking.ensure_parent_run(experiment, pipeline_run)).data.tags
    assert tags["thaw.promoted"] == "false"
    assert tags["thaw.promotion"].startswith("registration of v")
    assert "undone after an error: artifact store unreachable" in tags["thaw.promotion"]


def test_a_champion_that_is_not_a_thaw_model_is_kept_with_a_reason(
        stack: StackInfo, prepared_sample, models) -> None:
    model = f"gate-{uuid.uuid4().hex[:8]}"
    run = tracking.start_stage_run(_parent(), "probe", {})

    class Other(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return model_input

    with mlflow.start_run(run_id=run):
        info = mlflow.pyfunc.log_model(name="m", python_model=Other(),
                                       registered_model_name=model)
    MlflowClient().set_registered_model_alias(model, "champion",
                                              info.registered_model_version)
    outcome = _register(prepared_sample, model, models["trained"])
    assert not outcome["promoted"] and "cannot be scored" in outcome["reason"]


def test_the_stage_is_chosen_by_validation_scored_here_never_test(
        stack: StackInfo, prepared_sample, models, scores) -> None:
    """probe claims the better val from training and has the better test score: partial,
    better on this run's val split as scored by the gate, is chosen."""
    client = MlflowClient()
    model, parent = f"gate-{uuid.uuid4().hex[:8]}", _parent()
    probe = {**_candidate(parent, "probe", models["untrained"], val=0.99),
             "test": {"accuracy": 0.95, "macro_f1": 0.95}}
    partial = _candidate(parent, "partial", models["trained"], val=0.10)
    first = tracking.register_best(parent_run_id=parent, model_name=model,
                                   candidates=[probe, partial], data=prepared_sample,
                                   data_fingerprint="fp", pipeline_run_id="p")
    assert (first["stage"], first["version"], first["promoted"]) == ("partial", "1", True)
    assert first["previous_champion_version"] is None and first["champion_version"] == "1"
    assert first["model_uri"] == f"models:/{model}/1"
    assert first["reason"].startswith("no champion yet: v1 (partial)")
    assert first["gate"]["stage_val"]["probe"]["macro_f1"] == pytest.approx(
        scores["untrained"]["macro_f1"])
    version = client.get_model_version_by_alias(model, "champion")
    assert version.tags["thaw.stage"] == "partial"
    assert client.get_run(parent).data.tags["thaw.registered_model"] == f"{model}/1"


def test_the_served_path_scores_as_training_does(prepared_sample, models) -> None:
    """A champion with other preprocessing is scored through its serving preprocessing: on
    a model with this data's preprocessing, that path gives the training path's numbers."""
    from thaw.checkpoint import load_checkpoint, model_from_checkpoint
    from thaw.stages import _predict_as_served, predict_split

    path = models["trained"]
    y_fast, p_fast = predict_split(model_from_checkpoint(load_checkpoint(path)),
                                   prepared_sample, "val")
    y_served, p_served = _predict_as_served(path, prepared_sample, "val")
    assert (y_fast == y_served).all()
    assert abs(p_fast - p_served).max() < 1e-4


def test_a_champion_with_other_preprocessing_is_scored_as_served(
        stack: StackInfo, prepared_sample, models, tmp_path) -> None:
    from thaw.checkpoint import load_checkpoint, model_from_checkpoint

    payload = load_checkpoint(models["trained"])
    config = {**payload["meta"]["data_config"], "input_size": [3, 80, 80]}
    bigger = tmp_path / "best.pt"
    save_checkpoint(bigger, model_from_checkpoint(payload),
                    {**payload["meta"], "data_config": config})
    model = f"gate-{uuid.uuid4().hex[:8]}"
    _champion(model, bigger)
    outcome = _register(prepared_sample, model, models["untrained"])
    assert outcome["gate"]["champion"]["val"]["as_served"] is True
    assert not outcome["gate"]["challenger"]["val"]["as_served"]
    assert "its own serving preprocessing" in outcome["reason"]
    assert not outcome["promoted"], outcome["reason"]
