"""Turn a raw dataset source into a prepared dataset (see `thaw.data.prepared`).

Two passes over the source, both on `num_workers` processes. The first reads and hashes
every file and checks its header (format, size) without decoding pixels; the split is decided
on the content hashes of the files that passed. The second decodes and resizes each image of
the split straight into its shard, in order, so peak disk is the prepared size plus the
shard being filled. A file whose header is sound but whose pixels are not (truncated) is
found in the second pass: the split is then decided again without it and the shards are
rewritten from the ones already written, re-decoding only the few images that changed
split. The result is the same as deciding on decoded images from the start.

`image_format="jpeg"` stores each resized image re-encoded as JPEG (quality 90, encoded in
the worker processes) in strided shards with a small index (`thaw.data.shards`); with
`shard_uri` the shards are then uploaded once to `<shard_uri>/<content key>/` and the
prepared folder keeps only the manifest, report, index and labels, a few MB however large
the set (`thaw.data.remote_shards`).

Classes are the class folder names, kept exactly and sorted by code point (Python's `sorted`,
independent of locale and listing order), so a class's index depends only on the set of
names. Refused with a `ThawError`: an empty class folder (`<class>/` or `train/<class>/`),
two class names equal up to letter case or Unicode normalisation (`Cat`/`cat`: one folder
on macOS and Windows file systems, and one name to a person), and a class left without
usable training images. Reported in `Manifest.warnings` and the report: empty `val/` or
`test/` class folders, classes missing from a given val/ or test/ split (their indices do
not shift: they still come from all class folders), and label conflicts.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from thaw.data.images import (
    DEFAULT_MAX_PIXELS,
    JPEG_QUALITY,
    MIN_IMAGE_SIDE,
    resample_filter,
)
from thaw.data.prepared import (
    MANIFEST_NAME,
    REPORT_NAME,
    Manifest,
    atomic_output_dir,
)
from thaw.data.remote_shards import publish_shards, shard_prefix
from thaw.data.shards import (
    ShardLayout,
    check_image_format,
    encode_record,
    file_sha256,
    layout,
)
from thaw.data.sources import (
    Listing,
    LoadedRecord,
    Record,
    apply_all,
    list_source,
    scan_record,
)
from thaw.data.split import SPLITS, SplitItem, SplitPlan, split_items, validate_fractions
from thaw.errors import ThawError
from thaw.storage import is_s3_uri

_REPORT_MAX_SKIPPED = 200
_BATCH = 64  # records per task sent to a worker process
_BATCHES_PER_WORKER = 4  # tasks in flight per worker: enough to keep it busy
_T = TypeVar("_T")


def prepare_dataset(
    source: str | os.PathLike[str],
    output_dir: Path,
    *,
    data_config: dict[str, Any],
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    max_bad_fraction: float = 0.05,
    shard_size: int = 2048,
    workdir: Path | None = None,
    num_workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_IMAGE_SIDE,
    image_format: str = "raw",
    shard_uri: str | None = None,
) -> Manifest:
    """Validate, split, decode and resize `source` into `output_dir`; returns the manifest.

    `data_config` is timm's (`input_size`, `mean`, `std`, `interpolation`). `workdir` holds
    downloaded S3 sources (a temporary directory when None). `num_workers` > 1 decodes in
    that many processes. Images of more than `max_pixels` pixels (checked from the header,
    before decoding) or with a side below `min_side` are skipped and reported.
    `image_format` "raw" stores pixels, "jpeg" re-encoded JPEG (about 15x smaller at 224 px);
    `shard_uri` (an `s3://` prefix, JPEG only) is where the shards go instead of
    `output_dir`. Nothing is left in `output_dir` when this raises.
    """
    size, interpolation = _check_config(data_config)
    fractions = validate_fractions(split_fractions)
    check_image_format(image_format)
    if shard_uri is not None and (image_format != "jpeg" or not is_s3_uri(shard_uri)):
        raise ThawError(f"shard_uri={shard_uri!r} needs image_format='jpeg' (got "
                        f"{image_format!r}) and an s3://bucket/prefix URI: only JPEG shards "
                        "are streamed from S3")
    if min(shard_size, max_pixels, min_side) < 1 or not 0 <= max_bad_fraction <= 1:
        raise ThawError(
            "need shard_size, max_pixels and min_side >= 1 and 0 <= max_bad_fraction <= 1, "
            f"got {shard_size}, {max_pixels}, {min_side} and {max_bad_fraction}"
        )
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="thaw-")))
        listing = list_source(str(source), Path(workdir))
        _check_listing(str(source), listing)
        records = listing.records
        out = stack.enter_context(atomic_output_dir(Path(output_dir)))
        workers = stack.enter_context(_Workers(num_workers))

        scan = partial(scan_record, max_pixels=max_pixels, min_side=min_side)
        hashes, bad = [], {}
        for i, scanned in enumerate(workers.map(scan, records)):
            hashes.append(scanned.sha256)
            if scanned.reason is not None:
                bad[i] = scanned.reason
        decode = partial(
            encode_record,
            image_format=image_format,
            size=size,
            interpolation=interpolation,
            max_pixels=max_pixels,
            min_side=min_side,
        )
        shard_layout = layout(image_format, shard_size)
        writer = _ShardWriter(out, records, hashes, decode, workers, shard_layout, size)
        classes = sorted({r.class_name for r in records})
        class_to_idx = {name: idx for idx, name in enumerate(classes)}
        while True:
            _check_bad(str(source), records, bad, max_bad_fraction)
            good = [i for i in range(len(records)) if i not in bad]
            items = [
                SplitItem(records[i].path, records[i].class_name, records[i].split, hashes[i])
                for i in good
            ]
            plan = split_items(items, fractions, seed)
            order = {split: [good[i] for i in plan.splits[split]] for split in SPLITS}
            labels = {
                split: np.array([class_to_idx[records[j].class_name] for j in order[split]],
                                dtype=np.int64)
                for split in SPLITS
            }
            shards, late = writer.write(order, labels)
            if not late:
                break
            # Files whose header was sound but whose pixels were not: the split is decided
            # again without them, and the shards rewritten from the ones just written.
            bad = dict(sorted({**bad, **late}.items()))
        counts = {}
        for split in SPLITS:
            per_class = Counter(records[j].class_name for j in order[split])
            counts[split] = {name: per_class[name] for name in classes}

        skipped = [{"path": records[i].path, "reason": reason} for i, reason in bad.items()]
        skipped = sorted(skipped + plan.skipped, key=lambda s: s["path"])
        _check_training_images(str(source), records, counts, skipped)
        manifest = Manifest(
            classes=classes,
            class_to_idx=class_to_idx,
            counts=counts,
            input_size=[3, size, size],
            mean=[float(m) for m in data_config["mean"]],
            std=[float(s) for s in data_config["std"]],
            interpolation=interpolation,
            fingerprint=source_fingerprint(records, hashes),
            skipped=skipped,
            shards=shards,
            source=str(source),
            seed=seed,
            split_fractions=list(fractions),
            warnings=_warnings(listing, counts, plan),
            image_format=image_format,
            shard_sha256=({name: file_sha256(out / name) for names in shards.values()
                           for name in names} if image_format == "jpeg" else {}),
        )
        if shard_uri is not None:
            manifest = _publish(out, manifest, shard_uri)
        (out / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        (out / REPORT_NAME).write_text(render_report(manifest), encoding="utf-8")
    return manifest


def _publish(out: Path, manifest: Manifest, shard_uri: str) -> Manifest:
    """Upload the shards to their content-addressed prefix under `shard_uri` and drop the
    local copies; the returned manifest names the prefix."""
    location = shard_prefix(shard_uri, manifest.content_key())
    names = list(manifest.shard_sha256)
    publish_shards(out, names, location)
    for name in names:
        (out / name).unlink()
    return replace(manifest, shard_location=location)


def _check_config(data_config: dict[str, Any]) -> tuple[int, str]:
    missing = sorted({"input_size", "mean", "std", "interpolation"} - data_config.keys())
    if missing:
        raise ThawError(f"data_config lacks {missing} (take it from timm's resolve_data_config)")
    channels, height, width = data_config["input_size"]
    if channels != 3 or height != width:
        raise ThawError(
            f"input_size {tuple(data_config['input_size'])} is not supported: "
            "thaw prepares square RGB images, (3, S, S)"
        )
    interpolation = str(data_config["interpolation"])
    resample_filter(interpolation)  # fail now on an unknown name, not in every image
    return int(height), interpolation


def _check_listing(source: str, listing: Listing) -> None:
    if not listing.records:
        raise ThawError(
            f"dataset source {source} has no images: expected <class>/<image> or "
            "train|val|test/<class>/<image> folders, or Fashion-MNIST idx files"
        )
    if empty := [f for f in listing.empty_folders if f.split("/")[0] not in ("val", "test")]:
        raise ThawError(
            f"class folders {[f + '/' for f in empty]} in {source} hold no files: a class "
            "needs training images; add images or remove the folders"
        )
    classes = sorted({r.class_name for r in listing.records})
    _check_class_names(source, classes)
    if len(classes) < 2:
        raise ThawError(
            f"dataset source {source} has {len(classes)} class {classes}: "
            "a classifier needs at least 2 class folders"
        )


def _check_class_names(source: str, classes: list[str]) -> None:
    """Refuse names that differ only in letter case or Unicode normalisation (NFC/NFD)."""
    seen: dict[str, str] = {}
    for name in classes:
        key = unicodedata.normalize("NFC", name).casefold()
        if key in seen:
            raise ThawError(
                f"class folders {seen[key]!r} and {name!r} in {source} differ only in letter "
                "case or Unicode normalisation: they are one folder on case-insensitive file "
                "systems (macOS, Windows) and easily confused; rename or merge them"
            )
        seen[key] = name


def _check_training_images(
    source: str,
    records: list[Record],
    counts: dict[str, dict[str, int]],
    skipped: list[dict[str, str]],
) -> None:
    """Refuse a class none of whose files made it into train (all unusable or conflicting)."""
    if not (empty := [name for name, count in counts["train"].items() if count == 0]):
        return
    class_of = {r.path: r.class_name for r in records}
    lost = [s for s in skipped if class_of[s["path"]] in empty]
    examples = "; ".join(f"{s['path']}: {s['reason']}" for s in lost[:3])
    raise ThawError(
        f"classes {empty} in {source} have no usable training images: all {len(lost)} of "
        f"their files were skipped (e.g. {examples}); fix or replace those files, or remove "
        "the class folders"
    )


def _warnings(listing: Listing, counts: dict[str, dict[str, int]], plan: SplitPlan) -> list[str]:
    """Problems that do not stop preparation, for the manifest and the report."""
    lines = [f"empty class folder {f}/ (ignored)" for f in listing.empty_folders]
    for split in ("val", "test"):
        if missing := [name for name, count in counts[split].items() if count == 0]:
            lines.append(
                f"classes {missing} have no {split} images: their {split} metrics cannot be "
                "measured (class indices are unchanged)"
            )
    if conflicts := [s for s in plan.skipped if s["reason"].startswith("label conflict")]:
        lines.append(
            f"{len(conflicts)} files hold an image that also appears under another class "
            "(label conflicts): all copies are kept out of every split, see Skipped files"
        )
    return lines


def _check_bad(source: str, records: list[Record], bad: dict[int, str], limit: float) -> None:
    if len(bad) <= limit * len(records):
        return
    examples = "; ".join(f"{records[i].path}: {reason}" for i, reason in list(bad.items())[:5])
    raise ThawError(
        f"{len(bad)} of {len(records)} files ({len(bad) / len(records):.1%}) in {source} "
        f"are not usable images, more than max_bad_fraction={limit:.1%}. "
        f"For example: {examples}"
    )


class _Workers:
    """Maps a function over records in order: in-process for `count` <= 1, else in `count`
    processes with a bounded number of batches in flight, so memory stays flat however many
    records there are."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pool: ProcessPoolExecutor | None = None
        if count > 1:
            # spawn, not fork: the parent may hold threads (MLflow, boto3) whose locks fork
            # would copy.
            context = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(count, mp_context=context)

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def map(self, work: Callable[[Record], _T], records: Sequence[Record]) -> Iterator[_T]:
        if self.pool is None:
            yield from map(work, records)
            return
        pending: deque[Future[list[_T]]] = deque()
        for start in range(0, len(records), _BATCH):
            batch = list(records[start : start + _BATCH])
            pending.append(self.pool.submit(apply_all, work, batch))
            if len(pending) >= _BATCHES_PER_WORKER * self.count:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


