"""Preprocess throughput at scale on synthetic photos, JSON out.

Writes `count` synthetic 500x375 JPEGs (smooth gradients, blobs and sensor-like noise: they
decode like photos of that size) in 10 classes, then runs `prepare_dataset` on them in a
fresh process per run and records images/s, peak RSS (the main process; main and workers
together, sampled from /proc every 50 ms) and peak disk of the output folder (sampled
likewise; shards count at their full size as soon as they are created) against the final
prepared size. Runs: 10k images at 224 px with 1
and with 2 processes (their ratio is the speed-up), and 10k vs 100k images at a smaller size
(flat memory, disk ~ prepared size). Timings on shared machines are noisy: see the load
average recorded next to them.

    python benchmarks/throughput_preprocess.py            # ~10 min on 2 cores, ~12 GB disk
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10
BASE_IMAGES = 256  # distinct pictures; every file is still unique (see `unique_copy`)
PHOTO_SIZE = (500, 375)
DEFAULT_RUNS = ("10000:224:1", "10000:224:2", "10000:96:2", "100000:96:2")
CONFIG = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
          "interpolation": "bicubic"}  # fmt: skip


def photo(rng: np.random.Generator) -> bytes:
    """A 500x375 JPEG that compresses and decodes like a photo (about 40-70 KB)."""
    width, height = PHOTO_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = sum(rng.uniform(-0.4, 0.4, 3)[:, None, None] * c for c in (x, y))
    blobs = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
                       .resize((width, height), Image.Resampling.BICUBIC), np.float32)  # fmt: skip
    pixels = blobs + gradient.transpose(1, 2, 0) + rng.normal(0, 8, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def unique_copy(jpeg: bytes, number: int) -> bytes:
    """`jpeg` with a comment segment holding `number` after its start marker: the same
    pixels, but a file of its own content hash (copies would be grouped by the split)."""
    comment = f"thaw benchmark image {number}".encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]


def make_source(root: Path, count: int, base: list[bytes]) -> Path:
    """`root/<count>/class<k>/<n>.jpg`, written once and kept for later runs."""
    source = root / str(count)
    if (source / ".complete").exists():
        return source
    for number in range(count):
        path = source / f"class{number % CLASSES}" / f"{number:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(unique_copy(base[number % len(base)], number))
    (source / ".complete").write_text("")
    return source


def folder_bytes(root: Path) -> int:
    total = 0
    for entry in os.scandir(root):
        with contextlib.suppress(FileNotFoundError):  # renamed or deleted while we looked
            total += folder_bytes(Path(entry.path)) if entry.is_dir() else entry.stat().st_size
    return total


def tree_rss_bytes() -> int:
    """Resident memory of this process and its children (worker processes), from /proc.

    `getrusage(RUSAGE_CHILDREN)` cannot serve: a child forked from this large process
    counts the parent's pages in its peak."""
    pids, total = [os.getpid()], 0
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    for pid in pids:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(status.split("VmRSS:")[1].split()[0]) * 1024
    return total


def run_once(source: Path, parent: Path, size: int, workers: int) -> dict:
    """One preparation in this process (called in a fresh process per run)."""
    from thaw.data.prepare import prepare_dataset

    parent.mkdir(parents=True)
    peak, rss, done = [0], [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], folder_bytes(parent))
            rss[0] = max(rss[0], tree_rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    manifest = prepare_dataset(source, parent / "out", data_config={**CONFIG, "input_size":
                               (3, size, size)}, num_workers=workers)  # fmt: skip
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    final = folder_bytes(parent / "out")
    images = sum(manifest.split_size(s) for s in manifest.counts)
    return {
        "images": images,
        "image_size": size,
        "num_workers": workers,
        "wall_seconds": round(wall, 2),
        "images_per_sec": round(images / wall, 1),
        "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_with_workers_mb": round(rss[0] / 2**20, 1),
        "prepared_mb": round(final / 2**20, 1),
        "peak_disk_mb": round(max(peak[0], final) / 2**20, 1),
        "peak_disk_over_prepared": round(max(peak[0], final) / final, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS),
                        help="count:image_size:num_workers per run")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/thaw-bench-preprocess"))
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/throughput-preprocess-cpu.json"))
    parser.add_argument("--one", nargs=4, metavar=("SOURCE", "PARENT", "SIZE", "WORKERS"),
                        help=argparse.SUPPRESS)  # internal: one run in a fresh process
    args = parser.parse_args()
    if args.one:
        source, parent, size, workers = args.one
        print(json.dumps(run_once(Path(source), Path(parent), int(size), int(workers))))
        return

    runs = [tuple(int(v) for v in run.split(":")) for run in args.runs]
    rng = np.random.default_rng(0)
    base = [photo(rng) for _ in range(BASE_IMAGES)]
    sources = {count: make_source(args.workdir / "sources", count, base)
               for count in sorted({count for count, _, _ in runs})}  # fmt: skip
    results = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "source_image": f"JPEG {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, quality 90, "
                        f"{np.mean([len(b) for b in base]) / 1024:.0f} KB on average",
        "runs": [],
    }
    for count, size, workers in runs:
        parent = args.workdir / f"out-{count}-{size}-{workers}"
        subprocess.run(["rm", "-rf", str(parent)], check=True)
        load = os.getloadavg()
        done = subprocess.run(
            [sys.executable, __file__, "--one", str(sources[count]), str(parent), str(size),
             str(workers)], check=True, capture_output=True, text=True)  # fmt: skip
        run = {**json.loads(done.stdout.splitlines()[-1]), "source_files": count,
               "load_average_before": [round(v, 2) for v in load]}  # fmt: skip
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
        subprocess.run(["rm", "-rf", str(parent)], check=True)
    by_key = {(r["source_files"], r["image_size"], r["num_workers"]): r for r in results["runs"]}
    for (count, size, workers), run in by_key.items():
        if workers > 1 and (count, size, 1) in by_key:
            run["speedup_over_1_worker"] = round(
                run["images_per_sec"] / by_key[(count, size, 1)]["images_per_sec"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
