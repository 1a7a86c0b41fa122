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

The cache (one folder per dataset key) holds whole shards, at most ``cache_bytes`` of them,
shared by every process of a node that reads the dataset (DataLoader workers, ranks):

- a shard is fetched under an exclusive ``flock`` of its own lock file ``.<shard>.lock``, so
  no shard is fetched twice at once while other shards are fetched and cached shards read
  meanwhile; it is downloaded to a hidden name, checked against the manifest's size and
  sha256, then renamed into place: a reader never sees a part;
- before a fetch, under the folder's ``.lock`` (held only to count and evict, never during a
  download), least recently read shards are deleted until the new one fits, counting the
  shards other fetches are bringing in (each fetch reserves its size as the length of its
  sparse lock file until it ends); a read holds a shared ``flock`` on its shard for the
  read's duration and eviction takes a non-blocking exclusive one, so a shard being read is
  never deleted (such a shard is skipped, and may leave the cache above its bound until the
  read ends);
- reading a shard starts fetching the `READ_AHEAD_SHARDS` that the reader's order names
  next (`CachedShards.prefetch`) in a background thread of the reading process;
- the cache must hold a reader's window (`SHUFFLE_WINDOW_SHARDS`, see `stream_order`) and
  its read-ahead, else windows evict each other and every shard is fetched many times: a
  smaller cache is refused (`minimum_cache_bytes`);
- every lock file is opened for writing: on NFS, Linux emulates ``flock`` with ``fcntl``
  byte-range locks, for which "in order to place an exclusive lock, the file must be opened
  for writing" (Linux man-pages, flock(2), "NFS details"; else ``EBADF``); and as ``fcntl``
  locks belong to the process, the threads of one process also take an in-process lock.

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
import queue
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thaw import storage
from thaw.data.shards import file_sha256
from thaw.errors import ThawError

CACHE_DIR_ENV = "THAW_SHARD_CACHE"
CACHE_BYTES_ENV = "THAW_SHARD_CACHE_BYTES"  # the bound, where the pod's disk is smaller
DEFAULT_CACHE_BYTES = 4 << 30  # 400 shards of ~10 MB (2048 images at 224 px)
# Shards of a streamed split that a reader's order shuffles together (see `stream_order`).
SHUFFLE_WINDOW_SHARDS = 4
# Shards fetched in the background ahead of the one being read (see `CachedShards.prefetch`).
READ_AHEAD_SHARDS = 2


def default_cache_bytes() -> int:
    """``$THAW_SHARD_CACHE_BYTES``, else ``DEFAULT_CACHE_BYTES``."""
    value = os.environ.get(CACHE_BYTES_ENV, "").strip()
    if not value:
        return DEFAULT_CACHE_BYTES
    if not value.isdigit():
        raise ThawError(f"{CACHE_BYTES_ENV}={value!r} must be a whole number of bytes")
    return int(value)


def minimum_cache_bytes(shard_sizes: Iterable[int]) -> int:
    """The smallest cache one reader can stream shards of these sizes through: its window
    and its read-ahead, of the largest shards."""
    largest = sorted(shard_sizes, reverse=True)
    return sum(largest[:SHUFFLE_WINDOW_SHARDS + READ_AHEAD_SHARDS])


_SPACE_LOCK_NAME = ".lock"
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


def stream_order(members: Sequence[np.ndarray], shard_order: Sequence[int],
                 shuffle: Callable[[int], np.ndarray], *, readers: int = 1,
                 global_batch: int = 0) -> list[int]:
    """A streamed split's sample order: the shards in ``shard_order`` (``members[s]``: the
    samples of shard s), cut into one contiguous run per reader, each reader's run taken
    `SHUFFLE_WINDOW_SHARDS` shards at a time and each window's samples permuted by
    ``shuffle(n)`` (mosaicml-streaming's py1b): a reader needs only its window's shards in
    its cache, and each window holds every class (`thaw.data.shards`).

    ``readers`` > 1: the order is cut into global batches of ``global_batch`` samples, each
    cut into ``readers`` contiguous parts as ``np.array_split`` does
    (`thaw.training.distributed.share`); part r of every batch comes from reader r's run, so
    ranks read different shards, and ranks on different nodes fetch different shards. Any
    other cut of the same order still reads every sample once, only less locally."""
    if readers > 1 and global_batch < 1:
        raise ValueError(f"{readers} readers need a global batch size, got {global_batch}")
    samples = np.concatenate([members[s] for s in shard_order]) if len(shard_order) else []
    shard_of = np.concatenate([np.full(len(members[s]), s) for s in shard_order]
                              ) if len(shard_order) else []
    reader_at = _reader_at(len(samples), readers, global_batch)
    order = np.empty(len(samples), dtype=np.int64)
    start = 0
    for reader in range(readers):
        positions = reader_at == reader
        stop = start + int(positions.sum())
        order[positions] = _window_shuffled(samples[start:stop], shard_of[start:stop], shuffle)
        start = stop
    return order.tolist()


