"""JPEG shards read from the prepared folder or streamed from S3 through a bounded local cache.

Why a KFP step needs this: KFP v2's launcher copies every input artifact in full to local
disk before the step's code starts (``downloadArtifacts`` in kubeflow/pipelines
``backend/src/v2/component/launcher_v2.go``). A prepared dataset whose shards live at an S3
prefix named by its manifest is an artifact of a few MB (manifest, report, index, labels);
the training step then fetches shards on demand.

Remote layout: ``<shard_uri>/<key>/images-<split>-NNNNN.jpgs`` where ``key`` is the digest of
the manifest without its location (`Manifest.content_key`: the source fingerprint, split,
preprocessing and every shard's sha256), so preparing the same data twice uploads nothing
new and two different preparations never share a prefix.

The cache (one folder per dataset key) holds whole shards, at most ``cache_bytes`` of them:

- a shard is fetched under an exclusive ``flock`` of the folder's ``.lock``, so processes
  sharing the folder (DataLoader workers, several steps on one node) fetch one shard at a
  time and never the same one twice; it is downloaded to a hidden name, checked against
  the manifest's size and sha256, then renamed into place: a reader never sees a part;
- before a fetch, least recently read shards are deleted until the new one fits; a read
  holds a shared ``flock`` on its shard for the read's duration and eviction takes a
  non-blocking exclusive one, so a shard being read is never deleted (such a shard is
  skipped, and may leave the cache above its bound until the read ends).

Why not mosaicml-streaming, litdata or webdataset (weighed 2026-11): mosaicml-streaming
0.13 pins numpy<2.2 (thaw has numpy 2.4) and 0.10 pulls ~80 packages (Azure, GCS, OCI,
transformers); it shards the epoch across ranks and workers itself from its own
shared-memory state, which does not fit thaw's loop slicing one global order. litdata
(obstore, lightning-utilities) is an IterableDataset whose order depends on world size and
worker count, and which warns that caches below 25 GB thrash (peak cache is workers x
pre-downloads x 64 MB chunks). webdataset is light but a stream
without random access or mid-epoch resume, and its cache evicts by age without regard for
files being read and never bounds a fetch in progress. What thaw needs is a map-style
dataset (the loop owns the order) plus a bounded shard cache: about 200 lines here.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from thaw import storage
from thaw.data.shards import file_sha256
from thaw.errors import ThawError

CACHE_DIR_ENV = "THAW_SHARD_CACHE"
CACHE_BYTES_ENV = "THAW_SHARD_CACHE_BYTES"  # the bound, where the pod's disk is smaller
DEFAULT_CACHE_BYTES = 4 << 30  # 400 shards of ~10 MB (2048 images at 224 px)


def default_cache_bytes() -> int:
    """``$THAW_SHARD_CACHE_BYTES``, else ``DEFAULT_CACHE_BYTES``."""
    value = os.environ.get(CACHE_BYTES_ENV, "").strip()
    if not value:
        return DEFAULT_CACHE_BYTES
    if not value.isdigit():
        raise ThawError(f"{CACHE_BYTES_ENV}={value!r} must be a whole number of bytes")
    return int(value)
_LOCK_NAME = ".lock"
_INCOMING_PREFIX = ".incoming-"
_UPLOAD_THREADS = 8


def shard_prefix(shard_uri: str, key: str) -> str:
    """Where the shards of the dataset with content key ``key`` live under ``shard_uri``."""
    storage.split_s3_uri(shard_uri)  # a clear error for a malformed URI
    return f"{shard_uri.rstrip('/')}/{key}/"


def publish_shards(directory: Path, names: list[str], location: str) -> None:
    """Upload the shard files ``names`` from ``directory`` to ``location`` (a prefix ending
    in ``/``), skipping those already there (the prefix is content-addressed)."""
    present = {key.rsplit("/", 1)[-1] for key in storage.list_s3_objects(location)}
    missing = [name for name in names if name not in present]
    with ThreadPoolExecutor(_UPLOAD_THREADS) as pool:
        for done in [pool.submit(storage.upload_file, directory / name, location + name)
                     for name in missing]:
            done.result()


class LocalShards:
    """Shards inside the prepared folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def read(self, name: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self.root / name, os.O_RDONLY)
        except FileNotFoundError:
            raise ThawError(f"not a prepared dataset: {self.root} is missing shard {name}; "
                            "prepare the dataset again") from None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class ShardInfo:
    size: int
    sha256: str


