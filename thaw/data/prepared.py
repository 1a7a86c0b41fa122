"""The prepared-dataset format: images decoded once and resized once, stored in shards.

```
manifest.json                  classes, counts, input size, mean/std, fingerprint, ...
validation_report.md           human-readable counts and skipped files
images-<split>-00000.npy       (N, H, W, 3) uint8            (raw, the default)
labels-<split>-00000.npy       (N,) int64
```
or, with `Manifest.image_format` "jpeg", JPEG shards (in the folder or at the S3 prefix
`Manifest.shard_location`) with a small index beside the manifest: see `thaw.data.shards`
for both layouts and `thaw.data.remote_shards` for streaming. Raw shards are read with
`np.load(mmap_mode="r")`, so opening a dataset costs nothing and DataLoader workers share
the page cache instead of copies; JPEG images are decoded on the CPU by
`torchvision.io.decode_jpeg` (1.8x PIL's speed here, benchmarks/prepared_format.py).
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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from thaw.data.remote_shards import (
    READ_AHEAD_SHARDS,
    CachedShards,
    LocalShards,
    ShardInfo,
    default_cache_bytes,
    default_cache_dir,
    stream_order,
)
from thaw.data.shards import (
    IMAGE_FORMATS,
    index_name,
    labels_shard_name,
    shard_members,
    shard_sizes,
    split_labels_name,
)
from thaw.errors import ThawError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "validation_report.md"
# Fields added to format 1 later; manifests written before them lack them.
_OPTIONAL_FIELDS = {"warnings", "image_format", "shard_location", "shard_sha256"}
# Written only when not at these defaults, so a raw dataset's manifest (and its digest, which
# checkpoints record) is byte for byte what thaw wrote before the JPEG format existed.
_OMITTED_AT_DEFAULT: dict[str, Any] = {"image_format": "raw", "shard_location": "",
                                       "shard_sha256": {}}


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
    image_format: str = "raw"  # "raw" or "jpeg" (thaw.data.shards)
    # The S3 prefix holding the JPEG shards; "" when they are in the prepared folder.
    shard_location: str = ""
    shard_sha256: dict[str, str] = field(default_factory=dict)  # JPEG shard name -> sha256

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
        data = asdict(self)
        for name, default in _OMITTED_AT_DEFAULT.items():
            if data[name] == default:
                del data[name]
        return json.dumps(data, indent=2, sort_keys=True)

    def digest(self) -> str:
        """Identifies the prepared data: source fingerprint, split, classes, preprocessing."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def content_key(self) -> str:
        """The digest of this manifest wherever its shards live: names their S3 prefix."""
        return replace(self, shard_location="").digest()

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
        if data.get("image_format", "raw") not in IMAGE_FORMATS:
            raise ThawError(f"{origin} stores images as {data['image_format']!r}, this thaw "
                            f"reads {list(IMAGE_FORMATS)}: upgrade thaw")
        return cls(**{k: v for k, v in data.items() if k in names})


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
    """A prepared dataset on disk; open it with `open_prepared`. ``shards`` reads JPEG
    shards: the folder's own unless `open_prepared` streams them from S3."""

    def __init__(self, root: Path, manifest: Manifest,
                 shards: LocalShards | CachedShards | None = None) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.shards = shards if shards is not None else LocalShards(self.root)

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.shards)

    @property
    def streamed(self) -> bool:
        """Whether the shards are read from S3 through the local cache."""
        return bool(self.manifest.shard_location)

    def _check_split(self, split: str) -> None:
        if split not in self.manifest.shards:
            raise ThawError(f"{self.root} has no split {split!r}; it has {self.splits}")

    def shard_paths(self, split: str) -> list[tuple[Path, Path]]:
        """(images, labels) shard paths of a raw `split`, in order."""
        self._check_split(split)
        return [
            (self.root / name, self.root / labels_shard_name(name))
            for name in self.manifest.shards[split]
        ]

    def index(self, split: str) -> np.ndarray:
        """(N, 3) int64 shard number, byte offset and byte length of each JPEG image."""
        self._check_split(split)
        return np.asarray(_load_shard(self.root / index_name(split)))

    def labels(self, split: str) -> np.ndarray:
        """All labels of `split` as int64 (in memory: they are small)."""
        if self.manifest.image_format == "jpeg":
            self._check_split(split)
            return np.asarray(_load_shard(self.root / split_labels_name(split)))
        return np.concatenate([np.load(lbl) for _, lbl in self.shard_paths(split)])

    def images(self, split: str) -> np.ndarray:
        """All images of `split`, (N, H, W, 3) uint8, for small splits: a memmap for one raw
        shard, else in memory (JPEG shards are read once each, in storage order)."""
        if self.manifest.image_format == "jpeg":
            samples = ImageSplit(self, split)
            _, height, width = self.manifest.input_size
            out = np.empty((len(samples), height, width, 3), dtype=np.uint8)
            for index in samples.storage_order():
                out[index] = samples[index][0].permute(1, 2, 0).numpy()
            return out
        shards = [_load_shard(img) for img, _ in self.shard_paths(split)]
        return shards[0] if len(shards) == 1 else np.concatenate(shards)

    def _validate(self) -> None:
        for split in self.splits:
            total = (self._validate_jpeg(split) if self.manifest.image_format == "jpeg"
                     else self._validate_raw(split))
            if total != self.manifest.split_size(split):
                raise ThawError(
                    f"not a prepared dataset: {self.root} has {total} {split} images, "
                    f"the manifest says {self.manifest.split_size(split)}"
                )

    def _validate_raw(self, split: str) -> int:
        _, height, width = self.manifest.input_size
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
        return total

    def _validate_jpeg(self, split: str) -> int:
        """The index and labels are consistent, and local shards have the indexed size."""
        index, labels, names = self.index(split), self.labels(split), self.manifest.shards[split]
        if (index.ndim != 2 or index.shape[1:] != (3,) or labels.shape != index.shape[:1]
                or (len(index) and not 0 <= index[:, 0].min() <= index[:, 0].max() < len(names))):
            raise ThawError(
                f"not a prepared dataset: {self.root} has an index of shape {index.shape} and "
                f"{labels.shape} labels for {split} in {len(names)} shards; prepare it again")
        if not self.streamed:
            for name, size in zip(names, shard_sizes(index, len(names)), strict=True):
                path = self.root / name
                if not path.is_file() or path.stat().st_size != size:
                    raise ThawError(f"not a prepared dataset: shard {path} is missing or not "
                                    f"{size:,} bytes long; prepare the dataset again")
        return len(index)


