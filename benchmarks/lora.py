"""LoRA against partial and full fine-tuning on ViTs (CPU here, random weights: no ViT weights
can be had offline, so this measures cost, not accuracy): per stage, the trainable
parameters, the median training step time and the peak memory. Writes
benchmarks/results/lora.{json,md}.

Each (model, stage) runs in its own process, so its peak RSS (``ru_maxrss``) is that stage's
alone; ``train_rss_mb`` is what training added to the process once the model was built
(gradients, optimizer state, activations). Steps are timed as the loop trains each stage
(``benchmarks/backbone_zoo.step_ms``); ratios to full are within one run of one machine.

    .venv/bin/python benchmarks/lora.py [--batch 16] [--steps 3] [--models vit_tiny_patch16_224:224]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from backbone_zoo import cpu_machine, measure_apart, peak_rss_mb, step_ms  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STAGES = ("partial", "full", "lora")
MODELS = ("vit_tiny_patch16_224:224", "vit_small_patch16_224:224")


def measure(arch: str, size: int, stage: str, batch: int, steps: int) -> dict:
    """One stage of one model, in this process."""
    import torch

    from thaw.backbones import create_backbone, stage_groups
    from thaw.config import stage_config
    from thaw.training.lora import add_adapters

    torch.manual_seed(0)
    cfg = stage_config(stage)
    model = create_backbone(arch, 10, "none", image_size=size)
    total = sum(p.numel() for p in model.parameters())
    if cfg.trainable == "adapters":
        add_adapters(model, cfg)
    groups = stage_groups(model)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    built = peak_rss_mb()
    ms = step_ms(model, groups, cfg, x, y, steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"arch": arch, "image_size": size, "stage": stage, "model_params": total,
            "trainable_params": trainable, "trainable_share": trainable / total,
            "step_ms": ms, "peak_rss_mb": peak_rss_mb(), "train_rss_mb": peak_rss_mb() - built,
            **({"lora_rank": cfg.lora_rank} if stage == "lora" else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="ARCH:SIZE")
    parser.add_argument("--one", nargs=3, metavar=("ARCH", "SIZE", "STAGE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        arch, size, stage = args.one
        print(json.dumps(measure(arch, int(size), stage, args.batch, args.steps)))
        return
    rows, load_before = [], os.getloadavg()
    for model in args.models:
        arch, size = model.split(":")
        for stage in STAGES:
            rows.append(measure_apart(__file__, arch, size, stage, "--batch", args.batch,
                                      "--steps", args.steps))
            print(rows[-1], flush=True)
    report = {"machine": cpu_machine(load_before),
              "weights": "none (random init)", "batch": args.batch, "steps": args.steps,
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "lora.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# LoRA vs partial vs full (CPU, random weights: cost only, no accuracy)", "",
        f"{machine['cpus']} CPUs, 1 thread, batch {report['batch']}, median of "
        f"{report['steps']} steps after one warm-up; load average before "
        f"{machine['load_before'][0]:.1f}, after {machine['load_after'][0]:.1f} (shared "
        "machine: compare within a model). Each stage in its own process; train RSS is what "
        "training added once the model was built. What LoRA saves is the gradients and AdamW "
        "state of the frozen weights (12 bytes per parameter: about 0.26 GB for ViT-S, 3.6 GB "
        "for ViT-L); activations, which dominate at these sizes, it keeps (backprop still runs "
        "through every block), plus its own per-layer tensors.", "",
        "| model | px | stage | trainable params | share | step ms | x full | peak RSS MB | "
        "train RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    full = {(r["arch"], r["image_size"]): r for r in report["rows"] if r["stage"] == "full"}
    for r in report["rows"]:
        base = full[(r["arch"], r["image_size"])]
        stage = f"lora (r={r['lora_rank']})" if r["stage"] == "lora" else r["stage"]
        lines.append(
            f"| {r['arch']} | {r['image_size']} | {stage} | {r['trainable_params'] / 1e6:.3f}M | "
            f"{100 * r['trainable_share']:.1f} % | {r['step_ms']:.0f} | "
            f"{r['step_ms'] / base['step_ms']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['train_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
