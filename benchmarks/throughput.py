"""Throughput of thaw's data path, JSON out (``make bench-throughput``).

Loop part (``bench_loop``): per model and stage, the training loop's images/s with data
loading included (uint8 shards read by DataLoader workers, augmented and normalised on the
device: ``train_stage``'s own timer) next to the same model's images/s on synthetic tensors
already on the device (same batch size, trainable set, optimizer, autocast and memory
format), measured in the same process. Their ratio is the loop's efficiency: below 1 the
device waits for data or for the loop's bookkeeping.

The probe is measured without feature caching (``cache_features=False``), so its loop runs
the frozen backbone every step like the other stages; with caching (the default) its epochs
run on feature vectors and cost next to nothing.

Each stage trains three epochs of ``--steps`` steps on random images; the first is left
out (worker start-up, first-step set-up) and the faster of the other two counts. The
synthetic speed is likewise the fastest of three runs of ``--steps`` steps. Best-of keeps
other work on a shared machine out of both numbers; see the recorded load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from thaw.backbones import create_backbone, data_config, stage_groups
from thaw.config import PIPELINE_DEFAULTS, StageConfig, stage_config
from thaw.data.prepared import Manifest, PreparedDataset
from thaw.training.freeze import apply_trainable, set_train_mode
from thaw.training.loop import train_stage
from thaw.training.optim import build_optimizer, build_scheduler

STAGES = ("probe", "partial", "full")
# (backbone, weights): the packaged EfficientNet-Lite0 and ResNet-50 with random weights
# (speed does not depend on the weights, and nothing is downloaded).
MODELS = (("efficientnet_lite0", "packaged"), ("resnet50", "none"))
CLASSES = 10


# -- the training loop ------------------------------------------------------------------

def random_prepared(root: Path, arch: str, size: int, train_images: int,
                    val_images: int) -> PreparedDataset:
    """A prepared dataset of random uint8 images in the real shard format."""
    config = data_config(arch, size)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, counts = {}, {}
    for split, n in (("train", train_images), ("val", val_images)):
        labels = np.arange(n) % CLASSES
        name = f"images-{split}-00000.npy"
        images = np.lib.format.open_memmap(root / name, mode="w+", dtype=np.uint8,
                                           shape=(n, size, size, 3))
        for start in range(0, n, 1024):
            images[start:start + 1024] = rng.integers(0, 256, images[start:start + 1024].shape,
                                                      dtype=np.uint8)
        images.flush()
        np.save(root / name.replace("images-", "labels-"), labels.astype(np.int64))
        shards[split] = [name]
        counts[split] = {str(c): int((labels == c).sum()) for c in range(CLASSES)}
    classes = [str(c) for c in range(CLASSES)]
    manifest = Manifest(classes=classes, class_to_idx={c: i for i, c in enumerate(classes)},
                        counts=counts, input_size=[3, size, size],
                        mean=list(config["mean"]), std=list(config["std"]),
                        interpolation=config["interpolation"], fingerprint="random",
                        skipped=[], shards=shards, source="random", seed=0,
                        split_fractions=[0.7, 0.15, 0.15])
    (root / "manifest.json").write_text(manifest.to_json())
    return PreparedDataset(root, manifest)


def synthetic_images_per_sec(model: torch.nn.Module, cfg: StageConfig, size: int, steps: int,
                             device: torch.device, repeats: int = 3) -> float:
    """Forward, backward and optimizer step on tensors already on the device, as the loop
    runs them (channels_last, bf16 autocast on CUDA, ``torch.compile`` with ``cfg.compile``):
    the speed the loop can at best reach. The fastest of ``repeats`` runs of ``steps`` steps,
    after 3 warm-up steps."""
    groups = stage_groups(model)
    apply_trainable(model, groups.trainable(cfg.trainable))
    model.to(device, memory_format=torch.channels_last)
    net = torch.compile(model) if cfg.compile else model
    optimizer = build_optimizer(model, groups, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    x = torch.randn(cfg.batch_size, 3, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (cfg.batch_size,), device=device)
    set_train_mode(model, cfg.update_bn_stats)
    warmup = 3
    times = []
    for step in range(warmup + steps * repeats):
        if step >= warmup and (step - warmup) % steps == 0:
            _wait(device)
            times.append(time.perf_counter())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = criterion(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step)
    _wait(device)
    times.append(time.perf_counter())
    return steps * cfg.batch_size / min(b - a for a, b in pairwise(times))


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_images_per_sec(data: PreparedDataset, arch: str, weights: str, cfg: StageConfig,
                        out: Path, device: torch.device) -> float:
    """images/s of the loop's fastest epoch after the first, by its own timer (data
    loading included)."""
    torch.manual_seed(0)
    model = create_backbone(arch, CLASSES, weights)
    result = train_stage(model, data, cfg, out, device=device)
    return max(r["train_images"] / r["train_seconds"] for r in result.history[2:])


def bench_loop(*, size: int, batch_size: int, steps: int, num_workers: int,
               device: torch.device, compile_model: bool = False,
               models: tuple[tuple[str, str], ...] = MODELS) -> list[dict[str, Any]]:
    """Loop vs synthetic images/s for each model and stage (see the module docstring)."""
    rows = []
    for arch, weights in models:
        with tempfile.TemporaryDirectory(prefix="thaw-throughput-") as tmp:
            data = random_prepared(Path(tmp) / "data", arch, size, steps * batch_size,
                                   batch_size)
            for stage in STAGES:
                cfg = stage_config(stage, epochs=3, batch_size=batch_size,
                                   num_workers=num_workers, compile=compile_model,
                                   **({"cache_features": False, "solver": "adamw"}
                                      if stage == "probe" else {}))
                loop = loop_images_per_sec(data, arch, weights, cfg, Path(tmp) / stage, device)
                synthetic = synthetic_images_per_sec(create_backbone(arch, CLASSES, weights),
                                                      cfg, size, steps, device)
                row = {"arch": arch, "weights": weights, "stage": stage,
                       "trainable": cfg.trainable, "augment": cfg.augment,
                       "image_size": size, "batch_size": batch_size, "steps": steps,
                       "num_workers": num_workers, "compile": compile_model,
                       "loop_images_per_sec": round(loop, 2),
                       "synthetic_images_per_sec": round(synthetic, 2),
                       "efficiency": round(loop / synthetic, 3)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


# -- the run -----------------------------------------------------------------------------

def machine_facts(device: torch.device) -> dict[str, Any]:
    facts = {"cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
             "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
             "torchvision": torchvision.__version__, "python": platform.python_version(),
             "machine": platform.machine(), "device": str(device)}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--image-size", type=int, default=64,
                        help="64 keeps the CPU run short; use 224 on a GPU")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per stage")
    parser.add_argument("--num-workers", type=int, nargs="+",
                        default=[0, PIPELINE_DEFAULTS.num_workers],
                        help="DataLoader workers; one run per value (default: in the "
                             "training process, and the pipeline's default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--output", type=Path, default=None,
                        help="default benchmarks/results/throughput-<device>.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    output = args.output or Path(f"benchmarks/results/throughput-{device.type}.json")

    results: dict[str, Any] = {"machine": machine_facts(device),
                               "load_average_start": os.getloadavg()}
    start = time.perf_counter()
    results["loop"] = [row for workers in args.num_workers for row in bench_loop(
        size=args.image_size, batch_size=args.batch_size, steps=args.steps,
        num_workers=workers, device=device, compile_model=args.compile)]
    results["loop_seconds"] = round(time.perf_counter() - start, 1)
    results["load_average_end"] = os.getloadavg()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
