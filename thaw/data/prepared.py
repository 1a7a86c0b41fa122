"""The prepared-dataset format: images decoded once and resized once, stored as uint8 shards.

```
manifest.json                  classes, counts, input size, mean/std, fingerprint, ...
validation_report.md           human-readable counts and skipped files
images-<split>-00000.npy       (N, H, W, 3) uint8
labels-<split>-00000.npy       (N,) int64
```
Shards are read with `np.load(mmap_mode="r")`, so opening a dataset costs nothing and
DataLoader workers share the page cache instead of copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from thaw.errors import ThawError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "validation_report.md"
# Fields added to format 1 later; manifests written before them lack them.
_OPTIONAL_FIELDS = {"warnings"}


@dataclass
class Manifest:
    classes: list[str]
    class_to_idx: dict[str, int]
    counts: dict[str, dict[str, int]]  # split -> class -> number of images
    input_size: list[int]  # [3, H, W]
    mean: list[float]
    std: list[float]
    interpolation: str
    fingerprint: str  # sha256 over the source's (path, content hash, class, split)
    skipped: list[dict[str, str]]  # [{"path", "reason"}]
    shards: dict[str, list[str]]  # split -> image shard file names
    source: str
    seed: int
    split_fractions: list[float]
    format_version: int = FORMAT_VERSION
    # Problems that did not stop preparation but need a person's eye (a class missing from
    # val/, label conflicts, empty folders); also in the report.
    warnings: list[str] = field(default_factory=list)

    def data_config(self) -> dict[str, Any]:
        """The preprocessing a model trained on this data expects (saved with checkpoints)."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    def split_size(self, split: str) -> int:
        return sum(self.counts[split].values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def digest(self) -> str:
        """Identifies the prepared data: source fingerprint, split, classes, preprocessing."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str, origin: str = "manifest.json") -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ThawError(f"not a prepared dataset: {origin} is not valid JSON ({exc})") from exc
        names = {f.name for f in fields(cls)}
        required = names - _OPTIONAL_FIELDS
        if not isinstance(data, dict) or (missing := sorted(required - data.keys())):
            raise ThawError(f"not a prepared dataset: {origin} lacks fields {missing}")
        if data["format_version"] != FORMAT_VERSION:
            raise ThawError(
                f"{origin} has format_version {data['format_version']}, this thaw reads "
                f"{FORMAT_VERSION}; prepare the dataset again"
            )
        return cls(**{k: v for k, v in data.items() if k in names})


def labels_shard_name(images_name: str) -> str:
    return images_name.replace("images-", "labels-", 1)


def write_split(
    directory: Path,
    split: str,
    images: Iterator[np.ndarray],
    labels: np.ndarray,
    shard_size: int,
) -> list[str]:
    """Write the next `len(labels)` images of `images` with `labels` as shards; returns the
    image shard names.

    Images are appended to their shard file as they arrive (after a `.npy` header written
    for the shard's final shape), so neither the split nor a whole shard is ever in memory.
    """
    names = []
    for number, start in enumerate(range(0, len(labels), shard_size)):
        name = f"images-{split}-{number:05d}.npy"
        chunk = labels[start : start + shard_size]
        first = next(images)
        header = {"descr": "|u1", "fortran_order": False, "shape": (len(chunk), *first.shape)}
        with open(directory / name, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            handle.write(_uint8_bytes(first, first.shape))
            for _ in range(1, len(chunk)):
                handle.write(_uint8_bytes(next(images), first.shape))
        np.save(directory / labels_shard_name(name), chunk)
        names.append(name)
    return names


def _uint8_bytes(image: np.ndarray, shape: tuple[int, ...]) -> memoryview:
    if image.shape != shape or image.dtype != np.uint8:
        raise ValueError(f"image of {image.dtype} {image.shape} in a shard of uint8 {shape}")
    return memoryview(np.ascontiguousarray(image)).cast("B")


@contextmanager
def atomic_output_dir(output_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory next to `output_dir` that replaces it on success.

    On any failure the temporary directory is removed and `output_dir` is left as it was.
    An existing prepared dataset is replaced; any other non-empty directory is refused.
    """
    output_dir = Path(output_dir)
    if output_dir.is_file() or (
        output_dir.is_dir()
        and any(output_dir.iterdir())
        and not (output_dir / MANIFEST_NAME).is_file()
    ):
        raise ThawError(
            f"output {output_dir} exists and is not a prepared dataset; refusing to overwrite it"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex}")
            os.rename(output_dir, old)
            os.rename(tmp, output_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_shard(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ThawError(f"not a prepared dataset: {path.parent} is missing shard {path.name}")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ThawError(f"not a prepared dataset: cannot read shard {path} ({exc})") from exc


class PreparedDataset:
    """A prepared dataset on disk; open it with `open_prepared`."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.shards)

    def shard_paths(self, split: str) -> list[tuple[Path, Path]]:
        """(images, labels) shard paths of `split`, in order."""
        if split not in self.manifest.shards:
            raise ThawError(f"{self.root} has no split {split!r}; it has {self.splits}")
        return [
            (self.root / name, self.root / labels_shard_name(name))
            for name in self.manifest.shards[split]
        ]

    def labels(self, split: str) -> np.ndarray:
        """All labels of `split` as int64 (in memory: they are small)."""
        return np.concatenate([np.load(lbl) for _, lbl in self.shard_paths(split)])

    def images(self, split: str) -> np.ndarray:
        """All images of `split`, (N, H, W, 3) uint8: a memmap for one shard, else a copy."""
        shards = [_load_shard(img) for img, _ in self.shard_paths(split)]
        return shards[0] if len(shards) == 1 else np.concatenate(shards)

    def _validate(self) -> None:
        _, height, width = self.manifest.input_size
        for split in self.splits:
            total = 0
            for img_path, lbl_path in self.shard_paths(split):
                images, labels = _load_shard(img_path), _load_shard(lbl_path)
                if images.shape[1:] != (height, width, 3) or images.dtype != np.uint8:
                    raise ThawError(
                        f"not a prepared dataset: {img_path} holds {images.dtype} "
                        f"{images.shape}, expected uint8 (N, {height}, {width}, 3)"
                    )
                if labels.shape != images.shape[:1]:
                    raise ThawError(
                        f"not a prepared dataset: {lbl_path} has {labels.shape[0]} labels "
                        f"for {images.shape[0]} images"
                    )
                total += len(images)
            if total != self.manifest.split_size(split):
                raise ThawError(
                    f"not a prepared dataset: {self.root} has {total} {split} images, "
                    f"the manifest says {self.manifest.split_size(split)}"
                )


def open_prepared(directory: Path | str) -> PreparedDataset:
    """Open and check a prepared dataset (manifest and every shard header)."""
    root = Path(directory)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ThawError(f"not a prepared dataset: {root} has no {MANIFEST_NAME}")
    manifest = Manifest.from_json(
        manifest_path.read_text(encoding="utf-8"), origin=str(manifest_path)
    )
    dataset = PreparedDataset(root, manifest)
    dataset._validate()
    return dataset


class ImageSplit(Dataset):
    """One split as `(uint8 CHW tensor, int label)` samples, read from memmapped shards.

    `transform` is applied to each image tensor (augmentation, normalisation).
    """

    def __init__(
        self,
        prepared: PreparedDataset,
        split: str,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.paths = [img for img, _ in prepared.shard_paths(split)]
        self.labels = prepared.labels(split)
        self.classes = prepared.manifest.classes
        self.transform = transform
        self._shards: list[np.ndarray] | None = [_load_shard(p) for p in self.paths]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        if self._shards is None:  # reopened lazily after pickling into a worker
            self._shards = [_load_shard(p) for p in self.paths]
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        hwc = self._shards[shard][index - self._starts[shard]]
        image = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies its data; workers reopen the files instead.
        return {**self.__dict__, "_shards": None}