class CachedShards:
    """Shards at an S3 prefix, fetched on demand into ``cache_dir``, at most ``cache_bytes``
    of them (see the module docstring). Picklable: DataLoader workers share the folder."""

    def __init__(self, location: str, shards: dict[str, ShardInfo], cache_dir: Path,
                 cache_bytes: int) -> None:
        if shards and cache_bytes < (largest := max(info.size for info in shards.values())):
            raise ThawError(
                f"cache_bytes={cache_bytes:,} cannot hold one shard of {location} (the largest "
                f"is {largest:,} bytes); give the shard cache at least a few shards, e.g. "
                f"cache_bytes={8 * largest:,}")
        self.location = location
        self.shards = shards
        self.cache_dir = Path(cache_dir)
        self.cache_bytes = cache_bytes
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def read(self, name: str, offset: int, length: int) -> bytes:
        path = self.cache_dir / name
        while True:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                self._fetch(name)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # held until close: no eviction meanwhile
                if os.fstat(fd).st_nlink == 0:  # evicted between open and lock
                    continue
                os.utime(fd)  # most recently used
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)

    def _fetch(self, name: str) -> None:
        with _locked(self.cache_dir / _LOCK_NAME):
            if (self.cache_dir / name).exists():  # fetched by another process meanwhile
                return
            self._clear_incoming()
            self._make_room(self.shards[name].size)
            incoming = self.cache_dir / f"{_INCOMING_PREFIX}{name}"
            try:
                storage.download_file(self.location + name, incoming)
                self._check(name, incoming)
                os.replace(incoming, self.cache_dir / name)
            except storage.Unreachable:
                raise
            except ThawError as err:
                raise ThawError(
                    f"shard {name} of the prepared dataset could not be read from "
                    f"{self.location} ({err}); the shards were moved or deleted: prepare the "
                    "dataset again, or restore that prefix") from err
            finally:
                incoming.unlink(missing_ok=True)

    def _check(self, name: str, path: Path) -> None:
        expected = self.shards[name]
        size = path.stat().st_size
        if size != expected.size or file_sha256(path) != expected.sha256:
            raise ThawError(f"it is corrupt ({size:,} bytes, expected {expected.size:,} "
                            f"with sha256 {expected.sha256[:12]}...)")

    def _clear_incoming(self) -> None:
        """Remove downloads a crashed process left (none can be running: we hold the lock)."""
        for entry in os.scandir(self.cache_dir):
            if entry.name.startswith(_INCOMING_PREFIX) or entry.name.endswith(".part"):
                Path(entry.path).unlink(missing_ok=True)

    def _make_room(self, incoming: int) -> None:
        """Delete least recently read shards not being read until ``incoming`` bytes fit."""
        cached = []
        for entry in os.scandir(self.cache_dir):
            if entry.name in self.shards:
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                cached.append((stat.st_mtime_ns, stat.st_size, entry.path))
        total = sum(size for _, size, _ in cached)
        for _, size, path in sorted(cached):
            if total + incoming <= self.cache_bytes:
                return
            if _evict(Path(path)):
                total -= size


def _evict(path: Path) -> bool:
    """Delete ``path`` unless a reader holds it; whether it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # being read
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for a ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def default_cache_dir(location: str) -> Path:
    """``$THAW_SHARD_CACHE/<key>``, or the system temporary folder's ``thaw-shards/<key>``."""
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "thaw-shards")
    return Path(root) / location.rstrip("/").rsplit("/", 1)[-1]
