"""The compact JPEG format, its shards streamed from S3 (a moto server on loopback) through the
bounded local cache, and the sample order of streamed and local splits."""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from thaw import storage
from thaw.data.prepare import prepare_dataset
from thaw.data.prepared import ImageSplit, PreparedDataset, open_prepared
from thaw.data.remote_shards import (
    READ_AHEAD_SHARDS,
    SHUFFLE_WINDOW_SHARDS,
    CachedShards,
    minimum_cache_bytes,
)
from thaw.errors import ThawError
from thaw.training.distributed import share

SIZE = 32
CONFIG = {"input_size": (3, SIZE, SIZE), "mean": [0.5] * 3, "std": [0.5] * 3,
          "interpolation": "bicubic"}  # fmt: skip
SHARD_SIZE = 4
# JPEG at quality 90 of these photo-like images: mean absolute error per pixel vs raw.
MAX_MEAN_ERROR = 3 / 255


def photo_like(rng: np.random.Generator, width: int = 48, height: int = 40) -> Image.Image:
    """Smooth colour fields with a little noise: compresses like a photo, unlike pure noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    slope = rng.uniform(-2, 2, (3, 2))
    base = rng.uniform(40, 200, 3)
    blobs = np.asarray(Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
                       .resize((width, height), Image.Resampling.BICUBIC), np.float32)  # fmt: skip
    pixels = 0.5 * blobs + base + np.stack([s[0] * x + s[1] * y for s in slope], axis=-1)
    pixels += rng.normal(0, 3, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    for cls, count in (("cat", 20), ("dog", 16), ("fox", 12)):
        (root / cls).mkdir()
        for i in range(count):
            photo_like(rng).save(root / cls / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def raw(source: Path, tmp_path_factory) -> PreparedDataset:
    out = tmp_path_factory.mktemp("raw") / "p"
    prepare_dataset(str(source), out, data_config=CONFIG, shard_size=SHARD_SIZE)
    return open_prepared(out)


@pytest.fixture(scope="module")
def jpeg(source: Path, tmp_path_factory) -> PreparedDataset:
    out = tmp_path_factory.mktemp("jpeg") / "p"
    prepare_dataset(str(source), out, data_config=CONFIG, shard_size=SHARD_SIZE,
                    image_format="jpeg")  # fmt: skip
    return open_prepared(out)


@pytest.fixture
def streamed(source: Path, s3_bucket: str, tmp_path: Path) -> Path:
    """The source prepared as JPEG with its shards at an S3 prefix; the folder's path."""
    out = tmp_path / "streamed"
    prepare_dataset(str(source), out, data_config=CONFIG, shard_size=SHARD_SIZE,
                    image_format="jpeg", shard_uri=f"{s3_bucket}/shards")  # fmt: skip
    return out


def folder_bytes(path: Path) -> int:
    """Bytes of shards and downloads in a cache (lock files hold no data: a fetch's lock file
    is sparse, its length the fetch's reservation). The read-ahead threads evict while this
    counts: a file gone between the listing and its stat holds no bytes any more."""
    total = 0
    for entry in os.scandir(path):
        if entry.name.endswith(".lock"):
            continue
        try:
            total += entry.stat().st_size if entry.is_file() else 0
        except FileNotFoundError:
            continue
    return total


def cache_minimum(data: PreparedDataset) -> int:
    return minimum_cache_bytes(info.size for info in data.shards.shards.values())


def incomplete_files(cache: Path) -> list[str]:
    """Hidden files in a cache other than lock files: downloads left behind."""
    return [p.name for p in cache.iterdir()
            if p.name.startswith(".") and not p.name.endswith(".lock")]


def largest_shard(data: PreparedDataset) -> int:
    return max(info.size for info in data.shards.shards.values())


