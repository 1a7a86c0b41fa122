"""Backbone zoo on this machine: per family, the parameters in the last stage (and their
share of the backbone), and the time and peak memory of one partial and one full training
step at a small size, random weights. Writes benchmarks/results/backbone_zoo.{json,md}.

Peak memory on CPU is the process's peak RSS (``ru_maxrss``), so each family runs in its
own process; the load average is recorded because shared 2-core machines swing timings.

    .venv/bin/python benchmarks/backbone_zoo.py [--batch 16] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def measure(arch: str, size: int, batch: int, steps: int) -> dict:
    """One family in this process: last-stage share, then partial and full step times."""
    import torch

    from thaw.backbones import create_backbone, stage_groups
    from thaw.config import stage_config

    torch.manual_seed(0)
    model = create_backbone(arch, 10, "none", image_size=size)
    groups = stage_groups(model)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    backbone = sum(sizes[n] for names in groups.backbone for n in names)
    last = sum(sizes[n] for n in groups.backbone[-1])
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    row = {"arch": arch, "image_size": size, "batch": batch, "backbone_params": backbone,
           "last_stage_params": last, "last_stage_share": last / backbone,
           "groups": len(groups.backbone), "last_stage_first": groups.backbone[-1][0]}
    for stage in ("partial", "full"):
        row[f"{stage}_step_ms"] = step_ms(model, groups, stage_config(stage), x, y, steps)
        row[f"{stage}_peak_rss_mb"] = peak_rss_mb()
    return row


def step_ms(model, groups, cfg, x, y, steps: int) -> float:
    """Median milliseconds of ``steps`` training steps of stage ``cfg`` (after one warm-up),
    as the loop trains it: its trainable set, its optimizer, frozen BatchNorm in eval."""
    from torch import nn

    from thaw.training.freeze import apply_trainable, set_train_mode
    from thaw.training.optim import build_optimizer

    apply_trainable(model, groups.trainable(cfg.trainable))
    optimizer = build_optimizer(model, groups, cfg)
    set_train_mode(model, cfg.update_bn_stats)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - tick)
    return 1000 * sorted(times[1:])[len(times[1:]) // 2]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_apart(script: str, *args: object) -> dict:
    """``script --one *args`` in a process of its own, on one thread (its peak RSS is that
    row's alone): the JSON row it prints last."""
    out = subprocess.run([sys.executable, script, "--one", *map(str, args)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_machine(load_before: tuple[float, float, float]) -> dict:
    """The machine record of a one-thread CPU benchmark that started at ``load_before``."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "load_before": load_before, "load_after": os.getloadavg(),
            "threads": 1, "device": "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("ARCH", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.batch, args.steps)))
        return
    sys.path.insert(0, str(ROOT))
    from tests.backbones.test_contract import FAMILIES

    rows, load_before = [], os.getloadavg()
    for family, (arch, size) in FAMILIES.items():
        rows.append({"family": family, **measure_apart(
            __file__, arch, size, "--batch", args.batch, "--steps", args.steps)})
        print(rows[-1], flush=True)
    report = {"machine": cpu_machine(load_before), "batch": args.batch, "steps": args.steps,
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "backbone_zoo.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "backbone_zoo.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# Backbone zoo (CPU, random weights)", "",
        f"{machine['cpus']} CPUs, 1 thread, batch {report['batch']}, median of "
        f"{report['steps']} steps after one warm-up; load average before "
        f"{machine['load_before'][0]:.1f}, after {machine['load_after'][0]:.1f} (shared "
        "machine: compare rows with care). Peak RSS is per process (model + optimizer).", "",
        "| family | model | px | last stage starts at | last-stage params | share | "
        "partial ms | full ms | partial RSS MB | full RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['family']} | {r['arch']} | {r['image_size']} | `{r['last_stage_first']}` | "
            f"{r['last_stage_params'] / 1e6:.2f}M | {100 * r['last_stage_share']:.0f} % | "
            f"{r['partial_step_ms']:.0f} | {r['full_step_ms']:.0f} | "
            f"{r['partial_peak_rss_mb']:.0f} | {r['full_peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
