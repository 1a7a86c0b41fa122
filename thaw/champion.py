"""The champion gate: whether a newly registered model takes the ``champion`` alias.

Like with like: the current champion is fetched from the registry (its thaw checkpoint)
and scored by the same function as the challenger (``thaw.stages.score_checkpoint``) on
this run's validation split, which decides, and on its test split, which is reported.
Numbers recorded on the champion when it was registered are never used: they were measured
on other data. A champion trained on another class list cannot be scored on this data: it
is not replaced unless ``promote_on_class_change`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from thaw.class_lists import class_diff, class_names
from thaw.data.prepared import PreparedDataset
from thaw.errors import ThawError
from thaw.params import HIGHER_IS_BETTER

CHAMPION = "champion"
REPORTED = ("accuracy", "macro_f1", "loss")
_EPS = 1e-12  # float slack when comparing an improvement with the margin


def check_metric(metric: str) -> None:
    if metric not in HIGHER_IS_BETTER:
        raise ThawError(f"unknown selection metric {metric!r}: expected one of "
                        f"{', '.join(sorted(HIGHER_IS_BETTER))}")


def improvement(metric: str, challenger: float, champion: float) -> float:
    """How much better ``challenger`` is than ``champion`` (negative: worse)."""
    return challenger - champion if HIGHER_IS_BETTER[metric] else champion - challenger


def beats(metric: str, challenger: float, champion: float, margin: float) -> bool:
    """Better by at least ``margin``, and strictly better: a tie never wins."""
    gain = improvement(metric, challenger, champion)
    return gain > 0 and gain >= margin - _EPS


def choose(candidates: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The candidate with the best ``score[metric]``; a tie goes to the later stage.

    A candidate whose training diverged (its ``diverged`` reason, from the stage's
    ``result.json``) is never chosen, however well its last healthy checkpoint scores: the
    stage did not finish its recipe. When every candidate diverged there is nothing to
    register, which is an error naming each stage and why."""
    healthy = [c for c in candidates if not c.get("diverged")]
    if not healthy:
        raise ThawError(
            "nothing to register: the training of every stage diverged ("
            + "; ".join(f"{c['stage']}: {c['diverged']}" for c in candidates)
            + "). Lower the learning rates (probe_lr, partial_lr, full_lr, lora_lr) and run again")
    best = healthy[0]
    for candidate in healthy[1:]:
        if improvement(metric, candidate["score"][metric], best["score"][metric]) >= 0:
            best = candidate
    return best


@dataclass
class Champion:
    version: str
    checkpoint: Path | None = None
    classes: list[str] | None = None
    problem: str | None = None  # why it cannot be scored (not a thaw model, ...)


