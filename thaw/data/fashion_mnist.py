"""Fashion-MNIST idx files: read them, and export a small ImageFolder sample as PNGs.

Run `python -m thaw.data.fashion_mnist --out DIR --per-class 60` to write a sample.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from thaw.errors import ThawError

CLASS_NAMES = [
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
]  # fmt: skip
DEFAULT_IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data" / "fashion-mnist-sample"

_FILE_PREFIX = {"train": "train", "test": "t10k"}
# idx type codes -> big-endian numpy dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzipped or not) into an array of its declared shape."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ThawError(f"corrupt idx file {path}: bad gzip data ({exc})") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ThawError(
            f"corrupt idx file {path}: bad magic number {raw[:4].hex()!r} "
            "(expected 0000 followed by a type code and the number of dimensions)"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ThawError(f"corrupt idx file {path}: header cut short")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ThawError(
            f"corrupt idx file {path}: {len(raw)} bytes, expected {expected} for shape {shape}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _split_files(directory: Path, split: str) -> tuple[Path | None, Path | None]:
    prefix = _FILE_PREFIX[split]
    return (
        _find(directory, f"{prefix}-images-idx3-ubyte"),
        _find(directory, f"{prefix}-labels-idx1-ubyte"),
    )


def has_split(directory: Path, split: str) -> bool:
    """True when `directory` holds the images file of `split` ("train" or "test")."""
    return _split_files(Path(directory), split)[0] is not None


def load_split(directory: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one Fashion-MNIST split."""
    images_path, labels_path = _split_files(Path(directory), split)
    if images_path is None or labels_path is None:
        raise ThawError(f"no Fashion-MNIST {split} images and labels idx files in {directory}")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ThawError(f"{images_path}: expected (N, H, W) uint8 images, got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ThawError(f"{labels_path}: {labels.shape} labels do not match {len(images)} images")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ThawError(f"{labels_path}: label {labels.max()} is not a Fashion-MNIST class")
    return images, labels.astype(np.int64)


def export_imagefolder(
    idx_dir: Path, out_dir: Path, per_class: int, seed: int, split: str = "train"
) -> int:
    """Write `per_class` random images of every class as `<class>/<index>.png`; returns the
    number of files written. The same seed always picks the same images."""
    images, labels = load_split(idx_dir, split)
    rng = np.random.default_rng(seed)
    written = 0
    for label, name in enumerate(CLASS_NAMES):
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < per_class:
            raise ThawError(
                f"class {name} has {len(candidates)} images in {idx_dir} ({split}), "
                f"fewer than --per-class {per_class}"
            )
        class_dir = Path(out_dir) / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for index in sorted(rng.choice(candidates, size=per_class, replace=False)):
            Image.fromarray(images[index]).save(class_dir / f"{index:05d}.png", optimize=True)
            written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output ImageFolder directory")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=sorted(_FILE_PREFIX), default="train")
    parser.add_argument("--idx-dir", type=Path, default=DEFAULT_IDX_DIR)
    args = parser.parse_args(argv)
    try:
        count = export_imagefolder(args.idx_dir, args.out, args.per_class, args.seed, args.split)
    except ThawError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(f"wrote {count} images to {args.out}")


if __name__ == "__main__":
    main()
