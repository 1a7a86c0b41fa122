"""Deterministic, stratified train/val/test split that keeps exact duplicates together.

An image whose exact content (sha256) appears under two or more classes is a label
conflict: no label can be trusted, so every copy is kept out of every split and reported.
Each group of identical files (same sha256) is ranked by `sha256(seed:content hash)` within
its class and the ranking is cut by the split fractions. The result depends only on the seed
and the file contents, not on listing order, and adding one image moves few others.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from thaw.errors import ThawError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitItem:
    path: str
    class_name: str
    source_split: str | None  # the split folder the file came from, if the source had them
    sha256: str


@dataclass
class SplitPlan:
    splits: dict[str, list[int]]  # split -> indices into the items, ordered by path
    skipped: list[dict[str, str]] = field(default_factory=list)  # [{"path", "reason"}]


def validate_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ThawError(
            f"split fractions {tuple(fractions)} must be three positive numbers "
            "(train, val, test) that sum to 1"
        )
    train, val, test = (float(f) for f in fractions)
    return train, val, test


def split_items(
    items: Sequence[SplitItem], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> SplitPlan:
    """Assign every item to train/val/test, or to the skipped list.

    Unsplit sources are split by `fractions`. Pre-split sources keep their folders; a copy of
    an image already in an earlier split (train < val < test) is dropped and reported, and a
    missing val or test split is carved out of train. Label conflicts are dropped first.
    """
    weights = dict(zip(SPLITS, validate_fractions(fractions), strict=True))
    conflicts = label_conflicts(items)
    usable = [i for i in range(len(items)) if i not in conflicts]
    skipped = [{"path": items[i].path, "reason": reason} for i, reason in conflicts.items()]
    classes = sorted({items[i].class_name for i in usable})
    if len(classes) < 2:
        raise ThawError(f"need at least 2 classes to train a classifier, found {classes}")
    if all(items[i].source_split is None for i in usable):
        return SplitPlan(_stratified(items, usable, weights, seed), skipped)

    kept, duplicates = _drop_cross_split_duplicates(items, usable)
    splits = {s: [i for i in kept if items[i].source_split == s] for s in SPLITS}
    train_classes = {items[i].class_name for i in splits["train"]}
    if not splits["train"]:
        raise ThawError("the source has split folders but no usable images in train/")
    if unknown := sorted(set(classes) - train_classes):
        raise ThawError(f"classes {unknown} appear in val/ or test/ but have no train images")
    if missing := [s for s in ("val", "test") if not splits[s]]:
        carve = {s: weights[s] for s in ("train", *missing)}
        total = sum(carve.values())
        carve = {s: w / total for s, w in carve.items()}
        splits.update(_stratified(items, splits["train"], carve, seed))
    for indices in splits.values():
        indices.sort(key=lambda i: items[i].path)
    return SplitPlan(splits, skipped + duplicates)


def label_conflicts(items: Sequence[SplitItem]) -> dict[int, str]:
    """Index -> skip reason of every item whose content also appears under another class."""
    copies: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        copies[item.sha256].append(i)
    conflicts = {}
    for members in copies.values():
        classes = sorted({items[i].class_name for i in members})
        if len(classes) < 2:
            continue
        for i in members:
            others = sorted(items[j].path for j in members if j != i)
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if others[3:] else "")
            conflicts[i] = (
                f"label conflict: the same image is also {shown} (classes {classes}); "
                "kept out of every split"
            )
    return conflicts


def _drop_cross_split_duplicates(
    items: Sequence[SplitItem], indices: Sequence[int]
) -> tuple[list[int], list[dict[str, str]]]:
    order = sorted(
        indices,
        key=lambda i: (SPLITS.index(items[i].source_split or "train"), items[i].path),
    )
    first: dict[str, SplitItem] = {}
    kept, skipped = [], []
    for i in order:
        item = items[i]
        seen = first.setdefault(item.sha256, item)
        if seen.source_split == item.source_split:
            kept.append(i)  # copies inside one split cannot leak between splits
        else:
            reason = f"duplicate of {seen.path} in {seen.source_split}"
            skipped.append({"path": item.path, "reason": reason})
    return kept, skipped


def _stratified(
    items: Sequence[SplitItem], indices: Sequence[int], weights: dict[str, float], seed: int
) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        groups[items[i].sha256].append(i)
    by_class: dict[str, list[list[int]]] = defaultdict(list)
    for members in groups.values():
        members.sort(key=lambda i: items[i].path)
        by_class[items[members[0]].class_name].append(members)

    def rank(members: list[int]) -> str:
        return hashlib.sha256(f"{seed}:{items[members[0]].sha256}".encode()).hexdigest()

    out: dict[str, list[int]] = {s: [] for s in weights}
    for class_name in sorted(by_class):
        class_groups = sorted(by_class[class_name], key=rank)
        start = 0
        for split, count in _allocate(len(class_groups), weights, class_name).items():
            for members in class_groups[start : start + count]:
                out[split].extend(members)
            start += count
    for split_indices in out.values():
        split_indices.sort(key=lambda i: items[i].path)
    return out


def _allocate(n: int, weights: dict[str, float], class_name: str) -> dict[str, int]:
    """How many groups of a class go to each split: proportional, and at least one each."""
    if n < len(weights):
        raise ThawError(
            f"class {class_name!r} has {n} distinct usable images, too few to put one in each "
            f"of {', '.join(weights)} (needs at least {len(weights)}); add images or drop it"
        )
    # Largest remainder: floor every share, then hand out the rest to the most short-changed.
    exact = {s: n * w for s, w in weights.items()}
    counts = {s: int(share) for s, share in exact.items()}
    for split in sorted(weights, key=lambda s: counts[s] - exact[s])[: n - sum(counts.values())]:
        counts[split] += 1
    for split in weights:
        if counts[split] == 0:
            counts[max(counts, key=lambda s: counts[s])] -= 1
            counts[split] = 1
    return counts
