"""Raw against JPEG prepared format on synthetic photos, JSON out.

Prepares the same synthetic 500x375 JPEG photos (`throughput_preprocess.photo`) at 224 px in
both formats (2 worker processes) and records: prepared bytes per image, preparation
images/s (worker start-up included, and the first run reads the source from a cold page
cache: a rough figure), the JPEG format's mean absolute pixel error against raw (out of
255, on the val split), and reading speed on one
core (``torch.set_num_threads(1)``, what one DataLoader worker has): images/s of
`ImageSplit` over raw memmapped shards, over JPEG shards (decoded by
``torchvision.io.decode_jpeg``), and of PIL decoding the same JPEG bytes for comparison.
All speeds come from one process, one after another, so compare their ratios; the load
average is recorded next to them.

    python benchmarks/prepared_format.py            # ~1 min on 2 cores, ~500 MB disk
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from throughput_preprocess import BASE_IMAGES, CONFIG, make_source, photo

from thaw.data.prepare import prepare_dataset
from thaw.data.prepared import ImageSplit, PreparedDataset, open_prepared

SIZE = 224
READ_SECONDS = 5.0


def prepared_bytes(data: PreparedDataset) -> int:
    return sum(path.stat().st_size for path in data.root.iterdir() if path.is_file())


def per_second(read: Callable[[int], object], count: int) -> float:
    """Items of ``read(0..count-1)`` per second, cycling for at least READ_SECONDS."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < READ_SECONDS:
        for index in range(count):
            read(index)
        done += count
    return done / (time.perf_counter() - start)


def pil_decode(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/thaw-bench-format"))
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/prepared-format-cpu.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    source = make_source(args.workdir / "sources", args.images,
                         [photo(rng) for _ in range(BASE_IMAGES)])
    results: dict = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                     "torch": torch.__version__, "image_size": SIZE,
                     "source": f"{args.images} synthetic 500x375 JPEG photos",
                     "load_average_before": [round(v, 2) for v in os.getloadavg()],
                     "formats": {}}
    datasets = {}
    for image_format in ("raw", "jpeg"):
        out = args.workdir / image_format
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        manifest = prepare_dataset(str(source), out, data_config={
            **CONFIG, "input_size": (3, SIZE, SIZE)}, num_workers=2, image_format=image_format)
        wall = time.perf_counter() - start
        data = datasets[image_format] = open_prepared(out)
        images = sum(manifest.split_size(split) for split in manifest.counts)
        results["formats"][image_format] = {
            "prepare_images_per_sec_2_workers_rough": round(images / wall, 1),
            "bytes_per_image": round(prepared_bytes(data) / images),
        }
    raw, jpeg = (ImageSplit(datasets[name], "train") for name in ("raw", "jpeg"))
    results["jpeg_mean_abs_error_of_255"] = round(float(np.abs(
        datasets["jpeg"].images("val").astype(np.int16)
        - datasets["raw"].images("val").astype(np.int16)).mean()), 3)
    torch.set_num_threads(1)
    encoded = [jpeg.reader.shards.read(jpeg.reader.names[int(n)], int(o), int(length))
               for n, o, length in jpeg.reader.index[:512]]
    speeds = {
        "raw_imagesplit": per_second(lambda i: raw[i], len(raw)),
        "jpeg_imagesplit_torchvision": per_second(lambda i: jpeg[i], len(jpeg)),
        "jpeg_bytes_pil": per_second(lambda i: pil_decode(encoded[i]), len(encoded)),
    }
    results["read_images_per_sec_one_core"] = {k: round(v, 1) for k, v in speeds.items()}
    results["bytes_ratio_raw_over_jpeg"] = round(
        results["formats"]["raw"]["bytes_per_image"]
        / results["formats"]["jpeg"]["bytes_per_image"], 2)
    results["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
