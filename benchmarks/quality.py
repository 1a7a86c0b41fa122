"""Quality benchmark: thaw's recipe against the textbook fine-tuning script, JSON + Markdown.

For every dataset (benchmarks/quality_data.py), budget (epochs per stage) and seed, both train
EfficientNet-Lite0 from the packaged ImageNet weights at 64 px on the same train/val/test
folders. thaw runs the library exactly as the pipeline's steps do (prepare, three stages each
starting from the previous stage's best, the stage chosen on validation); the textbook script
(benchmarks/peers/textbook.py) reports its best stage picked on test.

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


def load_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def time_to(timeline: list[list[float]], target: float) -> float | None:
    return next((t for t, acc in timeline if acc >= target - 1e-9), None)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds per (dataset, budget), and the comparisons the issue asks for."""
    by_key: dict[tuple[str, str], dict[str, dict[int, Any]]] = {}
    for run in runs:
        slot = by_key.setdefault((run["dataset"], run["budget"]), {})
        slot.setdefault(run["method"], {})[run["seed"]] = run["result"]
    rows = []
    for (dataset, budget), methods in sorted(by_key.items()):
        thaw, book = methods.get("thaw", {}), methods.get("textbook", {})
        seeds = sorted(set(thaw) & set(book))
        if not seeds:
            continue
        times = [time_to(thaw[s]["timeline"], book[s]["test_accuracy"]) for s in seeds]
        row = {"dataset": dataset, "budget": budget, "seeds": seeds,
               "textbook_test_accuracy": mean(book[s]["test_accuracy"] for s in seeds),
               "textbook_test_macro_f1": mean(book[s]["test_macro_f1"] for s in seeds),
               "textbook_best_stages": [book[s]["chosen_stage"] for s in seeds],
               "textbook_seconds_to_best": mean(
                   book[s]["stages"][book[s]["chosen_stage"]]["seconds"] for s in seeds),
               "textbook_seconds": mean(book[s]["seconds"] for s in seeds),
               "thaw_test_accuracy": mean(thaw[s]["test_accuracy"] for s in seeds),
               "thaw_test_macro_f1": mean(thaw[s]["test_macro_f1"] for s in seeds),
               "thaw_chosen_stages": [thaw[s]["chosen_stage"] for s in seeds],
               "thaw_seconds": mean(thaw[s]["seconds"] for s in seeds),
               "thaw_seconds_to_textbook_best": (mean(times) if None not in times else None),
               "thaw_stages": {st: {k: mean(thaw[s]["stages"][st][k] for s in seeds)
                                    for k in ("val_accuracy", "val_macro_f1", "test_accuracy",
                                              "test_macro_f1", "seconds")}
                               for st in STAGES},
               "textbook_stages": {st: {k: mean(book[s]["stages"][st][k] for s in seeds)
                                        for k in ("test_accuracy", "test_macro_f1", "seconds")}
                                   for st in STAGES}}
        row["gain_points"] = 100 * (row["thaw_test_accuracy"] - row["textbook_test_accuracy"])
        rows.append(row)
    verdict = {}
    for budget in sorted({r["budget"] for r in rows}):
        mine = [r for r in rows if r["budget"] == budget]
        verdict[budget] = {
            "mean_gain_points": mean(r["gain_points"] for r in mine),
            "worst_gain_points": min(r["gain_points"] for r in mine),
            "faster_on_every_dataset": all(
                r["thaw_seconds_to_textbook_best"] is not None
                and r["thaw_seconds_to_textbook_best"] < r["textbook_seconds_to_best"]
                for r in mine),
        }
    return {"rows": rows, "verdict": verdict, "ablations": ablations(by_key)}


def ablations(by_key: dict[tuple[str, str], dict[str, dict[int, Any]]]) -> list[dict[str, Any]]:
    """Each variant's mean test accuracy next to thaw's on the same seeds."""
    out = []
    for (dataset, budget), methods in sorted(by_key.items()):
        for variant, runs in methods.items():
            if variant in ("thaw", "textbook"):
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
    lines = [f"# Quality: thaw vs the textbook script ({meta['arch']}, {meta['weights']} "
             f"weights, {meta['image_size']} px, {meta['device']}, {meta['cpu_count']} cores)",
             "",
             "Means over seeds. Test accuracy in %; thaw's stage is chosen on validation, the "
             "script's best stage is picked on test. Time to accuracy: seconds until thaw's "
             "chosen model reaches the script's best test accuracy (same seed), against the "
             "script's own seconds to its best stage.",
             "",
             "| dataset | budget | textbook best | thaw chosen | gain (points) | thaw stages "
             "(probe/partial/full test) | time to script's best: thaw / script (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        per_stage = " / ".join(f"{100 * r['thaw_stages'][s]['test_accuracy']:.1f}"
                               for s in STAGES)
        ttt = r["thaw_seconds_to_textbook_best"]
        ttt_text = "never" if ttt is None else f"{ttt:.0f}"
        chosen = ", ".join(r["thaw_chosen_stages"])
        lines.append(f"| {r['dataset']} | {r['budget']} | {100 * r['textbook_test_accuracy']:.1f}"
                     f" | {100 * r['thaw_test_accuracy']:.1f} ({chosen})"
                     f" | {r['gain_points']:+.1f} | {per_stage} | {ttt_text} / "
                     f"{r['textbook_seconds_to_best']:.0f} |")
    lines += ["", "| budget | mean gain (points) | worst dataset (points) | "
              "faster on every dataset |", "|---|---|---|---|"]
    for budget, v in summary["verdict"].items():
        lines.append(f"| {budget} | {v['mean_gain_points']:+.1f} | {v['worst_gain_points']:+.1f} "
                     f"| {'yes' if v['faster_on_every_dataset'] else 'no'} |")
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
    from quality_data import BUILDERS, build

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(BUILDERS))
    parser.add_argument("--budgets", nargs="+", default=["1/2/2", "defaults"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["textbook", "thaw"],
                        choices=["textbook", *VARIANTS],
                        help="textbook, thaw, or an ablation of thaw (VARIANTS)")
    parser.add_argument("--runs", type=Path, default=RESULTS / "quality-runs.jsonl")
    parser.add_argument("--output", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--cache", type=Path, default=Path(".thaw/bench-data"))
    parser.add_argument("--summarise", action="store_true", help="only rebuild the tables")
    args = parser.parse_args()

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
                        else:
                            result = run_thaw(folder, epochs, seed, VARIANTS[method])
                        record = {"method": method, "dataset": dataset, "budget": budget,
                                  "epochs": epochs, "seed": seed, "load_average": load,
                                  "result": result}
                        with args.runs.open("a") as fh:
                            fh.write(json.dumps(record) + "\n")
                        print(f"{method:8s} {dataset:10s} {budget:8s} seed {seed}: test "
                              f"accuracy {result['test_accuracy']:.3f} "
                              f"({result['chosen_stage']}) in {result['seconds']:.0f}s",
                              flush=True)
    summary = summarise(load_runs(args.runs))
    args.output.write_text(json.dumps({**meta, **summary}, indent=2))
    args.output.with_suffix(".md").write_text(markdown(summary, meta))
    print(args.output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