class _ShardWriter:
    """Writes the shards of a split plan, decoding every image straight into its shard.

    `write` records where each image went; called again with a plan that leaves out files
    which failed to decode, it copies the encoded images from the shards it wrote before
    (renamed into a hidden folder; raw shards are deleted one by one as they are used),
    decoding again only the few images that changed split. Disk use stays about one
    prepared set plus two shards (raw), or two sets (JPEG, a fifteenth of raw each), and no
    image is decoded or encoded twice except those.
    """

    def __init__(
        self,
        out: Path,
        records: list[Record],
        hashes: list[str],
        decode: Callable[[Record], LoadedRecord],
        workers: _Workers,
        shard_layout: ShardLayout,
        size: int,
    ) -> None:
        self.out, self.records, self.hashes = out, records, hashes
        self.decode, self.workers, self.layout = decode, workers, shard_layout
        self.blank = shard_layout.blank(size)
        self.order: dict[str, list[int]] = {}  # split -> records in the shards on disk
        self.shards: dict[str, list[str]] = {}
        self.late: dict[int, str] = {}

    def write(
        self, order: dict[str, list[int]], labels: dict[str, np.ndarray]
    ) -> tuple[dict[str, list[str]], dict[int, str]]:
        """Write `order[split]` (record indices) with `labels`; returns the shard names per
        split and the records that failed to decode (index -> reason)."""
        self.late = {}
        previous = self.out / ".previous"
        if self.shards:
            previous.mkdir()
            for path in list(self.out.iterdir()):
                if path != previous:
                    path.rename(previous / path.name)
            placed = {j: (s, row) for s in SPLITS for row, j in enumerate(self.order[s])}
            streams = {s: self._reused(previous, s, order[s], placed) for s in SPLITS}
        else:
            decoded = self._decoded([j for split in SPLITS for j in order[split]])
            streams = dict.fromkeys(SPLITS, decoded)
        self.shards = {
            split: self.layout.write_split(self.out, split, streams[split], labels[split])
            for split in SPLITS
        }
        shutil.rmtree(previous, ignore_errors=True)
        self.order = order
        return self.shards, self.late

    def _pixels(self, index: int, loaded: LoadedRecord) -> np.ndarray:
        """The image of `loaded`; a blank for a file that failed to decode (noted in
        `self.late`: the shards are written again without it)."""
        if loaded.sha256 != self.hashes[index]:
            raise ThawError(
                f"{self.records[index].path} changed while the dataset was being prepared; "
                "prepare it again once the source is no longer being written"
            )
        if loaded.image is None:
            self.late[index] = loaded.reason or "unreadable"
            return self.blank
        return loaded.image

    def _decoded(self, indices: list[int]) -> Iterator[np.ndarray]:
        """Decoded images of `indices`, in order."""
        loaded = self.workers.map(self.decode, [self.records[j] for j in indices])
        for j, result in zip(indices, loaded, strict=True):
            yield self._pixels(j, result)

    def _reused(
        self, previous: Path, split: str, indices: list[int], placed: dict[int, tuple[str, int]]
    ) -> Iterator[np.ndarray]:
        """Encoded images of `indices` copied from the previous shards of `split` (`placed`:
        record -> (split, row) there); images that were in another split are decoded again."""
        earlier = self.layout.previous(previous, split, self.shards[split])
        for j in indices:
            where = placed.get(j)
            if where is None or where[0] != split:
                yield self._pixels(j, self.decode(self.records[j]))
            else:
                yield earlier.sample(where[1])