def test_jpeg_round_trips_within_tolerance_in_the_same_order(raw, jpeg) -> None:
    assert jpeg.manifest.image_format == "jpeg" and not jpeg.streamed
    assert jpeg.manifest.counts == raw.manifest.counts
    assert jpeg.manifest.fingerprint == raw.manifest.fingerprint
    for split in ("train", "val", "test"):
        assert np.array_equal(jpeg.labels(split), raw.labels(split))
        exact, compact = raw.images(split).astype(np.int16), jpeg.images(split).astype(np.int16)
        assert compact.shape == exact.shape
        error = np.abs(compact - exact)
        assert error.mean() < MAX_MEAN_ERROR * 255, split
        # Same order: each image is closest to the raw image at its own index.
        per_pair = np.abs(compact[:, None] - exact[None]).mean(axis=(2, 3, 4))
        assert (per_pair.argmin(axis=1) == np.arange(len(exact))).all()
    sample = ImageSplit(jpeg, "train")
    image, label = sample[len(sample) - 1]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
    assert label == int(raw.labels("train")[-1])
    jpeg_bytes = sum((jpeg.root / n).stat().st_size for n in jpeg.manifest.shard_sha256)
    raw_bytes = sum(p.stat().st_size for p in raw.root.glob("images-*.npy"))
    assert jpeg_bytes < raw_bytes / 3


def test_jpeg_shards_hold_every_class(jpeg) -> None:
    """Image i is in shard i mod S, so each shard of a class-sorted split mixes classes."""
    index, labels = jpeg.index("train"), jpeg.labels("train")
    count = len(jpeg.manifest.shards["train"])
    assert (index[:, 0] == np.arange(len(index)) % count).all()
    for number in range(count):
        assert len(set(labels[index[:, 0] == number].tolist())) >= 2


def test_raw_manifest_is_unchanged_and_old_manifests_open(raw) -> None:
    written = json.loads((raw.root / "manifest.json").read_text())
    assert not {"image_format", "shard_location", "shard_sha256"} & written.keys()
    assert raw.manifest.image_format == "raw"


def test_local_order_is_todays_randperm(raw, jpeg) -> None:
    for data in (raw, jpeg):
        split = ImageSplit(data, "train")
        expected = torch.randperm(
            len(split), generator=torch.Generator().manual_seed(3 * 100_003 + 2)).tolist()
        assert split.epoch_order(3, 2) == expected
    assert ImageSplit(raw, "train").storage_order() == list(range(len(expected)))


def test_streamed_split_reads_the_same_samples_as_local(streamed, jpeg, s3_bucket, tmp_path):
    assert not list(streamed.glob("*.jpgs"))  # only the manifest, report, index and labels
    data = open_prepared(streamed, cache_dir=tmp_path / "cache")
    location = data.manifest.shard_location
    assert data.streamed
    assert location == f"{s3_bucket}/shards/{data.manifest.content_key()}/"
    assert data.manifest.content_key() == jpeg.manifest.content_key()
    report = (streamed / "validation_report.md").read_text()
    assert f"stored as JPEG (quality 90) in 13 shards at `{location}`" in report
    for split in ("train", "val", "test"):
        assert np.array_equal(data.images(split), jpeg.images(split))
        assert np.array_equal(data.labels(split), jpeg.labels(split))
    remote, local = ImageSplit(data, "train"), ImageSplit(jpeg, "train")
    for index in (0, 5, len(local) - 1):
        assert torch.equal(remote[index][0], local[index][0])
        assert remote[index][1] == local[index][1]
    # Preparing the same data again reuses the content-addressed prefix.
    before = storage.list_s3_objects(location)
    again = prepare_dataset(str(jpeg.manifest.source), tmp_path / "again", data_config=CONFIG,
                            shard_size=SHARD_SIZE, image_format="jpeg",
                            shard_uri=f"{s3_bucket}/shards")  # fmt: skip
    assert again.shard_location == location and storage.list_s3_objects(location) == before


