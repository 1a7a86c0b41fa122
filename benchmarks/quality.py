"""Quality benchmark: thaw's recipe against a peer fine-tuning script, JSON + Markdown.

For every dataset (benchmarks/quality_data.py), budget (epochs per stage) and seed, both train
EfficientNet-Lite0 from the packaged ImageNet weights at 64 px on the same train/val/test
folders. thaw runs the library exactly as the pipeline's steps do (prepare, three stages each
starting from the previous stage's best, the stage chosen on validation). The peers report
their best stage picked on test: ``reference`` is the carefully written staged script kept
outside the project (``../shared/peers/staged_reference.py``, run as it is, from its own
folder), ``textbook`` the weaker hand-made script of benchmarks/peers/textbook.py.

Per run: every stage's val and test accuracy and macro-F1 and wall seconds, the chosen
stage, and for thaw a timeline of (seconds since start, test accuracy of the model thaw would
hand on if stopped then), from which the summary reads the time to reach the script's best
test accuracy of the same seed. Test scoring for the timeline pauses thaw's clock.

Runs are appended to a JSON-lines file and skipped when already there, so an interrupted
benchmark resumes; ``--summarise`` only rebuilds the tables from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REFERENCE = HERE.parent.parent / "shared" / "peers" / "staged_reference.py"
PEERS = ("reference", "textbook")
STAGES = ("probe", "partial", "full")
ARCH, WEIGHTS, IMAGE_SIZE = "efficientnet_lite0", "packaged", 64
# Ablations: thaw with one default changed, the evidence for the README's recipe table.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "thaw": {},
    "probe-lbfgs": {"probe": {"solver": "lbfgs"}},
    "crop_flip": {s: {"augment": "crop_flip"} for s in ("partial", "full")},
    "previous-lrs": {"partial": {"backbone_lr_scale": 0.1},
                     "full": {"lr": 5e-4, "backbone_lr_scale": 0.1, "layer_decay": 0.7}},
    "warmup-half": {s: {"warmup_fraction": 0.5} for s in ("partial", "full")},
    # Tried against the wrecked full stage at 1/2/2 (results/quality-tuning-runs.jsonl):
    # lower fine-tuning LRs at any length, with or without a longer warmup, and LP-FT's low
    # LRs after the probe. Their full stages have fixed LRs, as the recipe had then.
    "gentle": {"partial": {"backbone_lr_scale": 0.1},
               "full": {"lr": 1e-3, "backbone_lr_scale": 0.3, "layer_decay": 0.5,
                        "nominal_epochs": 0}},
    "gentle-warmup": {"partial": {"backbone_lr_scale": 0.1, "warmup_fraction": 0.3},
                      "full": {"lr": 1e-3, "backbone_lr_scale": 0.3, "layer_decay": 0.5,
                               "warmup_fraction": 0.3, "nominal_epochs": 0}},
    "gentle-full": {"full": {"lr": 1e-3, "backbone_lr_scale": 0.3, "layer_decay": 0.5,
                             "nominal_epochs": 0}},
    "lpft": {"partial": {"lr": 3e-4, "backbone_lr_scale": 0.3},
             "full": {"lr": 3e-4, "backbone_lr_scale": 0.3, "layer_decay": 0.5,
                      "nominal_epochs": 0}},
    # the recipe before its full stage's LR scaled with the stage's length
    "fixed-full-lr": {"full": {"nominal_epochs": 0}},
}


def budgets() -> dict[str, list[int]]:
    from thaw.config import DEFAULT_STAGES

    return {"1/2/2": [1, 2, 2], "defaults": [DEFAULT_STAGES[s].epochs for s in STAGES]}


class Clock:
    """Seconds of work, with pauses for the benchmark's own test scoring."""

    def __init__(self) -> None:
        self.start, self.paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def pause(self):
        clock = self

        class _Pause:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.paused += time.perf_counter() - self.t

        return _Pause()


