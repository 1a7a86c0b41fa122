"""List a dataset source into labelled records.

A source is a local folder or an `s3://` prefix (downloaded first) in ImageFolder layout,
`<class>/<image>` or `train|val|test/<class>/<image>`, or a folder of Fashion-MNIST idx files.
File records are read lazily; idx records carry their pixels. This module stays free of
torch so that decoding worker processes start fast.

A class is a folder name, kept exactly (case, spaces, any Unicode letters); hidden entries
(`.name`, `__MACOSX`) are ignored.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from thaw import storage
from thaw.data import fashion_mnist
from thaw.data.images import BadImage, check_size, decode_image, resize_to_square
from thaw.data.split import SPLITS
from thaw.errors import ThawError

_T = TypeVar("_T")


@dataclass(frozen=True, eq=False)
class Record:
    """One labelled image: a file on disk, or pixels already in memory (idx sources)."""

    path: str  # POSIX path relative to the source root: the name in reports and fingerprints
    class_name: str
    split: str | None  # the source's own split folder, None when the source is not split
    file: Path | None = None
    pixels: np.ndarray | None = None  # HxW or HxWx3 uint8

    def content(self) -> bytes:
        """The bytes that identify this image (file content, or the raw pixels)."""
        if self.file is not None:
            return self.file.read_bytes()
        assert self.pixels is not None
        return self.pixels.tobytes()


@dataclass(frozen=True)
class Listing:
    """What a source holds: its records, and the class folders in which no file was found."""

    records: list[Record]
    empty_folders: list[str]  # POSIX paths relative to the source root, e.g. "val/fox"


@dataclass(frozen=True)
class LoadedRecord:
    sha256: str
    image: np.ndarray | None  # size x size x 3 uint8, None when the file is bad
    reason: str | None  # why the file was skipped


@dataclass(frozen=True)
class ScannedRecord:
    sha256: str
    reason: str | None  # why the file is unusable, when its header already tells


def scan_record(record: Record, max_pixels: int, min_side: int) -> ScannedRecord:
    """Hash one record and check its header (format, size) without decoding its pixels.

    This cheap first pass gives the split the content hashes it needs. A file with a sound
    header can still fail to decode (truncated data): `load_record` finds those later.
    """
    data = record.content()
    digest = hashlib.sha256(data).hexdigest()
    return ScannedRecord(digest, _header_problem(record, data, max_pixels, min_side))


def _header_problem(record: Record, data: bytes, max_pixels: int, min_side: int) -> str | None:
    """Why `record` is unusable as far as its header tells, or None."""
    try:
        if record.pixels is not None:
            height, width = record.pixels.shape[:2]
            check_size(width, height, max_pixels=max_pixels, min_side=min_side)
        elif not _header_fits(data, max_pixels, min_side):
            # decode_image stops at the same problem before decoding any pixel, and words
            # it as a full decode would.
            decode_image(data, max_pixels=max_pixels, min_side=min_side)
    except BadImage as exc:
        return exc.reason
    return None


def _header_fits(data: bytes, max_pixels: int, min_side: int) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_size(*im.size, max_pixels=max_pixels, min_side=min_side)
    except Exception:  # BadImage, or any of the many types Pillow raises on a bad header
        return False
    return True


def load_record(
    record: Record, size: int, interpolation: str, max_pixels: int, min_side: int
) -> LoadedRecord:
    """Hash, decode and resize one record (runs in a worker process)."""
    data = record.content()
    digest = hashlib.sha256(data).hexdigest()
    try:
        if record.pixels is not None:
            pixels = record.pixels
            height, width = pixels.shape[:2]
            check_size(width, height, max_pixels=max_pixels, min_side=min_side)
            rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], 3, axis=2)
        else:
            # A JPEG is decoded at no less than twice the output size (the reducing gap
            # `Image.thumbnail` uses), so the final bicubic resize keeps its quality.
            rgb = decode_image(data, max_pixels=max_pixels, min_side=min_side, reduce_to=2 * size)
    except BadImage as exc:
        return LoadedRecord(digest, None, exc.reason)
    return LoadedRecord(digest, resize_to_square(rgb, size, interpolation), None)


def apply_all(work: Callable[[Record], _T], records: list[Record]) -> list[_T]:
    """`work` over a batch of records: one task of a worker process (defined here, away
    from torch, so that unpickling it in a fresh worker imports little)."""
    return [work(record) for record in records]


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name != "__MACOSX"


def _children(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if _visible(p))


def _class_records(root: Path, class_dir: Path, split: str | None) -> list[Record]:
    records = []
    stack = [class_dir]
    while stack:
        for child in _children(stack.pop()):
            if child.is_dir():
                stack.append(child)
            elif child.is_file():
                relative = child.relative_to(root).as_posix()
                records.append(Record(relative, class_dir.name, split, file=child))
    return records


def _imagefolder_listing(root: Path) -> Listing:
    dirs = [p for p in _children(root) if p.is_dir()]
    split_dirs = [p for p in dirs if p.name in SPLITS]
    if split_dirs and len(split_dirs) != len(dirs):
        others = sorted(p.name for p in dirs if p.name not in SPLITS)
        raise ThawError(
            f"mixed layout in {root}: split folders {[p.name for p in split_dirs]} next to "
            f"class folders {others}; use either <class>/<image> or "
            "train|val|test/<class>/<image>"
        )
    if split_dirs:
        ordered = sorted(split_dirs, key=lambda p: SPLITS.index(p.name))
        folders = [(c, s.name) for s in ordered for c in _children(s) if c.is_dir()]
    else:
        folders = [(class_dir, None) for class_dir in dirs]
    records: list[Record] = []
    empty = []
    for class_dir, split in folders:
        found = _class_records(root, class_dir, split)
        records.extend(found)
        if not found:
            empty.append(class_dir.relative_to(root).as_posix())
    return Listing(records, empty)


def _idx_records(root: Path) -> list[Record]:
    records = []
    for split in ("train", "test"):
        if not fashion_mnist.has_split(root, split):
            continue
        images, labels = fashion_mnist.load_split(root, split)
        for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            name = fashion_mnist.CLASS_NAMES[label]
            records.append(Record(f"{split}/{index:05d}", name, split, pixels=pixels))
    return records


def list_source(source: str, workdir: Path) -> Listing:
    """The records of `source` (local folder or `s3://` prefix; S3 is downloaded to workdir).

    S3 has no empty folders (folder markers are skipped), so only local sources can list
    empty class folders.
    """
    root = storage.materialize(source, workdir)
    if not root.is_dir():
        raise ThawError(f"dataset source {source} is not a folder")
    if fashion_mnist.has_split(root, "train"):
        return Listing(_idx_records(root), [])
    return _imagefolder_listing(root)
