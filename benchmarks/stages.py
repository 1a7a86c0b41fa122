"""Speed and quality of the three stages on the sample dataset, JSON out.

Per stage: the training loop's images/s next to the same model's images/s on synthetic
tensors (same trainable set, batch size, optimizer) measured in the same run; their ratio is
the loop's efficiency (data loading, augmentation, bookkeeping). Also the probe's time with
cached features vs. without, and each stage's val/test accuracy and macro-F1. Timings on
shared machines are noisy: compare the ratios, and see the recorded load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from thaw.backbones import create_backbone, data_config, stage_groups
from thaw.config import stage_config
from thaw.data.fashion_mnist import SAMPLE_DIR
from thaw.data.prepare import prepare_dataset
from thaw.data.prepared import open_prepared
from thaw.stages import evaluate_checkpoint, run_stage
from thaw.training.freeze import apply_trainable, set_train_mode
from thaw.training.loop import default_device
from thaw.training.optim import build_optimizer, build_scheduler


def synthetic_images_per_sec(model, cfg, size: int, steps: int) -> float:
    """Forward + backward + step on random tensors already on the device: the ceiling."""
    device = default_device()
    groups = stage_groups(model)
    apply_trainable(model, groups.trainable(cfg.trainable))
    model.to(device)
    optimizer = build_optimizer(model, groups, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    criterion = torch.nn.CrossEntropyLoss()
    x = torch.randn(cfg.batch_size, 3, size, size, device=device)
    y = torch.randint(0, model.get_classifier().out_features, (cfg.batch_size,), device=device)
    set_train_mode(model, cfg.update_bn_stats)
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            start = time.perf_counter()
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--weights", default="packaged")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--source", default=str(SAMPLE_DIR))
    parser.add_argument("--epochs", type=int, nargs=3, default=[5, 3, 3],
                        metavar=("PROBE", "PARTIAL", "FULL"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/stages.json"))
    args = parser.parse_args()

    out: dict = {"arch": args.arch, "weights": args.weights, "image_size": args.image_size,
                 "source": args.source, "device": str(default_device()),
                 "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "machine": platform.machine(),
                 "load_average_start": os.getloadavg(), "stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare_dataset(args.source, root / "data",
                        data_config=data_config(args.arch, args.image_size))
        data = open_prepared(root / "data")
        classes = len(data.manifest.classes)
        previous = None
        for stage, epochs in zip(("probe", "partial", "full"), args.epochs, strict=True):
            cfg = stage_config(stage, epochs=epochs)
            result = run_stage(data, cfg, root / stage, arch=args.arch, weights=args.weights,
                               init_checkpoint=previous)
            previous = Path(result.best_checkpoint)
            test = evaluate_checkpoint(previous, data, "test")
            synthetic = synthetic_images_per_sec(
                create_backbone(args.arch, classes, args.weights), cfg, args.image_size, 10)
            entry = {
                "epochs_run": len(result.history), "best_epoch": result.best_epoch,
                "wall_seconds": result.wall_seconds,
                "loop_images_per_sec": result.train_images_per_sec,
                "synthetic_images_per_sec": synthetic,
                "val_accuracy": result.best_val["accuracy"],
                "val_macro_f1": result.best_val["macro_f1"],
                "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
            }
            if stage == "probe":
                uncached = run_stage(data, stage_config(stage, epochs=epochs,
                                                        cache_features=False),
                                     root / "probe-uncached", arch=args.arch,
                                     weights=args.weights)
                entry["uncached_wall_seconds"] = uncached.wall_seconds
                entry["cached_speedup"] = uncached.wall_seconds / result.wall_seconds
                entry["note"] = ("loop images/s with cached features counts feature vectors; "
                                 "compare wall seconds instead")
            else:
                entry["loop_efficiency"] = entry["loop_images_per_sec"] / synthetic
            out["stages"][stage] = entry
            print(stage, json.dumps(entry))
    out["load_average_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