def run_thaw(data_dir: Path, epochs: list[int], seed: int,
             overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    from thaw.backbones import data_config
    from thaw.config import stage_config
    from thaw.data.prepare import prepare_dataset
    from thaw.data.prepared import open_prepared
    from thaw.stages import evaluate_checkpoint, run_stage

    overrides = overrides or {}
    clock = Clock()
    timeline: list[tuple[float, float]] = []
    chosen = {"val": -1.0}
    stages: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare_dataset(data_dir, root / "data", data_config=data_config(ARCH, IMAGE_SIZE),
                        seed=seed)
        data = open_prepared(root / "data")
        previous = None
        for stage, n in zip(STAGES, epochs, strict=True):
            out = root / stage

            def on_epoch(record: dict[str, Any], out: Path = out) -> None:
                # A new best across stages is what thaw would hand on if it stopped here.
                if record["val_macro_f1"] > chosen["val"]:
                    chosen["val"] = record["val_macro_f1"]
                    with clock.pause():
                        test = evaluate_checkpoint(out / "best.pt", data, "test")
                    timeline.append((clock.elapsed(), test["accuracy"]))

            cfg = stage_config(stage, epochs=n, seed=seed, **overrides.get(stage, {}))
            stage_start = clock.elapsed()
            result = run_stage(data, cfg, out, arch=ARCH, weights=WEIGHTS,
                               init_checkpoint=previous, on_epoch_end=on_epoch)
            seconds = clock.elapsed() - stage_start
            with clock.pause():
                test = evaluate_checkpoint(Path(result.best_checkpoint), data, "test")
            stages[stage] = {"val_accuracy": result.best_val["accuracy"],
                             "val_macro_f1": result.best_val["macro_f1"],
                             "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
                             "best_epoch": result.best_epoch, "epochs_run": len(result.history),
                             "val_macro_f1_by_epoch": [r["val_macro_f1"] for r in result.history],
                             "seconds": seconds}
            previous = Path(result.best_checkpoint)
    # The pipeline's rule (thaw.champion.choose): best validation macro-F1, ties to the later.
    chosen_stage = max(reversed(STAGES), key=lambda s: stages[s]["val_macro_f1"])
    return {"stages": stages, "chosen_stage": chosen_stage,
            "test_accuracy": stages[chosen_stage]["test_accuracy"],
            "test_macro_f1": stages[chosen_stage]["test_macro_f1"],
            "seconds": clock.elapsed(), "timeline": timeline}


def run_textbook(data_dir: Path, epochs: list[int], seed: int) -> dict[str, Any]:
    script = HERE / "peers" / "textbook.py"
    out = subprocess.run([sys.executable, str(script), str(data_dir), "--arch", ARCH,
                          "--weights", WEIGHTS, "--image-size", str(IMAGE_SIZE),
                          "--epochs", *map(str, epochs), "--seed", str(seed)],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"stages": {s: {"test_accuracy": v["accuracy"], "test_macro_f1": v["macro_f1"],
                           "seconds": v["seconds"]} for s, v in result["stages"].items()},
            "chosen_stage": result["best_stage"], "test_accuracy": result["accuracy"],
            "test_macro_f1": result["macro_f1"], "seconds": result["seconds"]}


def run_reference(data_dir: Path, epochs: list[int], seed: int,
                  script: Path = REFERENCE) -> dict[str, Any]:
    """The reference script as it is, from its own folder; its stage ``last_stage`` is thaw's
    ``partial``. Its seconds to a stage are its training seconds up to the end of that stage
    (its test scoring, which also picks its best stage, excluded)."""
    out = subprocess.run([sys.executable, script.name, str(data_dir.resolve()),
                          "--epochs", ",".join(map(str, epochs)), "--seed", str(seed)],
                         cwd=script.parent, check=True, capture_output=True, text=True)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    names = {"probe": "probe", "last_stage": "partial", "full": "full"}
    stages, elapsed = {}, 0.0
    for line in lines[:-1]:
        elapsed += line["train_s"]
        stages[names[line["stage"]]] = {"test_accuracy": line["test_acc"],
                                        "test_macro_f1": line["test_macro_f1"],
                                        "seconds": elapsed}
    best = names[lines[-1]["best_stage"]]
    return {"stages": stages, "chosen_stage": best, "test_accuracy": stages[best]["test_accuracy"],
            "test_macro_f1": stages[best]["test_macro_f1"], "seconds": lines[-1]["total_s"]}


def load_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def time_to(timeline: list[list[float]], target: float) -> float | None:
    return next((t for t, acc in timeline if acc >= target - 1e-9), None)


def summarise(runs: list[dict[str, Any]], peer: str) -> dict[str, Any]:
    """Means over seeds per (dataset, budget) of thaw against ``peer``, the verdicts per
    budget, the ablations, and how often a fine-tuning stage beat its own start."""
    by_key: dict[tuple[str, str], dict[str, dict[int, Any]]] = {}
    for run in runs:
        slot = by_key.setdefault((run["dataset"], run["budget"]), {})
        slot.setdefault(run["method"], {})[run["seed"]] = run["result"]
    rows = []
    for (dataset, budget), methods in sorted(by_key.items()):
        thaw, other = methods.get("thaw", {}), methods.get(peer, {})
        seeds = sorted(set(thaw) & set(other))
        if not seeds:
            continue
        times = [time_to(thaw[s]["timeline"], other[s]["test_accuracy"]) for s in seeds]
        peer_times = [other[s]["stages"][other[s]["chosen_stage"]]["seconds"] for s in seeds]
        row = {"dataset": dataset, "budget": budget, "seeds": seeds,
               "peer_test_accuracy": mean(other[s]["test_accuracy"] for s in seeds),
               "peer_test_macro_f1": mean(other[s]["test_macro_f1"] for s in seeds),
               "peer_best_stages": [other[s]["chosen_stage"] for s in seeds],
               "peer_seconds_to_best": mean(peer_times),
               "peer_seconds": mean(other[s]["seconds"] for s in seeds),
               "thaw_test_accuracy": mean(thaw[s]["test_accuracy"] for s in seeds),
               "thaw_test_macro_f1": mean(thaw[s]["test_macro_f1"] for s in seeds),
               "thaw_chosen_stages": [thaw[s]["chosen_stage"] for s in seeds],
               "thaw_seconds": mean(thaw[s]["seconds"] for s in seeds),
               "thaw_seconds_to_peer_best": (mean(times) if None not in times else None),
               # seeds in which thaw's model reached the peer's best sooner than the peer did
               "thaw_faster_seeds": sum(t is not None and t < peer
                                        for t, peer in zip(times, peer_times, strict=True)),
               "thaw_stages": {st: {k: mean(thaw[s]["stages"][st][k] for s in seeds)
                                    for k in ("val_accuracy", "val_macro_f1", "test_accuracy",
                                              "test_macro_f1", "seconds")}
                               for st in STAGES},
               "peer_stages": {st: {k: mean(other[s]["stages"][st][k] for s in seeds)
                                    for k in ("test_accuracy", "test_macro_f1", "seconds")}
                               for st in STAGES}}
        row["gain_points"] = 100 * (row["thaw_test_accuracy"] - row["peer_test_accuracy"])
        rows.append(row)
    verdict = {}
    for budget in sorted({r["budget"] for r in rows}):
        mine = [r for r in rows if r["budget"] == budget]
        verdict[budget] = {
            "mean_gain_points": mean(r["gain_points"] for r in mine),
            "worst_gain_points": min(r["gain_points"] for r in mine),
            "faster_runs": f"{sum(r['thaw_faster_seeds'] for r in mine)} of "
                           f"{sum(len(r['seeds']) for r in mine)}",
            "faster_on_every_dataset": all(
                r["thaw_seconds_to_peer_best"] is not None
                and r["thaw_seconds_to_peer_best"] < r["peer_seconds_to_best"]
                for r in mine),
        }
    return {"peer": peer, "rows": rows, "verdict": verdict, "ablations": ablations(by_key),
            "beat_own_start": beat_own_start(runs)}


def beat_own_start(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per thaw variant and budget: the share of (dataset, seed) runs in which partial and
    full each kept a trained epoch, not their epoch 0 (the model they started from)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        if run["method"] not in PEERS:
            groups.setdefault((run["method"], run["budget"]), []).append(run["result"])
    return [{"method": method, "budget": budget, "runs": len(results),
             **{f"{stage}_share": mean(r["stages"][stage]["best_epoch"] > 0 for r in results)
                for stage in ("partial", "full")}}
            for (method, budget), results in sorted(groups.items())]


def ablations(by_key: dict[tuple[str, str], dict[str, dict[int, Any]]]) -> list[dict[str, Any]]:
    """Each variant's mean test accuracy next to thaw's on the same seeds."""
    out = []
    for (dataset, budget), methods in sorted(by_key.items()):
        for variant, runs in methods.items():
            if variant in ("thaw", *PEERS):
                continue
            seeds = sorted(set(runs) & set(methods.get("thaw", {})))
            if not seeds:
                continue
            ours = mean(methods["thaw"][s]["test_accuracy"] for s in seeds)
            theirs = mean(runs[s]["test_accuracy"] for s in seeds)

            def probe(results: dict[int, Any], key: str, seeds: list[int] = seeds) -> float:
                return mean(results[s]["stages"]["probe"][key] for s in seeds)

            out.append({"variant": variant, "dataset": dataset, "budget": budget,
                        "seeds": seeds, "test_accuracy": theirs, "thaw_test_accuracy": ours,
                        "thaw_minus_variant_points": 100 * (ours - theirs),
                        "seconds": mean(runs[s]["seconds"] for s in seeds),
                        "thaw_seconds": mean(methods["thaw"][s]["seconds"] for s in seeds),
                        "probe_test_accuracy": probe(runs, "test_accuracy"),
                        "thaw_probe_test_accuracy": probe(methods["thaw"], "test_accuracy"),
                        "probe_seconds": probe(runs, "seconds"),
                        "thaw_probe_seconds": probe(methods["thaw"], "seconds")})
    return out


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    peer = summary["peer"]
    lines = [f"# Quality: thaw vs the {peer} script ({meta['arch']}, {meta['weights']} "
             f"weights, {meta['image_size']} px, {meta['device']}, {meta['cpu_count']} cores)",
             "",
             "Means over seeds. Test accuracy in %; thaw's stage is chosen on validation, the "
             f"{peer} script's best stage is picked on test. Time to accuracy: seconds until "
             "thaw's chosen model reaches the script's best test accuracy (same seed), against "
             "the script's own seconds to its best stage; \"never\" when some seed's chosen "
             "model never reached it.",
             "",
             f"| dataset | budget | {peer} best | thaw chosen | gain (points) | thaw stages "
             "(probe/partial/full test) | time to script's best: thaw / script (s) | "
             "seeds thaw got there first |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        per_stage = " / ".join(f"{100 * r['thaw_stages'][s]['test_accuracy']:.1f}"
                               for s in STAGES)
        ttt = r["thaw_seconds_to_peer_best"]
        ttt_text = "never" if ttt is None else f"{ttt:.0f}"
        chosen = ", ".join(r["thaw_chosen_stages"])
        lines.append(f"| {r['dataset']} | {r['budget']} | {100 * r['peer_test_accuracy']:.1f}"
                     f" | {100 * r['thaw_test_accuracy']:.1f} ({chosen})"
                     f" | {r['gain_points']:+.1f} | {per_stage} | {ttt_text} / "
                     f"{r['peer_seconds_to_best']:.0f} | {r['thaw_faster_seeds']} of "
                     f"{len(r['seeds'])} |")
    lines += ["", "| budget | mean gain (points) | worst dataset (points) | "
              "faster on every dataset (means) | runs thaw got there first |",
              "|---|---|---|---|---|"]
    for budget, v in summary["verdict"].items():
        lines.append(f"| {budget} | {v['mean_gain_points']:+.1f} | {v['worst_gain_points']:+.1f} "
                     f"| {'yes' if v['faster_on_every_dataset'] else 'no'} "
                     f"| {v['faster_runs']} |")
    lines += ["", "Fine-tuning stages that beat their own start (share of (dataset, seed) runs "
              "whose best epoch is a trained one, not epoch 0):", "",
              "| thaw variant | budget | runs | partial | full |", "|---|---|---|---|---|"]
    for b in summary["beat_own_start"]:
        lines.append(f"| {b['method']} | {b['budget']} | {b['runs']} | "
                     f"{100 * b['partial_share']:.0f} % | {100 * b['full_share']:.0f} % |")
    if summary["ablations"]:
        lines += ["", "Ablations: thaw with one default changed (test accuracy %, means over the "
                  "same seeds; positive: the default is better).", "",
                  "| variant | dataset | budget | variant | thaw | default's advantage "
                  "(points) | seconds variant / thaw | probe alone: variant / thaw (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in summary["ablations"]:
            lines.append(f"| {a['variant']} | {a['dataset']} | {a['budget']} | "
                         f"{100 * a['test_accuracy']:.1f} | {100 * a['thaw_test_accuracy']:.1f} | "
                         f"{a['thaw_minus_variant_points']:+.1f} | {a['seconds']:.0f} / "
                         f"{a['thaw_seconds']:.0f} | {100 * a['probe_test_accuracy']:.1f} / "
                         f"{100 * a['thaw_probe_test_accuracy']:.1f} ({a['probe_seconds']:.1f} / "
                         f"{a['thaw_probe_seconds']:.1f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from quality_data import BUILDERS, REPORT, build

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(REPORT), choices=list(BUILDERS),
                        help="default: the report group, never tuned on (quality_data.REPORT)")
    parser.add_argument("--budgets", nargs="+", default=["1/2/2", "defaults"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--peer", choices=PEERS, default="reference",
                        help="the script thaw is compared with in the tables")
    parser.add_argument("--methods", nargs="+", default=None, choices=[*PEERS, *VARIANTS],
                        help="what to run (default: the peer and thaw); a peer, thaw, or an "
                             "ablation of thaw (VARIANTS)")
    parser.add_argument("--reference-script", type=Path, default=REFERENCE)
    parser.add_argument("--runs", type=Path, default=None,
                        help="default: results/quality-<peer>-runs.jsonl")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: results/quality-<peer>.json (and .md)")
    parser.add_argument("--cache", type=Path, default=Path(".thaw/bench-data"))
    parser.add_argument("--summarise", action="store_true", help="only rebuild the tables")
    args = parser.parse_args()
    args.methods = args.methods or [args.peer, "thaw"]
    args.runs = args.runs or RESULTS / f"quality-{args.peer}-runs.jsonl"
    args.output = args.output or RESULTS / f"quality-{args.peer}.json"

    import torch

    meta = {"arch": ARCH, "weights": WEIGHTS, "image_size": IMAGE_SIZE,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "torch": torch.__version__, "budgets": budgets()}
    if not args.summarise:
        done = {(r["method"], r["dataset"], r["budget"], r["seed"]) for r in load_runs(args.runs)}
        args.runs.parent.mkdir(parents=True, exist_ok=True)
        for dataset in args.datasets:
            folder = build(dataset, args.cache)
            for budget in args.budgets:
                epochs = budgets()[budget]
                for seed in args.seeds:
                    for method in args.methods:
                        if (method, dataset, budget, seed) in done:
                            continue
                        load = os.getloadavg()[0]
                        if method == "textbook":
                            result = run_textbook(folder, epochs, seed)
                        elif method == "reference":
                            result = run_reference(folder, epochs, seed, args.reference_script)
                        else:
                            result = run_thaw(folder, epochs, seed, VARIANTS[method])
                        record = {"method": method, "dataset": dataset, "budget": budget,
                                  "epochs": epochs, "seed": seed, "load_average": load,
                                  "result": result}
                        with args.runs.open("a") as fh:
                            fh.write(json.dumps(record) + "\n")
                        print(f"{method:10s} {dataset:17s} {budget:8s} seed {seed}: test "
                              f"accuracy {result['test_accuracy']:.3f} "
                              f"({result['chosen_stage']}) in {result['seconds']:.0f}s",
                              flush=True)
    summary = summarise(load_runs(args.runs), args.peer)
    args.output.write_text(json.dumps({**meta, **summary}, indent=2))
    args.output.with_suffix(".md").write_text(markdown(summary, meta))
    print(args.output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