def _reader_at(size: int, readers: int, global_batch: int) -> np.ndarray:
    """Which reader reads each position of an order of ``size`` samples (see `stream_order`)."""
    if readers == 1:
        return np.zeros(size, dtype=np.int64)
    parts = []
    for start in range(0, size, global_batch):
        base, extra = divmod(min(global_batch, size - start), readers)
        parts.append(np.repeat(np.arange(readers), base + (np.arange(readers) < extra)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _window_shuffled(samples: np.ndarray, shard_of: np.ndarray,
                     shuffle: Callable[[int], np.ndarray]) -> np.ndarray:
    """``samples`` (grouped by shard) permuted within windows of `SHUFFLE_WINDOW_SHARDS`
    consecutive shards."""
    runs = np.concatenate([[0], np.flatnonzero(np.diff(shard_of)) + 1, [len(samples)]])
    bounds = [*runs[:-1][::SHUFFLE_WINDOW_SHARDS], len(samples)]
    windows = [samples[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    return np.concatenate([w[shuffle(len(w))] for w in windows]) if windows else np.zeros(0)


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

    def prefetch(self, names: Iterable[str]) -> None:
        """Nothing to fetch: the shards are in the folder."""


@dataclass(frozen=True)
class ShardInfo:
    size: int
    sha256: str


class CachedShards:
    """Shards at an S3 prefix, fetched on demand into ``cache_dir``, at most ``cache_bytes``
    of them (see the module docstring). Picklable: DataLoader workers share the folder, each
    process with its own read-ahead thread."""

    def __init__(self, location: str, shards: dict[str, ShardInfo], cache_dir: Path,
                 cache_bytes: int) -> None:
        minimum = minimum_cache_bytes(info.size for info in shards.values())
        if cache_bytes < minimum:
            raise ThawError(
                f"the shard cache of {cache_bytes:,} bytes cannot hold what a reader of "
                f"{location} reads at once: {SHUFFLE_WINDOW_SHARDS} shards shuffled together "
                f"and {READ_AHEAD_SHARDS} read ahead need {minimum:,} bytes; set "
                f"{CACHE_BYTES_ENV} to at least {minimum} (times the ranks on a node that "
                "share the cache)")
        self.location = location
        self.shards = shards
        self.cache_dir = Path(cache_dir)
        self.cache_bytes = cache_bytes
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._process: _ProcessFetches | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_process": None}  # threads and locks stay in this process

    def read(self, name: str, offset: int, length: int) -> bytes:
        path = self.cache_dir / name
        while True:
            try:
                fd = os.open(path, os.O_RDONLY)  # a shared lock needs only read access
            except FileNotFoundError:
                self._fetch(name)  # waits for this process's read-ahead of it, if any
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # held until close: no eviction meanwhile
                if os.fstat(fd).st_nlink == 0:  # evicted between open and lock
                    continue
                os.utime(fd)  # most recently used
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)

    def prefetch(self, names: Iterable[str]) -> None:
        """Start fetching the shards ``names`` (those not cached or on their way) in this
        process's background threads; a failure shows when the shard is read."""
        for name in names:
            if not (self.cache_dir / name).exists():
                self._fetches().start(name)

    def _fetches(self) -> _ProcessFetches:
        if self._process is None or self._process.pid != os.getpid():  # new, or forked
            self._process = _ProcessFetches(self._fetch)
        return self._process

    def _fetch(self, name: str) -> None:
        with self._fetches().lock(name), _locked(self._lock_path(name)) as lock_fd:
            if (self.cache_dir / name).exists():  # fetched by another process meanwhile
                return
            incoming = self.cache_dir / f"{_INCOMING_PREFIX}{name}"
            self._clear_leftovers(incoming)
            os.ftruncate(lock_fd, 0)  # a crashed fetch's reservation
            try:
                with _locked(self.cache_dir / _SPACE_LOCK_NAME):
                    self._make_room(self.shards[name].size)
                    os.ftruncate(lock_fd, self.shards[name].size)  # reserved (sparse)
                storage.download_file(self.location + name, incoming)
                self._check(name, incoming)
                _mark_unread(incoming)
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
                os.ftruncate(lock_fd, 0)

    def _lock_path(self, name: str) -> Path:
        return self.cache_dir / f".{name}.lock"

    def _check(self, name: str, path: Path) -> None:
        expected = self.shards[name]
        size = path.stat().st_size
        if size != expected.size or file_sha256(path) != expected.sha256:
            raise ThawError(f"it is corrupt ({size:,} bytes, expected {expected.size:,} "
                            f"with sha256 {expected.sha256[:12]}...)")

    def _clear_leftovers(self, incoming: Path) -> None:
        """Remove what a crashed fetch of this shard left (none is running: we hold its
        lock): its incoming file and `storage.download_file`'s hidden part beside it."""
        incoming.unlink(missing_ok=True)
        for entry in os.scandir(self.cache_dir):
            if entry.name.startswith(f".{incoming.name}.") and entry.name.endswith(".part"):
                Path(entry.path).unlink(missing_ok=True)

    def _make_room(self, incoming: int) -> None:
        """Delete least recently read shards not being read until ``incoming`` bytes fit
        beside the cached shards and the other fetches' reservations; shards fetched ahead
        and not read yet go last (they were fetched before the reads of the current window
        that make those look newer)."""
        cached, total = [], 0
        for entry in os.scandir(self.cache_dir):
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name in self.shards:
                unread = stat.st_atime_ns < stat.st_mtime_ns
                cached.append((unread, stat.st_mtime_ns, stat.st_size, entry.path))
            if entry.name in self.shards or entry.name.endswith(".lock"):
                total += stat.st_size  # a lock file's length is its fetch's reservation
        for *_, size, path in sorted(cached):
            if total + incoming <= self.cache_bytes:
                return
            if _evict(Path(path)):
                total -= size


class _ProcessFetches:
    """One process's fetches of one cache: an in-process lock per shard (``fcntl`` locks,
    which NFS gives ``flock``, do not exclude the threads of one process) and the read-ahead
    threads. Those are daemons: a process may end in the middle of a read-ahead, whose
    leftovers the next fetch of that shard clears."""

    def __init__(self, fetch: Callable[[str], None]) -> None:
        self.pid = os.getpid()
        self._fetch = fetch
        self._guard = threading.Lock()
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._wanted: set[str] = set()  # queued or being fetched
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks[name]

    def start(self, name: str) -> None:
        """Queue a read-ahead of ``name`` unless one is queued or running."""
        with self._guard:
            if name in self._wanted:
                return
            self._wanted.add(name)
            if not self._threads:
                self._threads = [threading.Thread(target=self._work, name="thaw-read-ahead",
                                                  daemon=True) for _ in range(READ_AHEAD_SHARDS)]
                for thread in self._threads:
                    thread.start()
        self._queue.put(name)

    def _work(self) -> None:
        while True:
            name = self._queue.get()
            try:
                with suppress(Exception):  # best effort: the read of the shard reports it
                    self._fetch(name)
            finally:
                with self._guard:
                    self._wanted.discard(name)


def _mark_unread(path: Path) -> None:
    """Flag a fetched shard as not read yet: access time before its modification time (a
    read sets both to now, see `CachedShards.read`)."""
    os.utime(path, ns=(0, path.stat().st_mtime_ns))


def _evict(path: Path) -> bool:
    """Delete ``path`` unless a reader holds it; whether it is gone."""
    try:
        fd = os.open(path, os.O_RDWR)  # an exclusive lock on NFS needs write access
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
def _locked(path: Path) -> Iterator[int]:
    """An exclusive ``flock`` on ``path`` (created if missing, opened for writing as NFS
    needs) for a ``with`` block; yields the descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def default_cache_dir(location: str) -> Path:
    """``$THAW_SHARD_CACHE/<key>``, or the system temporary folder's ``thaw-shards/<key>``."""
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "thaw-shards")
    return Path(root) / location.rstrip("/").rsplit("/", 1)[-1]
