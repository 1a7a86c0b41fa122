"""How the images of a prepared split are laid out in shard files, in either storage format.

``raw`` (the default, `Manifest.image_format` absent or "raw"): decoded pixels, read by
memory map, 150 KB per image at 224 px::

    images-<split>-NNNNN.npy     (n, H, W, 3) uint8: images k*shard_size ... of the split
    labels-<split>-NNNNN.npy     (n,) int64

``jpeg`` (``prepare_dataset(..., image_format="jpeg")``): each resized image re-encoded as a
baseline JPEG (quality `images.JPEG_QUALITY` = 90, 4:2:0), about 10 KB at 224 px::

    images-<split>-NNNNN.jpgs    the JPEG files of the shard's images, concatenated, nothing else
    index-<split>.npy            (N, 3) int64: shard number, byte offset, byte length of image i
    labels-<split>.npy           (N,) int64: label of image i

Image i of a split (the split's path order, the same order as in the raw format) is in
shard ``i mod S`` of the split's S shards. A split is in path order, so grouped by class;
striding puts an even sample of every class into every shard, and a streaming reader that
shuffles within a window of a few shards (`prepared.ImageSplit.epoch_order`) still mixes
all classes in each batch. The index and labels are small (24 bytes per image) and always
stay beside the manifest; the ``.jpgs`` shards may instead live at an S3 prefix
(`Manifest.shard_location`, see `thaw.data.remote_shards`) and are then read through a
bounded local cache. A shard is a plain byte range per image, so any reader can fetch one
image with a ranged read and decode it with any JPEG decoder.

Everything here runs in preprocessing worker processes too, so it imports no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from thaw.data.images import JPEG_QUALITY, encode_jpeg
from thaw.data.sources import LoadedRecord, Record, load_record
from thaw.errors import ThawError
from thaw.params import IMAGE_FORMATS

_HASH_CHUNK = 1 << 20


def check_image_format(image_format: str) -> str:
    if image_format not in IMAGE_FORMATS:
        raise ThawError(f"image_format {image_format!r} is not known; use one of "
                        f"{list(IMAGE_FORMATS)} ('jpeg' for large sets, about 15x smaller)")
    return image_format


def labels_shard_name(images_name: str) -> str:
    """The labels file beside a raw image shard."""
    return images_name.replace("images-", "labels-", 1)


def index_name(split: str) -> str:
    return f"index-{split}.npy"


def split_labels_name(split: str) -> str:
    return f"labels-{split}.npy"


def encode_record(record: Record, *, image_format: str, size: int, interpolation: str,
                  max_pixels: int, min_side: int) -> LoadedRecord:
    """`load_record` (hash, decode, resize), then the image in ``image_format``'s encoding:
    the pixels for raw, the JPEG bytes as a uint8 vector for jpeg (encoded here, in the
    worker process, so encoding scales with the workers like decoding)."""
    loaded = load_record(record, size=size, interpolation=interpolation,
                         max_pixels=max_pixels, min_side=min_side)
    if image_format == "raw" or loaded.image is None:
        return loaded
    return dataclasses.replace(loaded, image=_jpeg_vector(loaded.image))


def _jpeg_vector(image: np.ndarray) -> np.ndarray:
    return np.frombuffer(encode_jpeg(image, JPEG_QUALITY), dtype=np.uint8)


class PreviousShards(Protocol):
    def sample(self, row: int) -> np.ndarray:
        """The encoded sample at ``row`` of the split (rows asked in increasing order)."""


class ShardLayout(Protocol):
    """Writes a split's encoded samples (`encode_record`'s images) and reads them back from
    shards written before (prepare's second pass after late decode failures)."""

    name: str

    def blank(self, size: int) -> np.ndarray:
        """The encoded stand-in for an image that failed to decode."""

    def write_split(self, directory: Path, split: str, samples: Iterator[np.ndarray],
                    labels: np.ndarray) -> list[str]:
        """Write the next ``len(labels)`` samples; returns the image shard names."""

    def previous(self, directory: Path, split: str, names: list[str]) -> PreviousShards:
        ...


def layout(image_format: str, shard_size: int) -> ShardLayout:
    check_image_format(image_format)
    return RawLayout(shard_size) if image_format == "raw" else JpegLayout(shard_size)


class RawLayout:
    name = "raw"

    def __init__(self, shard_size: int) -> None:
        self.shard_size = shard_size

    def blank(self, size: int) -> np.ndarray:
        return np.zeros((size, size, 3), dtype=np.uint8)

    def write_split(self, directory: Path, split: str, samples: Iterator[np.ndarray],
                    labels: np.ndarray) -> list[str]:
        """Images are appended to their shard file as they arrive (after a `.npy` header
        written for the shard's final shape), so neither the split nor a whole shard is
        ever in memory."""
        names = []
        for number, start in enumerate(range(0, len(labels), self.shard_size)):
            name = f"images-{split}-{number:05d}.npy"
            chunk = labels[start : start + self.shard_size]
            first = next(samples)
            header = {"descr": "|u1", "fortran_order": False, "shape": (len(chunk), *first.shape)}
            with open(directory / name, "wb") as handle:
                np.lib.format.write_array_header_1_0(handle, header)
                handle.write(_uint8_bytes(first, first.shape))
                for _ in range(1, len(chunk)):
                    handle.write(_uint8_bytes(next(samples), first.shape))
            np.save(directory / labels_shard_name(name), chunk)
            names.append(name)
        return names

    def previous(self, directory: Path, split: str, names: list[str]) -> PreviousShards:
        return _RawPrevious(directory, names, self.shard_size)


class _RawPrevious:
    """Rows of earlier raw shards, each shard deleted once the rows have moved past it, so
    rewriting needs about one prepared set of disk, not two."""

    def __init__(self, directory: Path, names: list[str], shard_size: int) -> None:
        self.directory, self.names, self.shard_size = directory, names, shard_size
        self.current, self.shard = -1, np.empty(0)

    def sample(self, row: int) -> np.ndarray:
        number, position = divmod(row, self.shard_size)
        if number != self.current:
            for passed in self.names[max(self.current, 0) : number]:
                (self.directory / passed).unlink(missing_ok=True)
            self.current = number
            self.shard = np.load(self.directory / self.names[number], mmap_mode="r")
        return np.array(self.shard[position])


def _uint8_bytes(image: np.ndarray, shape: tuple[int, ...]) -> memoryview:
    if image.shape != shape or image.dtype != np.uint8:
        raise ValueError(f"image of {image.dtype} {image.shape} in a shard of uint8 {shape}")
    return memoryview(np.ascontiguousarray(image)).cast("B")


class JpegLayout:
    name = "jpeg"

    def __init__(self, shard_size: int) -> None:
        self.shard_size = shard_size

    def blank(self, size: int) -> np.ndarray:
        return _jpeg_vector(np.zeros((size, size, 3), dtype=np.uint8))

    def write_split(self, directory: Path, split: str, samples: Iterator[np.ndarray],
                    labels: np.ndarray) -> list[str]:
        """Sample i is appended to shard ``i mod S`` (opened per sample, so any number of
        shards fills at once without holding a file handle each)."""
        count = -(-len(labels) // self.shard_size)
        names = [f"images-{split}-{number:05d}.jpgs" for number in range(count)]
        for name in names:
            (directory / name).write_bytes(b"")
        index = np.zeros((len(labels), 3), dtype=np.int64)
        filled = [0] * count
        for row in range(len(labels)):
            data = next(samples)
            if data.ndim != 1 or data.dtype != np.uint8:
                raise ValueError(f"a JPEG shard takes encoded bytes, got {data.dtype} {data.shape}")
            number = row % count
            with open(directory / names[number], "ab") as handle:
                handle.write(data.tobytes())
            index[row] = (number, filled[number], len(data))
            filled[number] += len(data)
        np.save(directory / index_name(split), index)
        np.save(directory / split_labels_name(split), np.asarray(labels, dtype=np.int64))
        return names

    def previous(self, directory: Path, split: str, names: list[str]) -> PreviousShards:
        return _JpegPrevious(directory, names, np.load(directory / index_name(split)))


class _JpegPrevious:
    """Encoded samples of earlier JPEG shards, copied as they are (no second encoding)."""

    def __init__(self, directory: Path, names: list[str], index: np.ndarray) -> None:
        self.directory, self.names, self.index = directory, names, index

    def sample(self, row: int) -> np.ndarray:
        number, offset, length = (int(v) for v in self.index[row])
        with open(self.directory / self.names[number], "rb") as handle:
            handle.seek(offset)
            return np.frombuffer(handle.read(length), dtype=np.uint8)


def shard_sizes(index: np.ndarray, count: int) -> list[int]:
    """Byte size of each of a split's ``count`` JPEG shards, from its index."""
    ends = index[:, 1] + index[:, 2]
    sizes = np.zeros(count, dtype=np.int64)
    np.maximum.at(sizes, index[:, 0], ends)
    return [int(size) for size in sizes]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def shard_members(shard_of: np.ndarray, count: int) -> Sequence[np.ndarray]:
    """The sample indices in each of ``count`` shards, in index order, from the index's
    shard column."""
    order = np.argsort(shard_of, kind="stable")
    return np.split(order, np.cumsum(np.bincount(shard_of, minlength=count))[:-1])