def _storage_line(manifest: Manifest) -> list[str]:
    if manifest.image_format == "raw":
        return []
    where = f" at `{manifest.shard_location}`" if manifest.shard_location else ""
    return [f"- stored as JPEG (quality {JPEG_QUALITY}) in {len(manifest.shard_sha256)} "
            f"shards{where}"]


def source_fingerprint(records: Sequence[Record], hashes: Sequence[str]) -> str:
    """sha256 over the sorted (path, content sha256, class, split) of every source file."""
    rows = sorted(
        (r.path, h, r.class_name, r.split or "") for r, h in zip(records, hashes, strict=True)
    )
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def render_report(manifest: Manifest) -> str:
    """The human-readable validation report (Markdown)."""
    splits = list(manifest.counts)
    kept = sum(manifest.split_size(s) for s in splits)
    _, height, width = manifest.input_size
    lines = [
        "# Dataset validation report",
        "",
        f"- source: `{manifest.source}`",
        f"- fingerprint: `{manifest.fingerprint}`",
        f"- images: {kept} kept, {len(manifest.skipped)} skipped, {len(manifest.classes)} classes",
        f"- resized to {height}x{width} ({manifest.interpolation}), seed {manifest.seed}, "
        f"split fractions {'/'.join(str(f) for f in manifest.split_fractions)}",
        *_storage_line(manifest),
        "",
        "## Images per class and split",
        "",
        f"| class | {' | '.join(splits)} | total |",
        "|---|" + "---:|" * (len(splits) + 1),
    ]
    for name in manifest.classes:
        row = [manifest.counts[s][name] for s in splits]
        cell = name.replace("|", "\\|")  # a class name may hold any character
        lines.append(f"| {cell} | {' | '.join(map(str, row))} | {sum(row)} |")
    totals = [manifest.split_size(s) for s in splits]
    lines.append(f"| **total** | {' | '.join(map(str, totals))} | {kept} |")
    if manifest.warnings:
        lines += ["", f"## Warnings ({len(manifest.warnings)})", ""]
        lines += [f"- {warning}" for warning in manifest.warnings]
    lines += ["", f"## Skipped files ({len(manifest.skipped)})", ""]
    lines += [f"- `{s['path']}`: {s['reason']}" for s in manifest.skipped[:_REPORT_MAX_SKIPPED]]
    if len(manifest.skipped) > _REPORT_MAX_SKIPPED:
        more = len(manifest.skipped) - _REPORT_MAX_SKIPPED
        lines.append(f"- ... and {more} more in {MANIFEST_NAME}")
    if not manifest.skipped:
        lines.append("None.")
    return "\n".join(lines) + "\n"
