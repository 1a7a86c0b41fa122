"""prepare_dataset end to end on tiny real image folders, the split rules, and the format."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thaw import storage
from thaw.data.images import decode_image, resize_to_square
from thaw.data.prepare import prepare_dataset
from thaw.data.prepared import ImageSplit, Manifest, open_prepared
from thaw.data.split import SplitItem, split_items
from thaw.errors import ThawError

SPLITS = ("train", "val", "test")
MakeFolder = Callable[..., Path]


def digests(images: np.ndarray) -> set[str]:
    return {hashlib.sha256(img.tobytes()).hexdigest() for img in images}


def all_digests(out: Path) -> dict[str, set[str]]:
    prepared = open_prepared(out)
    return {split: digests(prepared.images(split)) for split in SPLITS}


# --- split rules, on their own ---------------------------------------------------------


def items(layout: dict[str, int], dupes: int = 0) -> list[SplitItem]:
    out = []
    for folder, count in layout.items():
        split, _, cls = folder.rpartition("/")
        for i in range(count):
            digest = f"{folder}-{i % (count - dupes) if dupes else i}"
            out.append(SplitItem(f"{folder}/{i}.png", cls, split or None, digest))
    return out


def test_split_is_deterministic_stratified_and_seeded() -> None:
    data = items({"cat": 20, "dog": 13, "fox": 3})
    plan = split_items(data, seed=1)
    assert plan.splits == split_items(data, seed=1).splits
    assert plan.splits != split_items(data, seed=2).splits
    for split in SPLITS:
        assert {data[i].class_name for i in plan.splits[split]} == {"cat", "dog", "fox"}
    assert sorted(i for s in SPLITS for i in plan.splits[s]) == list(range(len(data)))
    cats = [sum(data[i].class_name == "cat" for i in plan.splits[s]) for s in SPLITS]
    assert cats == [14, 3, 3]


def test_split_does_not_depend_on_listing_order() -> None:
    data = items({"cat": 9, "dog": 9})
    reordered = list(reversed(data))

    def paths(d: list[SplitItem]) -> dict[str, set[str]]:
        plan = split_items(d, seed=0)
        return {s: {d[i].path for i in plan.splits[s]} for s in SPLITS}

    assert paths(data) == paths(reordered)


def test_split_keeps_duplicates_together() -> None:
    data = items({"cat": 30, "dog": 30}, dupes=10)  # each content appears 1-2 times
    plan = split_items(data, seed=0)
    where: dict[str, set[str]] = {}
    for split in SPLITS:
        for i in plan.splits[split]:
            where.setdefault(data[i].sha256, set()).add(split)
    assert all(len(splits) == 1 for splits in where.values())


# --- prepare_dataset ---------------------------------------------------------------------


def test_round_trip_manifest_and_reader(make_folder: MakeFolder, tmp_path, data_config) -> None:
    src = make_folder({"cat": 10, "dog": 9, "fox": 8})
    out = tmp_path / "out"
    manifest = prepare_dataset(str(src), out, data_config=data_config, shard_size=4)

    assert manifest.classes == ["cat", "dog", "fox"]
    assert manifest.class_to_idx == {"cat": 0, "dog": 1, "fox": 2}
    assert manifest.input_size == [3, 16, 16]
    assert manifest.interpolation == "bicubic" and manifest.mean == [0.5] * 3
    assert manifest.skipped == [] and manifest.source == str(src)
    assert manifest.seed == 0 and manifest.split_fractions == [0.7, 0.15, 0.15]
    assert len(manifest.fingerprint) == 64
    assert manifest.counts["train"] == {"cat": 7, "dog": 6, "fox": 6}  # largest remainder
    assert manifest.counts["val"] == {"cat": 2, "dog": 2, "fox": 1}
    assert sum(manifest.split_size(s) for s in SPLITS) == 27
    assert all(manifest.counts[s][c] >= 1 for s in SPLITS for c in manifest.classes)
    assert Manifest.from_json((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(("images", "labels"))) == [
        "manifest.json",
        "validation_report.md",
    ]
    report = (out / "validation_report.md").read_text()
    assert "| cat | 7 | 2 | 1 | 10 |" in report and "| **total** |" in report

    prepared = open_prepared(out)
    train = prepared.images("train")
    assert train.shape == (manifest.split_size("train"), 16, 16, 3) and train.dtype == np.uint8
    assert len(manifest.shards["train"]) == 5  # 19 train images in shards of 4
    labels = prepared.labels("train")
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [manifest.counts["train"][c] for c in manifest.classes]

    # Every stored image is exactly its source file, decoded and resized once.
    expected = {
        hashlib.sha256(resize_to_square(decode_image(p.read_bytes()), 16).tobytes()).hexdigest()
        for p in src.rglob("*.png")
    }
    stored = all_digests(out)
    assert set().union(*stored.values()) == expected

    split = ImageSplit(prepared, "train", transform=lambda x: x.float() / 255)
    assert len(split) == len(train)
    image, label = split[-1]
    assert image.shape == (3, 16, 16) and image.max() <= 1.0 and label == labels[-1]
    raw = ImageSplit(prepared, "train")
    for index in (0, 5, len(raw) - 1):  # across shard boundaries
        chw, lbl = raw[index]
        assert chw.dtype.is_floating_point is False
        assert np.array_equal(chw.permute(1, 2, 0).numpy(), train[index]) and lbl == labels[index]
    clone = pickle.loads(pickle.dumps(raw))
    assert np.array_equal(clone[7][0].numpy(), raw[7][0].numpy())
    with pytest.raises(IndexError):
        raw[len(raw)]


def test_same_seed_same_result_other_seed_other_split(make_folder, tmp_path, data_config):
    src = make_folder({"cat": 12, "dog": 12})
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        prepare_dataset(str(src), tmp_path / name, data_config=data_config, seed=seed)
        runs.append(all_digests(tmp_path / name))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_duplicates_never_straddle_splits(make_folder, tmp_path, data_config) -> None:
    src = make_folder({"cat": 12, "dog": 12})
    for i in range(6):  # copies inside a class, and one across classes
        shutil.copy(src / "cat" / f"img{i:03d}.png", src / "cat" / f"copy{i}.png")
    shutil.copy(src / "dog" / "img000.png", src / "cat" / "from-dog.png")
    prepare_dataset(str(src), tmp_path / "out", data_config=data_config)
    stored = all_digests(tmp_path / "out")
    assert not (stored["train"] & stored["val"] or stored["train"] & stored["test"]
                or stored["val"] & stored["test"])  # fmt: skip
    # Unsplit: copies inside a class are kept; the copy across classes is a label conflict.
    skipped = open_prepared(tmp_path / "out").manifest.skipped
    assert [s["path"] for s in skipped] == ["cat/from-dog.png", "dog/img000.png"]
    assert all(s["reason"].startswith("label conflict") for s in skipped)


def test_pre_split_layout_is_respected_and_cross_split_copies_dropped(
    make_folder, tmp_path, data_config
) -> None:
    layout = {"train/cat": 5, "train/dog": 4, "val/cat": 2, "val/dog": 2, "test/cat": 2,
              "test/dog": 3}  # fmt: skip
    src = make_folder(layout)
    shutil.copy(src / "train/cat/img000.png", src / "test/cat/leak.png")
    shutil.copy(src / "val/dog/img001.png", src / "test/dog/leak.png")
    manifest = prepare_dataset(str(src), tmp_path / "out", data_config=data_config)
    assert manifest.counts == {
        "train": {"cat": 5, "dog": 4},
        "val": {"cat": 2, "dog": 2},
        "test": {"cat": 2, "dog": 3},
    }
    assert manifest.skipped == [
        {"path": "test/cat/leak.png", "reason": "duplicate of train/cat/img000.png in train"},
        {"path": "test/dog/leak.png", "reason": "duplicate of val/dog/img001.png in val"},
    ]
    assert (
        "duplicate of train/cat/img000.png in train"
        in (tmp_path / "out" / "validation_report.md").read_text()
    )


def test_pre_split_without_test_carves_it_from_train(make_folder, tmp_path, data_config):
    src = make_folder({"train/cat": 10, "train/dog": 10, "val/cat": 2, "val/dog": 3})
    manifest = prepare_dataset(str(src), tmp_path / "out", data_config=data_config)
    assert manifest.counts["val"] == {"cat": 2, "dog": 3}
    assert manifest.counts["test"] == {"cat": 2, "dog": 2}
    assert manifest.counts["train"] == {"cat": 8, "dog": 8}


def test_bad_files_are_skipped_with_reasons(make_folder, write_png, tmp_path, data_config):
    src = make_folder({"cat": 10, "dog": 10})
    (src / "cat" / "zero.png").write_bytes(b"")
    (src / "cat" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\x00 not really a jpeg" * 10)
    (src / "dog" / "notes.txt").write_text("labelled by Bob\n")
    good = (src / "dog" / "img000.png").read_bytes()
    (src / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    write_png(src / "dog" / "bomb.png", size=(40, 40))
    (src / "dog" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: ignored, not skipped
    write_png(src / ".hidden" / "x.png")
    write_png(src / "cat" / ".cache" / "x.png")
    (src / "README.md").write_text("files at the root are not in a class\n")

    manifest = prepare_dataset(
        str(src), tmp_path / "out", data_config=data_config, max_bad_fraction=0.25, max_pixels=500
    )
    reasons = {s["path"]: s["reason"] for s in manifest.skipped}
    assert sorted(reasons) == [
        "cat/garbage.jpg", "cat/zero.png", "dog/bomb.png", "dog/notes.txt", "dog/truncated.png",
    ]  # fmt: skip
    assert reasons["cat/zero.png"].startswith("empty file")
    assert reasons["cat/garbage.jpg"].startswith("not an image")
    assert reasons["dog/notes.txt"].startswith("not an image")
    assert reasons["dog/truncated.png"].startswith("truncated or corrupt")
    assert reasons["dog/bomb.png"].startswith("decompression bomb")
    assert sum(manifest.split_size(s) for s in SPLITS) == 20
    report = (tmp_path / "out" / "validation_report.md").read_text()
    assert "## Skipped files (5)" in report and "`dog/notes.txt`: not an image" in report


def test_too_many_bad_files_fails_and_leaves_nothing(make_folder, tmp_path, data_config):
    src = make_folder({"cat": 10, "dog": 10})
    for i in range(3):
        (src / "cat" / f"bad{i}.png").write_bytes(b"nope")
    out = tmp_path / "prepared" / "out"
    with pytest.raises(ThawError, match=r"3 of 23 files \(13\.0%\).*max_bad_fraction=5\.0%"):
        prepare_dataset(str(src), out, data_config=data_config)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary directory left behind


def test_failure_keeps_previous_output_and_replaces_on_success(make_folder, tmp_path, data_config):
    src = make_folder({"cat": 6, "dog": 6})
    out = tmp_path / "out"
    first = prepare_dataset(str(src), out, data_config=data_config)
    (src / "cat" / "bad.png").write_bytes(b"nope")
    with pytest.raises(ThawError, match="not usable images"):
        prepare_dataset(str(src), out, data_config=data_config)
    assert open_prepared(out).manifest == first
    (src / "cat" / "bad.png").unlink()
    write_extra = make_folder({"cat": 1}, name="src")  # one more cat image
    assert write_extra == src
    second = prepare_dataset(str(src), out, data_config=data_config)
    assert second.fingerprint != first.fingerprint
    assert open_prepared(out).manifest == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_refuses_to_overwrite_a_directory_that_is_not_a_prepared_dataset(
    make_folder, tmp_path, data_config
) -> None:
    src = make_folder({"cat": 6, "dog": 6})
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("...")
    with pytest.raises(ThawError, match="is not a prepared dataset; refusing to overwrite"):
        prepare_dataset(str(src), precious, data_config=data_config)
    assert (precious / "thesis.tex").exists()


def test_fingerprint_is_stable_and_tracks_content(make_folder, write_png, tmp_path, data_config):
    src = make_folder({"cat": 6, "dog": 6})
    a = prepare_dataset(str(src), tmp_path / "a", data_config=data_config).fingerprint
    b = prepare_dataset(str(src), tmp_path / "b", data_config=data_config, seed=3).fingerprint
    assert a == b
    write_png(src / "dog" / "img002.png")  # same name, new content
    c = prepare_dataset(str(src), tmp_path / "c", data_config=data_config).fingerprint
    assert c != a
    (src / "dog" / "img002.png").rename(src / "dog" / "renamed.png")
    d = prepare_dataset(str(src), tmp_path / "d", data_config=data_config).fingerprint
    assert d not in (a, c)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "has no images"),
        ({"cat": 5}, r"has 1 class \['cat'\]: a classifier needs at least 2"),
        ({"cat": 10, "dog": 2}, "class 'dog' has 2 distinct usable images, too few"),
        ({"train/cat": 3, "train/dog": 3, "dog": 3}, r"mixed layout .* class folders \['dog'\]"),
    ],
    ids=["empty", "one-class", "class-too-small", "mixed-layout"],
)
def test_source_errors(make_folder, tmp_path, data_config, layout, message) -> None:
    src = make_folder(layout)
    src.mkdir(exist_ok=True)
    with pytest.raises(ThawError, match=message):
        prepare_dataset(str(src), tmp_path / "out", data_config=data_config)
    assert not (tmp_path / "out").exists()


def test_argument_errors(make_folder, tmp_path, data_config) -> None:
    src = make_folder({"cat": 3, "dog": 3})
    with pytest.raises(ThawError, match="does not exist"):
        prepare_dataset(str(tmp_path / "nope"), tmp_path / "out", data_config=data_config)
    with pytest.raises(ThawError, match="split fractions"):
        prepare_dataset(str(src), tmp_path / "out", data_config=data_config,
                        split_fractions=(0.9, 0.1, 0.0))  # fmt: skip
    with pytest.raises(ThawError, match="square RGB"):
        prepare_dataset(str(src), tmp_path / "out", data_config={**data_config,
                        "input_size": (3, 16, 24)})  # fmt: skip
    with pytest.raises(ThawError, match="unknown interpolation"):
        prepare_dataset(str(src), tmp_path / "out", data_config={**data_config,
                        "interpolation": "cubic"})  # fmt: skip
    with pytest.raises(ThawError, match=r"data_config lacks \['mean'\]"):
        cfg = {k: v for k, v in data_config.items() if k != "mean"}
        prepare_dataset(str(src), tmp_path / "out", data_config=cfg)


def test_open_prepared_rejects_broken_datasets(make_folder, tmp_path, data_config) -> None:
    with pytest.raises(ThawError, match="not a prepared dataset: .* has no manifest.json"):
        open_prepared(tmp_path)
    src = make_folder({"cat": 6, "dog": 6})
    out = tmp_path / "out"
    prepare_dataset(str(src), out, data_config=data_config)
    (out / "labels-val-00000.npy").unlink()
    with pytest.raises(ThawError, match="not a prepared dataset: .* missing shard labels-val"):
        open_prepared(out)
    (out / "manifest.json").write_text("{}")
    with pytest.raises(ThawError, match="not a prepared dataset: .* lacks fields"):
        open_prepared(out)


def test_prepare_in_worker_processes_matches_in_process(make_folder, tmp_path, data_config):
    src = make_folder({"cat": 6, "dog": 6})
    (src / "dog" / "bad.png").write_bytes(b"nope")
    one = prepare_dataset(str(src), tmp_path / "one", data_config=data_config,
                          max_bad_fraction=0.1)  # fmt: skip
    two = prepare_dataset(str(src), tmp_path / "two", data_config=data_config,
                          max_bad_fraction=0.1, num_workers=2)  # fmt: skip
    assert one.skipped == two.skipped and one.fingerprint == two.fingerprint
    assert all_digests(tmp_path / "one") == all_digests(tmp_path / "two")


def test_prepare_from_s3(make_folder, tmp_path, data_config, s3_bucket: str) -> None:
    src = make_folder({"train/cat": 4, "train/dog": 4, "val/cat": 1, "val/dog": 1,
                       "test/cat": 1, "test/dog": 1})  # fmt: skip
    Image.new("RGB", (8, 8)).save(src / "train" / "dog" / "extra.jpg")  # min_side is 8
    uri = f"{s3_bucket}/datasets/pets"
    storage.upload_dir(src, uri)
    manifest = prepare_dataset(uri, tmp_path / "out", data_config=data_config,
                               workdir=tmp_path / "work")  # fmt: skip
    local = prepare_dataset(str(src), tmp_path / "local", data_config=data_config)
    assert manifest.source == uri
    assert manifest.counts == local.counts == {
        "train": {"cat": 4, "dog": 5}, "val": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 1},
    }  # fmt: skip
    assert manifest.fingerprint == local.fingerprint  # paths are relative to the prefix
