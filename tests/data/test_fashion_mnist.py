"""The Fashion-MNIST idx reader on idx files written here, the real files, and the sample."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thaw.data import fashion_mnist
from thaw.data.prepare import prepare_dataset
from thaw.data.prepared import open_prepared
from thaw.errors import ThawError

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_split(directory: Path, prefix: str, per_class: int, compress: bool) -> np.ndarray:
    """Distinct random 28x28 images, `per_class` of each of the 10 classes."""
    rng = np.random.default_rng(len(prefix) * 1000 + per_class)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        data = idx_bytes(array)
        name = f"{prefix}-{kind}-ubyte"
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return images


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "idx"
    directory.mkdir()
    write_split(directory, "train", per_class=6, compress=True)
    write_split(directory, "t10k", per_class=2, compress=False)
    return directory


def test_read_idx_gz_and_plain(idx_dir: Path) -> None:
    images, labels = fashion_mnist.load_split(idx_dir, "train")
    assert images.shape == (60, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [6] * 10
    test_images, _ = fashion_mnist.load_split(idx_dir, "test")
    assert test_images.shape == (20, 28, 28)
    assert fashion_mnist.has_split(idx_dir, "train") and not fashion_mnist.has_split(
        idx_dir / "missing", "train"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00\x08", "bad magic number"),
        (b"\x08\x03\x00\x00" + bytes(16), "bad magic number"),
        (b"\x00\x00\x07\x01" + bytes(8), "bad magic number"),  # unknown type code
        (b"\x00\x00\x08\x03\x00\x00", "header cut short"),
        (idx_bytes(np.zeros((2, 28, 28)))[:-5], r"expected 1584 for shape \(2, 28, 28\)"),
        (b"\x1f\x8b\x08\x00garbage", "bad gzip data"),
    ],
    ids=["short", "swapped-magic", "type-code", "short-header", "truncated-data", "bad-gzip"],
)
def test_corrupt_idx(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(ThawError, match=f"corrupt idx file .*{message}"):
        fashion_mnist.read_idx(path)


def test_labels_must_match_images(idx_dir: Path) -> None:
    (idx_dir / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.array([1, 2, 3])))
    )
    with pytest.raises(ThawError, match=r"\(3,\) labels do not match 60 images"):
        fashion_mnist.load_split(idx_dir, "train")


def test_export_imagefolder_is_seeded(idx_dir: Path, tmp_path: Path) -> None:
    assert fashion_mnist.export_imagefolder(idx_dir, tmp_path / "a", per_class=3, seed=0) == 30
    fashion_mnist.main(["--idx-dir", str(idx_dir), "--out", str(tmp_path / "b"),
                        "--per-class", "3"])  # fmt: skip
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert files_a == files_b and len({p.parent for p in files_a}) == 10
    images, labels = fashion_mnist.load_split(idx_dir)
    some = files_a[0]
    index = int(some.stem)
    assert fashion_mnist.CLASS_NAMES[labels[index]] == some.parent.name
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / some)), images[index])
    with pytest.raises(SystemExit, match="fewer than --per-class 7"):
        fashion_mnist.main(["--idx-dir", str(idx_dir), "--out", str(tmp_path / "c"),
                            "--per-class", "7"])  # fmt: skip


def test_prepare_from_idx_files(idx_dir: Path, tmp_path: Path, data_config: dict) -> None:
    manifest = prepare_dataset(str(idx_dir), tmp_path / "out", data_config=data_config)
    assert manifest.classes == sorted(fashion_mnist.CLASS_NAMES)
    # test comes from t10k; val is carved out of train (0.15 / 0.85 of 6 -> 1 per class)
    assert manifest.counts["test"] == {name: 2 for name in manifest.classes}
    assert manifest.counts["val"] == {name: 1 for name in manifest.classes}
    assert manifest.counts["train"] == {name: 5 for name in manifest.classes}
    images = open_prepared(tmp_path / "out").images("train")
    assert images.shape == (50, 16, 16, 3)
    assert np.array_equal(images[..., 0], images[..., 2])  # grayscale -> equal channels


def test_committed_sample() -> None:
    files = sorted(fashion_mnist.SAMPLE_DIR.rglob("*.png"))
    assert len(files) == 600
    assert {p.parent.name for p in files} == set(fashion_mnist.CLASS_NAMES)
    assert sum(p.stat().st_size for p in files) < 2_000_000
    with Image.open(files[0]) as im:
        assert im.size == (28, 28) and im.mode == "L"


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_files() -> None:
    images, labels = fashion_mnist.load_split(REAL_DIR, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    sample = sorted((fashion_mnist.SAMPLE_DIR / "Bag").glob("*.png"))[0]
    train_images, train_labels = fashion_mnist.load_split(REAL_DIR, "train")
    assert train_images.shape == (60000, 28, 28)
    index = int(sample.stem)  # the sample's file names are train indices
    assert fashion_mnist.CLASS_NAMES[train_labels[index]] == "Bag"
    assert np.array_equal(np.asarray(Image.open(sample)), train_images[index])