def fetch_champion(client: MlflowClient, model_name: str, dest: Path) -> Champion | None:
    """The model version holding the ``champion`` alias, its checkpoint downloaded into
    ``dest``; None when there is none. Registry or storage errors propagate (a retry may
    succeed); a champion that is not a thaw model comes back with its ``problem``."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    from thaw.checkpoint import load_checkpoint

    try:
        version = client.get_registered_model(model_name).aliases.get(CHAMPION)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if version is None:
        return None
    uri = f"models:/{model_name}/{version}"
    flavor = Model.load(download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=str(dest))
                        ).flavors.get("python_function", {})
    relative = ((flavor.get("artifacts") or {}).get("checkpoint") or {}).get("path")
    if not relative:
        return Champion(version, problem="it has no thaw checkpoint artifact (registered "
                                         "outside thaw?)")
    path = Path(download_artifacts(artifact_uri=f"{uri}/{relative}", dst_path=str(dest)))
    try:
        classes = list(load_checkpoint(path)["meta"]["classes"])
    except (ThawError, KeyError, TypeError) as err:
        return Champion(version, problem=f"its checkpoint is unreadable ({err})")
    return Champion(version, path, classes)


def decide(challenger: dict[str, Any], champion: Champion | None, data: PreparedDataset, *,
           metric: str, margin: float, promote_on_class_change: bool) -> dict[str, Any]:
    """Score the champion on ``data`` and decide. ``challenger``: the chosen candidate with
    its validation ``score``; its test score is added here. The result feeds ``reason``."""
    from thaw.stages import score_checkpoint

    classes = data.manifest.classes
    test = score_checkpoint(Path(challenger["checkpoint"]), data, "test")
    decision: dict[str, Any] = {
        "metric": metric, "higher_is_better": HIGHER_IS_BETTER[metric], "margin": margin,
        "challenger": {"stage": challenger["stage"], "val": challenger["score"], "test": test},
        "champion": None, "class_change": None, "previous_champion_version": None,
    }
    if champion is None:
        return {**decision, "promoted": True, "kind": "first"}
    decision["previous_champion_version"] = champion.version
    entry: dict[str, Any] = {"version": champion.version}
    decision["champion"] = entry
    if champion.problem:
        return {**decision, "promoted": False, "kind": "unscorable", "problem": champion.problem}
    if champion.classes != classes:
        decision["class_change"] = {"champion": champion.classes, "data": classes}
        return {**decision, "promoted": promote_on_class_change, "kind": "class_change"}
    assert champion.checkpoint is not None
    entry["val"] = score_checkpoint(champion.checkpoint, data, "val")
    entry["test"] = score_checkpoint(champion.checkpoint, data, "test")
    promoted = beats(metric, challenger["score"][metric], entry["val"][metric], margin)
    return {**decision, "promoted": promoted, "kind": "compared"}


def reason(decision: dict[str, Any], version: str) -> str:
    """The decision in words, with the challenger's and the champion's numbers."""
    metric, margin = decision["metric"], decision["margin"]
    new = decision["challenger"]
    me = f"v{version} ({new['stage']})"
    mine = f"val {metric} {new['val'][metric]:.4f}"
    kind, old = decision["kind"], decision["champion"]
    if kind == "first":
        return f"no champion yet: {me}, {mine}, becomes champion"
    champ = f"v{old['version']}" if old else ""
    if kind == "unscorable":
        return (f"{me}, {mine}: champion {champ} cannot be scored on this run's data: "
                f"{decision['problem']}; not promoted, champion stays {champ} (compare by "
                f"hand and move the alias with MlflowClient().set_registered_model_alias)")
    if kind == "class_change":
        change = decision["class_change"]
        head = (f"{me}, {mine}: classes changed ({class_diff(change['champion'], change['data'])}"
                f"): champion {champ} was trained on {class_names(change['champion'])}, this run's "
                f"data has {class_names(change['data'])}, so the two cannot be compared")
        return (f"{head}; promote_on_class_change is set: v{version} becomes champion"
                if decision["promoted"] else
                f"{head}; not promoted, champion stays {champ} (set promote_on_class_change "
                f"to promote a model trained on a new class list)")
    theirs = old["val"][metric]
    gain = improvement(metric, new["val"][metric], theirs)
    direction = "higher" if decision["higher_is_better"] else "lower"
    head = (f"val {metric} on this run's validation split ({direction} is better): "
            f"{me} {new['val'][metric]:.4f}, champion {champ} {theirs:.4f}")
    if decision["promoted"]:
        verdict = (f"beats champion {champ} by {gain:.4f} (margin {margin:g}): "
                   f"v{version} becomes champion")
    elif gain == 0:
        verdict = f"does not beat champion {champ} (a tie): champion stays {champ}"
    else:
        verdict = (f"does not beat champion {champ} by margin {margin:g} (difference "
                   f"{gain:+.4f}): champion stays {champ}")
    tested = (f"Test {metric}: v{version} {new['test'][metric]:.4f}, champion {champ} "
              f"{old['test'][metric]:.4f}")
    served = (f"; champion {champ} has other preprocessing, so it saw these images through "
              f"its own serving preprocessing" if old["val"].get("as_served") else "")
    return f"{head}: {verdict}. {tested}{served}"
