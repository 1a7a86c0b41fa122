"""Turn a raw dataset source into a prepared dataset (see `thaw.data.prepared`).

Every image is read, hashed, decoded and resized exactly once, into a staging array inside
the temporary output directory; the split is decided on the content hashes of the good
images, and the shards are then cut from the staging array.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from thaw.data.images import DEFAULT_MAX_PIXELS, resample_filter
from thaw.data.prepared import (
    MANIFEST_NAME,
    REPORT_NAME,
    Manifest,
    atomic_output_dir,
    write_split,
)
from thaw.data.sources import LoadedRecord, Record, list_source, load_record
from thaw.data.split import SPLITS, SplitItem, split_items, validate_fractions
from thaw.errors import ThawError

_REPORT_MAX_SKIPPED = 200


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
) -> Manifest:
    """Validate, split, decode and resize `source` into `output_dir`; returns the manifest.

    `data_config` is timm's (`input_size`, `mean`, `std`, `interpolation`). `workdir` holds
    downloaded S3 sources (a temporary directory when None). `num_workers` > 1 decodes in
    that many processes. Nothing is left in `output_dir` when this raises.
    """
    size, interpolation = _check_config(data_config)
    fractions = validate_fractions(split_fractions)
    if shard_size < 1 or not 0 <= max_bad_fraction <= 1:
        raise ThawError(
            f"need shard_size >= 1 and 0 <= max_bad_fraction <= 1, "
            f"got {shard_size} and {max_bad_fraction}"
        )
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="thaw-")))
        records = list_source(str(source), Path(workdir))
        _check_listing(str(source), records)
        out = stack.enter_context(atomic_output_dir(Path(output_dir)))

        staging_path = out / ".staging.npy"
        staging = np.lib.format.open_memmap(
            staging_path, mode="w+", dtype=np.uint8, shape=(len(records), size, size, 3)
        )
        work = partial(load_record, size=size, interpolation=interpolation, max_pixels=max_pixels)
        hashes, bad = [], {}
        for i, loaded in enumerate(_map(work, records, num_workers)):
            hashes.append(loaded.sha256)
            if loaded.image is None:
                bad[i] = loaded.reason or "unreadable"
            else:
                staging[i] = loaded.image
        _check_bad(str(source), records, bad, max_bad_fraction)

        good = [i for i in range(len(records)) if i not in bad]
        items = [
            SplitItem(records[i].path, records[i].class_name, records[i].split, hashes[i])
            for i in good
        ]
        plan = split_items(items, fractions, seed)
        classes = sorted({items[i].class_name for idx in plan.splits.values() for i in idx})
        class_to_idx = {name: idx for idx, name in enumerate(classes)}
        counts, shards = {}, {}
        for split in SPLITS:
            indices = plan.splits[split]
            names = [items[i].class_name for i in indices]
            labels = np.array([class_to_idx[n] for n in names], dtype=np.int64)
            order = np.array([good[i] for i in indices], dtype=np.int64)
            shards[split] = write_split(out, split, staging, order, labels, shard_size)
            per_class = Counter(names)
            counts[split] = {name: per_class[name] for name in classes}
        del staging
        staging_path.unlink()

        skipped = [{"path": records[i].path, "reason": reason} for i, reason in bad.items()]
        manifest = Manifest(
            classes=classes,
            class_to_idx=class_to_idx,
            counts=counts,
            input_size=[3, size, size],
            mean=[float(m) for m in data_config["mean"]],
            std=[float(s) for s in data_config["std"]],
            interpolation=interpolation,
            fingerprint=source_fingerprint(records, hashes),
            skipped=sorted(skipped + plan.skipped, key=lambda s: s["path"]),
            shards=shards,
            source=str(source),
            seed=seed,
            split_fractions=list(fractions),
        )
        (out / MANIFEST_NAME).write_text(manifest.to_json())
        (out / REPORT_NAME).write_text(render_report(manifest))
    return manifest


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


def _check_listing(source: str, records: list[Record]) -> None:
    if not records:
        raise ThawError(
            f"dataset source {source} has no images: expected <class>/<image> or "
            "train|val|test/<class>/<image> folders, or Fashion-MNIST idx files"
        )
    classes = sorted({r.class_name for r in records})
    if len(classes) < 2:
        raise ThawError(
            f"dataset source {source} has {len(classes)} class {classes}: "
            "a classifier needs at least 2 class folders"
        )


def _check_bad(source: str, records: list[Record], bad: dict[int, str], limit: float) -> None:
    if len(bad) <= limit * len(records):
        return
    examples = "; ".join(f"{records[i].path}: {reason}" for i, reason in list(bad.items())[:5])
    raise ThawError(
        f"{len(bad)} of {len(records)} files ({len(bad) / len(records):.1%}) in {source} "
        f"are not usable images, more than max_bad_fraction={limit:.1%}. "
        f"For example: {examples}"
    )


def _map(work: Any, records: list[Record], num_workers: int) -> Iterable[LoadedRecord]:
    if num_workers <= 1:
        yield from map(work, records)
        return
    # spawn, not fork: the parent may hold threads (MLflow, boto3) whose locks fork would copy.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        yield from pool.map(work, records, chunksize=64)


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
        "",
        "## Images per class and split",
        "",
        f"| class | {' | '.join(splits)} | total |",
        "|---|" + "---:|" * (len(splits) + 1),
    ]
    for name in manifest.classes:
        row = [manifest.counts[s][name] for s in splits]
        lines.append(f"| {name} | {' | '.join(map(str, row))} | {sum(row)} |")
    totals = [manifest.split_size(s) for s in splits]
    lines.append(f"| **total** | {' | '.join(map(str, totals))} | {kept} |")
    lines += ["", f"## Skipped files ({len(manifest.skipped)})", ""]
    lines += [f"- `{s['path']}`: {s['reason']}" for s in manifest.skipped[:_REPORT_MAX_SKIPPED]]
    if len(manifest.skipped) > _REPORT_MAX_SKIPPED:
        more = len(manifest.skipped) - _REPORT_MAX_SKIPPED
        lines.append(f"- ... and {more} more in {MANIFEST_NAME}")
    if not manifest.skipped:
        lines.append("None.")
    return "\n".join(lines) + "\n"