def open_prepared(directory: Path | str, *, cache_dir: Path | str | None = None,
                  cache_bytes: int | None = None) -> PreparedDataset:
    """Open and check a prepared dataset (manifest, index and shard headers or sizes).

    When its JPEG shards live at an S3 prefix (`Manifest.shard_location`), they are fetched
    on demand into ``cache_dir`` (default ``$THAW_SHARD_CACHE/<key>`` or the temporary
    folder's ``thaw-shards/<key>``), which never holds more than ``cache_bytes`` (default
    ``$THAW_SHARD_CACHE_BYTES`` or 4 GiB) of them; both are ignored for shards in the folder.
    """
    root = Path(directory)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ThawError(f"not a prepared dataset: {root} has no {MANIFEST_NAME}")
    manifest = Manifest.from_json(
        manifest_path.read_text(encoding="utf-8"), origin=str(manifest_path)
    )
    shards = None
    if manifest.shard_location:
        shards = CachedShards(
            manifest.shard_location, _remote_shard_infos(root, manifest),
            Path(cache_dir) if cache_dir is not None
            else default_cache_dir(manifest.shard_location),
            default_cache_bytes() if cache_bytes is None else cache_bytes)
    dataset = PreparedDataset(root, manifest, shards)
    dataset._validate()
    return dataset


def _remote_shard_infos(root: Path, manifest: Manifest) -> dict[str, ShardInfo]:
    infos = {}
    for split, names in manifest.shards.items():
        sizes = shard_sizes(np.asarray(_load_shard(root / index_name(split))), len(names))
        for name, size in zip(names, sizes, strict=True):
            if name not in manifest.shard_sha256:
                raise ThawError(f"not a prepared dataset: {root / MANIFEST_NAME} has no sha256 "
                                f"for shard {name}; prepare the dataset again")
            infos[name] = ShardInfo(size, manifest.shard_sha256[name])
    return infos


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random generator of training epoch ``epoch``'s order: seeded by (seed, epoch)
    alone, like ``DistributedSampler.set_epoch``, so the order does not depend on how many
    epochs were served before, and a resumed run and persistent DataLoader workers see the
    same batches as an uninterrupted run."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_permutation(size: int, seed: int, epoch: int) -> list[int]:
    """A uniform permutation of ``range(size)`` fixed by (seed, epoch)."""
    return torch.randperm(size, generator=epoch_generator(seed, epoch)).tolist()