def test_streamed_order_is_fixed_by_seed_and_epoch_and_shard_aware(streamed, tmp_path) -> None:
    first = ImageSplit(open_prepared(streamed, cache_dir=tmp_path / "a"), "train")
    resumed = ImageSplit(open_prepared(streamed, cache_dir=tmp_path / "b"), "train")
    order = first.epoch_order(5, 1)
    assert order == resumed.epoch_order(5, 1)  # fresh readers, empty caches
    assert sorted(order) == list(range(len(first)))
    assert order != first.epoch_order(5, 2) and order != first.epoch_order(6, 1)
    shard_of = first.reader.index[:, 0]
    # Shards are read window by window: group them by first appearance, W at a time; the
    # order never goes back to an earlier window.
    first_seen = list(dict.fromkeys(shard_of[order].tolist()))
    window_of = {shard: n // SHUFFLE_WINDOW_SHARDS for n, shard in enumerate(first_seen)}
    windows = [window_of[shard] for shard in shard_of[order].tolist()]
    assert windows == sorted(windows) and windows[-1] >= 1
    # Evaluation order: each shard's images together.
    assert [shard_of[i] for i in first.storage_order()] == sorted(shard_of.tolist())


def test_an_epoch_never_holds_more_than_the_cache_bound(streamed, tmp_path) -> None:
    cache = tmp_path / "cache"
    probe = open_prepared(streamed, cache_dir=tmp_path / "probe")
    bound = cache_minimum(probe)
    data = open_prepared(streamed, cache_dir=cache, cache_bytes=bound)
    split = ImageSplit(data, "train")
    total = sum(data.shards.shards[name].size for name in data.manifest.shards["train"])
    assert total > bound + largest_shard(data)  # the split does not fit
    fetched, peak = set(), 0
    for index in split.epoch_order(0, 0):
        split[index]
        peak = max(peak, folder_bytes(cache))
        fetched |= {(e.name, e.inode()) for e in os.scandir(cache) if e.name in data.shards.shards}
    assert peak <= bound + largest_shard(data)
    # The shard-aware order needs each shard once per epoch.
    assert len(fetched) == len(data.manifest.shards["train"])


def test_dataloader_workers_stream_an_epoch(streamed, jpeg, tmp_path) -> None:
    data = open_prepared(streamed, cache_dir=tmp_path / "cache")
    split, local = ImageSplit(data, "train"), ImageSplit(jpeg, "train")
    order = split.epoch_order(1, 0)
    loader = DataLoader(split, batch_size=8, sampler=order, num_workers=2)
    images, labels = map(torch.cat, zip(*loader, strict=True))
    assert torch.equal(labels, torch.tensor([local[i][1] for i in order]))
    assert torch.equal(images, torch.stack([local[i][0] for i in order]))


def test_a_shard_being_read_is_never_evicted(streamed, tmp_path) -> None:
    data = open_prepared(streamed, cache_dir=tmp_path / "probe")
    infos, fitting = data.shards.shards, SHUFFLE_WINDOW_SHARDS + READ_AHEAD_SHARDS
    cache = CachedShards(data.manifest.shard_location, infos, tmp_path / "cache",
                         cache_minimum(data))
    names = data.manifest.shards["train"]
    assert len(names) > fitting + 1
    cache.read(names[0], 0, 2)
    held = os.open(tmp_path / "cache" / names[0], os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_SH)  # a reader in the middle of a read
        for name in names[1:fitting + 1]:
            cache.read(name, 0, 2)
        assert (tmp_path / "cache" / names[0]).exists()
    finally:
        os.close(held)
    cache.read(names[fitting + 1], 0, 2)
    assert not (tmp_path / "cache" / names[0]).exists()  # released: now evicted first


def _read_first_image(streamed: str, cache: str, barrier, results) -> None:
    split = ImageSplit(open_prepared(streamed, cache_dir=cache), "train")
    barrier.wait()  # both processes ask for the shard at the same moment
    results.put(hashlib.sha256(split[0][0].numpy().tobytes()).hexdigest())


def test_two_processes_fetching_one_shard_share_one_complete_copy(streamed, jpeg, tmp_path):
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    readers = [context.Process(target=_read_first_image,
                               args=(str(streamed), str(cache), barrier, results))
               for _ in range(2)]
    for reader in readers:
        reader.start()
    digests = {results.get(timeout=120) for _ in readers}
    for reader in readers:
        reader.join(timeout=60)
        assert reader.exitcode == 0
    expected = hashlib.sha256(ImageSplit(jpeg, "train")[0][0].numpy().tobytes()).hexdigest()
    assert digests == {expected}
    assert "images-train-00000.jpgs" in {p.name for p in cache.iterdir()}
    assert not incomplete_files(cache)


def test_missing_or_corrupt_remote_shards_are_clear_errors(streamed, tmp_path) -> None:
    data = open_prepared(streamed, cache_dir=tmp_path / "cache")
    bucket, prefix = storage.split_s3_uri(data.manifest.shard_location)
    client = storage.s3_client()
    names = data.manifest.shards["train"]
    client.delete_object(Bucket=bucket, Key=prefix + names[0])
    size = data.shards.shards[names[1]].size
    client.put_object(Bucket=bucket, Key=prefix + names[1], Body=b"\xff" * size)
    split = ImageSplit(data, "train")
    with pytest.raises(ThawError, match=rf"shard {names[0]} .* could not be read .* prepare "
                                        "the dataset again"):  # fmt: skip
        split[0]
    with pytest.raises(ThawError, match=rf"shard {names[1]} .*corrupt"):
        split[1]
    assert not {names[0], names[1]} & {p.name for p in (tmp_path / "cache").iterdir()}
    # the failed fetches left nothing behind (read-ahead of later shards may still be running)
    assert not [f for f in incomplete_files(tmp_path / "cache") if names[0] in f or names[1] in f]


def test_bad_format_settings_are_refused(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ThawError, match="image_format 'png' is not known"):
        prepare_dataset(str(source), tmp_path / "a", data_config=CONFIG, image_format="png")
    with pytest.raises(ThawError, match="shard_uri=.* needs image_format='jpeg'"):
        prepare_dataset(str(source), tmp_path / "b", data_config=CONFIG,
                        shard_uri="s3://bucket/shards")  # fmt: skip
    with pytest.raises(ThawError, match="shard_uri=.* an s3://bucket/prefix URI"):
        prepare_dataset(str(source), tmp_path / "c", data_config=CONFIG, image_format="jpeg",
                        shard_uri="/local/shards")  # fmt: skip
    assert not any(tmp_path.iterdir())


class HeldShards(CachedShards):
    """A cache whose fetch of ``held`` stops, after the download and under that shard's
    lock, until ``release`` is set: a slow download made certain, without timing."""

    def __init__(self, *args, held: str, inside, release) -> None:
        super().__init__(*args)
        self.held, self.inside, self.release = held, inside, release

    def _check(self, name: str, path: Path) -> None:
        super()._check(name, path)
        if name == self.held:
            self.inside.set()
            self.release.wait()


def _fetch_held(location, infos, cache, bound, name, inside, release) -> None:
    HeldShards(location, infos, Path(cache), bound, held=name, inside=inside,
               release=release).read(name, 0, 2)


def test_a_slow_fetch_does_not_hold_up_reads_or_fetches_of_other_shards(streamed, tmp_path):
    data = open_prepared(streamed, cache_dir=tmp_path / "probe")
    location, infos = data.manifest.shard_location, data.shards.shards
    slow, cached, other = data.manifest.shards["train"][:3]
    cache = CachedShards(location, infos, tmp_path / "cache", cache_minimum(data))
    expected = cache.read(cached, 0, 16)
    context = multiprocessing.get_context("spawn")
    inside, release = context.Event(), context.Event()
    fetcher = context.Process(target=_fetch_held, args=(
        location, infos, str(tmp_path / "cache"), cache_minimum(data), slow, inside, release))
    fetcher.start()
    try:
        assert inside.wait(timeout=120)  # the other process is inside its fetch of `slow`
        done = threading.Event()
        reads = {}

        def read_others() -> None:
            reads[cached] = cache.read(cached, 0, 16)
            reads[other] = cache.read(other, 0, 16)  # fetched while `slow` still is
            done.set()

        threading.Thread(target=read_others, daemon=True).start()
        # no timing: a reader serialised behind the held fetch never gets here
        assert done.wait(timeout=120), "reads of other shards waited for the held fetch"
        assert not (tmp_path / "cache" / slow).exists()
        assert reads == {cached: expected, other: data.shards.read(other, 0, 16)}
    finally:
        release.set()
        fetcher.join(timeout=120)
    assert fetcher.exitcode == 0 and (tmp_path / "cache" / slow).exists()


class RecordingShards(CachedShards):
    """Records the shards asked for by reads, and signals each fetch that completes."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.asked: list[str] = []
        self.fetched: dict[str, threading.Event] = {}

    def read(self, name: str, offset: int, length: int) -> bytes:
        self.asked.append(name)
        return super().read(name, offset, length)

    def _fetch(self, name: str) -> None:
        super()._fetch(name)
        self.fetched.setdefault(name, threading.Event()).set()


def test_the_next_shards_of_the_order_are_fetched_before_they_are_asked(streamed, tmp_path):
    data = open_prepared(streamed, cache_dir=tmp_path / "probe")
    data.shards = RecordingShards(data.manifest.shard_location, data.shards.shards,
                                  tmp_path / "cache", cache_minimum(data))
    split = ImageSplit(data, "train")
    order = split.epoch_order(4, 0)
    names = data.manifest.shards["train"]
    first = int(split.reader.index[order[0], 0])
    ahead = [names[s] for s in split.reader.next[first].tolist()]
    for name in ahead:
        data.shards.fetched.setdefault(name, threading.Event())
    split[order[0]]
    assert data.shards.asked == [names[first]]
    for name in ahead:
        assert data.shards.fetched[name].wait(timeout=120), f"{name} was not read ahead"
        assert (tmp_path / "cache" / name).exists()
    assert data.shards.asked == [names[first]]  # nothing asked for them
    # what was read ahead is what the order reads next: its first window and the next
    shard_of = split.reader.index[:, 0]
    first_seen = list(dict.fromkeys(shard_of[order].tolist()))
    assert len(ahead) == READ_AHEAD_SHARDS
    assert {names.index(n) for n in ahead} <= set(first_seen[:2 * SHUFFLE_WINDOW_SHARDS])


def test_a_cache_smaller_than_a_window_and_its_read_ahead_is_refused(streamed, tmp_path):
    minimum = cache_minimum(open_prepared(streamed, cache_dir=tmp_path / "probe"))
    assert minimum > (SHUFFLE_WINDOW_SHARDS + READ_AHEAD_SHARDS - 1) * largest_shard(
        open_prepared(streamed, cache_dir=tmp_path / "probe"))
    with pytest.raises(ThawError, match=rf"THAW_SHARD_CACHE_BYTES to at least {minimum}\b"):
        open_prepared(streamed, cache_dir=tmp_path / "small", cache_bytes=minimum - 1)
    assert open_prepared(streamed, cache_dir=tmp_path / "ok", cache_bytes=minimum).streamed


def test_exclusive_locks_are_taken_on_descriptors_open_for_writing(streamed, tmp_path,
                                                                  monkeypatch):
    """Linux man-pages flock(2), "NFS details": on NFS flock is emulated with fcntl byte-range
    locks, and "in order to place an exclusive lock, the file must be opened for writing"
    (else EBADF). The shard's shared read lock needs read access only."""
    real_flock, taken = fcntl.flock, []

    def flock(fd: int, operation: int) -> None:
        if operation & fcntl.LOCK_EX:
            taken.append(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    data = open_prepared(streamed, cache_dir=tmp_path / "cache",
                         cache_bytes=cache_minimum(open_prepared(streamed,
                                                                 cache_dir=tmp_path / "p")))
    for name in data.manifest.shards["train"]:  # more than fit: evictions too
        data.shards.read(name, 0, 2)
    evictions = len(data.manifest.shards["train"]) - len(list((tmp_path / "cache").glob("*.jpgs")))
    assert evictions > 0 and taken
    assert set(taken) == {os.O_RDWR}


def test_ranks_read_different_shards_of_one_global_order(streamed, tmp_path) -> None:
    split = ImageSplit(open_prepared(streamed, cache_dir=tmp_path / "cache"), "train")
    shard_of = split.reader.index[:, 0]
    world, batch = 3, 2
    order = split.epoch_order(7, 1, readers=world, global_batch=world * batch)
    assert sorted(order) == list(range(len(split)))
    assert split.epoch_order(7, 1) == split.epoch_order(7, 1, readers=1)
    read_by = [set() for _ in range(world)]
    for start in range(0, len(order), world * batch):
        step = order[start:start + world * batch]
        for rank in range(world):
            begin, stop = share(len(step), world, rank)
            read_by[rank] |= set(shard_of[step[begin:stop]].tolist())
    # each rank a contiguous run of the shards: neighbours share at most the shard between
    for rank in range(world):
        for other in range(rank + 1, world):
            assert len(read_by[rank] & read_by[other]) <= (1 if other == rank + 1 else 0)
    assert sum(map(len, read_by)) <= len(split.reader.names) + world - 1