class ImageSplit(Dataset):
    """One split as `(uint8 CHW tensor, int label)` samples, from memmapped raw shards or
    decoded from JPEG shards.

    `transform` is applied to each image tensor (augmentation, normalisation).
    """

    def __init__(
        self,
        prepared: PreparedDataset,
        split: str,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.labels = prepared.labels(split)
        self.classes = prepared.manifest.classes
        self.transform = transform
        self.streamed = prepared.streamed
        self.reader: _RawImages | _JpegImages = (
            _JpegImages(prepared, split) if prepared.manifest.image_format == "jpeg"
            else _RawImages(prepared, split))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        image = self.reader.image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def epoch_order(self, seed: int, epoch: int, *, readers: int = 1,
                    global_batch: int = 0) -> list[int]:
        """The order to read the split in for training epoch ``epoch``: a permutation of
        ``range(len(self))`` fixed by (seed, epoch) (and, streamed, the readers), so a
        resumed run reads what an uninterrupted one would.

        Shards in the folder: a uniform shuffle (``torch.randperm``). Streamed shards: the
        shards in random order, window-shuffled and, with ``readers`` ranks splitting global
        batches of ``global_batch``, each rank's part from its own shards
        (`thaw.data.remote_shards.stream_order`); the shards' order is also what the readers
        of this split (DataLoader workers included) read ahead in."""
        if not self.streamed:
            return epoch_permutation(len(self), seed, epoch)
        generator = epoch_generator(seed, epoch)
        members = self.reader.members()
        shards = torch.randperm(len(members), generator=generator).tolist()
        self.reader.read_ahead_in(shards)
        return stream_order(
            members, shards, lambda n: torch.randperm(n, generator=generator).numpy(),
            readers=readers, global_batch=global_batch)

    def storage_order(self) -> list[int]:
        """Every index once, shard after shard: the order to read a streamed split in when
        the order does not matter (evaluation), so each shard is fetched once."""
        return np.concatenate(self.reader.members()).tolist() if len(self) else []


class _RawImages:
    """Images of raw shards, memmapped."""

    def __init__(self, prepared: PreparedDataset, split: str) -> None:
        self.paths = [img for img, _ in prepared.shard_paths(split)]
        self._shards: list[np.ndarray] | None = [_load_shard(p) for p in self.paths]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])

    def image(self, index: int) -> torch.Tensor:
        if self._shards is None:  # reopened lazily after pickling into a worker
            self._shards = [_load_shard(p) for p in self.paths]
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        hwc = self._shards[shard][index - self._starts[shard]]
        return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))

    def members(self) -> list[np.ndarray]:
        return [np.arange(a, b) for a, b in zip(self._starts[:-1], self._starts[1:], strict=True)]

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies its data; workers reopen the files instead.
        return {**self.__dict__, "_shards": None}


class _JpegImages:
    """Images of JPEG shards, read through the dataset's shard reader and decoded here."""

    def __init__(self, prepared: PreparedDataset, split: str) -> None:
        self.names = prepared.manifest.shards[split]
        self.index = prepared.index(split)
        self.shards = prepared.shards
        self.size = tuple(prepared.manifest.input_size)
        # next[s]: the shards read after shard s (-1: none), in shared memory so that the
        # DataLoader workers see each epoch's order; storage order until an epoch sets it
        self.next = torch.full((len(self.names), READ_AHEAD_SHARDS), -1).share_memory_()
        self.read_ahead_in(list(range(len(self.names))))

    def read_ahead_in(self, shards: list[int]) -> None:
        """Read ahead in the order ``shards`` from now on."""
        following = torch.tensor(shards[1:] + [-1] * READ_AHEAD_SHARDS, dtype=torch.int64)
        for step in range(READ_AHEAD_SHARDS):
            self.next[shards, step] = following[step:step + len(shards)]

    def image(self, index: int) -> torch.Tensor:
        number, offset, length = (int(v) for v in self.index[index])
        name = self.names[number]
        self.shards.prefetch(self.names[s] for s in self.next[number].tolist() if s >= 0)
        data = self.shards.read(name, offset, length)
        try:
            if len(data) != length:
                raise RuntimeError(f"{len(data)} of {length} bytes")
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise ThawError(f"image {index} in shard {name} is not a readable JPEG ({exc}): "
                            "the shard is damaged; prepare the dataset again") from exc
        if tuple(image.shape) != self.size:
            raise ThawError(f"image {index} in shard {name} is {tuple(image.shape)}, the "
                            f"manifest says {self.size}; prepare the dataset again")
        return image

    def members(self) -> list[np.ndarray]:
        return list(shard_members(self.index[:, 0], len(self.names)))
