"""prepare_dataset at scale: no staging copy on disk, one decode per image, same result."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from thaw import storage
from thaw.data import shards
from thaw.data.prepare import prepare_dataset
from thaw.data.prepared import MANIFEST_NAME, open_prepared
from thaw.errors import ThawError
from thaw.storage import Unreachable

SPLITS = ("train", "val", "test")
SHARD = 8  # images per shard: small, so a dataset spans many shards

# Audit hooks cannot be removed: one hook for the session calls whatever is in _ON_OPEN.
_ON_OPEN: list = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _ON_OPEN and isinstance(args[0], str | Path):
        for callback in list(_ON_OPEN):
            callback(Path(args[0]))


sys.addaudithook(_audit)


def folder_bytes(root: Path) -> int:
    """Apparent size of every file under `root` (a memory-mapped shard counts in full as
    soon as it is created)."""
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # deleted while we looked
            total += path.stat().st_size if path.is_file() else 0
    return total


def shard_bytes(out: Path) -> int:
    return max(p.stat().st_size for p in out.glob("images-*.npy"))


@pytest.fixture
def on_open() -> Iterator[list]:
    """Callbacks run on every file this process opens while the test runs."""
    yield _ON_OPEN
    _ON_OPEN.clear()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def prepare_measuring_disk(src: Path, parent: Path, on_open: list, **kwargs) -> tuple[int, int]:
    """Prepare `src` into `parent/out`; returns (peak bytes under `parent`, final size).

    The size under `parent` (temporary output folder included) is taken every time a file
    is opened, i.e. before every shard, label file, manifest and report is written."""
    peak = 0

    def measure(_: Path) -> None:
        nonlocal peak
        peak = max(peak, folder_bytes(parent))

    parent.mkdir()
    on_open.append(measure)
    prepare_dataset(str(src), parent / "out", shard_size=SHARD, **kwargs)
    on_open.remove(measure)
    return max(peak, folder_bytes(parent)), folder_bytes(parent / "out")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_peak_disk_is_the_prepared_size_not_twice(
    make_folder, tmp_path, data_config, on_open, num_workers
) -> None:
    src = make_folder({"cat": 60, "dog": 50, "fox": 40})
    peak, final = prepare_measuring_disk(
        src, tmp_path / "prepared", on_open, data_config=data_config, num_workers=num_workers
    )
    assert final > 100 * 16 * 16 * 3  # the measure saw the images, not only the manifest
    assert peak <= 1.1 * final + 2 * shard_bytes(tmp_path / "prepared" / "out")


def test_peak_disk_stays_low_when_truncated_files_force_a_new_split(
    make_folder, tmp_path, data_config, on_open
) -> None:
    src = make_folder({"cat": 60, "dog": 50, "fox": 40})
    for name in ("cat/img003.png", "dog/img020.png", "fox/img039.png"):
        truncate(src / name)
    peak, final = prepare_measuring_disk(
        src, tmp_path / "prepared", on_open, data_config=data_config
    )
    assert peak <= 1.1 * final + 2 * shard_bytes(tmp_path / "prepared" / "out")
    assert not list((tmp_path / "prepared").glob(".*")), "temporary folders left behind"


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_files_give_the_result_of_a_source_without_them(
    make_folder, tmp_path, data_config, num_workers
) -> None:
    """A file that passes the header check but fails to decode moves the split exactly as
    if it had never been there: same counts, same shards, byte for byte."""
    clean = make_folder({"cat": 40, "dog": 31, "fox": 17}, name="clean")
    dirty = make_folder({}, name="dirty")
    shutil.copytree(clean, dirty, dirs_exist_ok=True)
    for name in ("cat/img000.png", "cat/img017.png", "dog/img030.png", "fox/img005.png"):
        shutil.copy(clean / name, dirty / name.replace("img", "broken"))
        truncate(dirty / name.replace("img", "broken"))
    a = prepare_dataset(str(clean), tmp_path / "a", data_config=data_config, shard_size=SHARD)
    b = prepare_dataset(str(dirty), tmp_path / "b", data_config=data_config, shard_size=SHARD,
                        max_bad_fraction=0.1, num_workers=num_workers)  # fmt: skip
    assert sorted(s["path"] for s in b.skipped) == [
        "cat/broken000.png", "cat/broken017.png", "dog/broken030.png", "fox/broken005.png",
    ]  # fmt: skip
    assert all(s["reason"].startswith("truncated or corrupt") for s in b.skipped)
    assert b.counts == a.counts and b.shards == a.shards
    assert _shards(tmp_path / "b") == _shards(tmp_path / "a")
    open_prepared(tmp_path / "b")


@pytest.mark.parametrize("image_format", ["raw", "jpeg"])
def test_each_file_is_decoded_once_and_header_bad_files_never(
    make_folder, tmp_path, data_config, monkeypatch, image_format
) -> None:
    src = make_folder({"cat": 30, "dog": 30})
    (src / "cat" / "notes.txt").write_text("not an image")
    (src / "dog" / "empty.png").write_bytes(b"")
    decoded: Counter[str] = Counter()
    real = shards.load_record

    def counting(record, **kwargs):
        decoded[record.path] += 1
        return real(record, **kwargs)

    monkeypatch.setattr(shards, "load_record", counting)
    manifest = prepare_dataset(str(src), tmp_path / "clean", data_config=data_config,
                               max_bad_fraction=0.1, image_format=image_format)  # fmt: skip
    assert sum(manifest.split_size(s) for s in SPLITS) == 60
    assert set(decoded) == {f"{c}/img{i:03d}.png" for c in ("cat", "dog") for i in range(30)}
    assert set(decoded.values()) == {1}

    decoded.clear()
    for name in ("cat/img004.png", "dog/img011.png"):
        truncate(src / name)
    dirty = prepare_dataset(str(src), tmp_path / "dirty", data_config=data_config,
                            max_bad_fraction=0.1, image_format=image_format)
    # Rewriting the split without the two truncated files copies from the shards already
    # written: only images that changed split are decoded again, never the whole set.
    assert sum(decoded.values()) <= 60 + 4 * 2
    # ... and the copies are exactly what a fresh preparation without those files writes.
    for name in ("cat/img004.png", "dog/img011.png"):
        (src / name).unlink()
    fresh = prepare_dataset(str(src), tmp_path / "fresh", data_config=data_config,
                            max_bad_fraction=0.1, image_format=image_format)
    assert dirty.shards == fresh.shards and dirty.counts == fresh.counts
    for split in SPLITS:
        assert (open_prepared(tmp_path / "dirty").images(split).tobytes()
                == open_prepared(tmp_path / "fresh").images(split).tobytes())


def test_a_file_changed_between_the_passes_is_an_error(
    make_folder, tmp_path, data_config, on_open
) -> None:
    src = make_folder({"cat": 10, "dog": 10})
    victim = src / "dog" / "img004.png"
    other = (src / "cat" / "img001.png").read_bytes()

    def rewrite_once_writing_starts(path: Path) -> None:
        if path.name.startswith("images-") and victim.read_bytes() != other:
            victim.write_bytes(other)

    on_open.append(rewrite_once_writing_starts)
    out = tmp_path / "out"
    with pytest.raises(ThawError, match=r"dog/img004\.png changed while the dataset was being"):
        prepare_dataset(str(src), out, data_config=data_config)
    assert not out.exists() and not (out / MANIFEST_NAME).exists()


class RecordingProxy:
    """A loopback TCP proxy in front of an HTTP server that records each request line
    (`GET /bucket/key?... HTTP/1.1`) the client sends: the requests as they went out.
    The first `resets` connections are reset on arrival, as by a server restarting."""

    def __init__(self, target: str, resets: int = 0) -> None:
        self.resets = resets
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            if self.resets > 0:
                self.resets -= 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record:  # downloads send no bodies: every request starts a line
                    self.requests += re.findall(r"(?m)^(?:GET|HEAD|PUT|POST) \S+", data.decode(
                        "latin-1"))  # fmt: skip
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_s3_source_is_fetched_with_one_get_per_object_and_no_head(
    make_folder, tmp_path, data_config, s3_bucket, moto_endpoint, monkeypatch
) -> None:
    src = make_folder({"cat": 12, "dog": 12})
    storage.upload_dir(src, f"{s3_bucket}/photos")
    proxy = RecordingProxy(moto_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    manifest = prepare_dataset(f"{s3_bucket}/photos", tmp_path / "out", data_config=data_config)
    local = prepare_dataset(str(src), tmp_path / "local", data_config=data_config)
    assert manifest.fingerprint == local.fingerprint
    assert _shards(tmp_path / "out") == _shards(tmp_path / "local")
    bucket = s3_bucket.removeprefix("s3://")
    objects = [r for r in proxy.requests if r.split()[1].startswith(f"/{bucket}/photos/")]
    assert len(objects) == 24 and all(r.startswith("GET ") for r in objects), proxy.requests
    assert not [r for r in proxy.requests if r.startswith("HEAD ")]


def test_s3_prefix_download_rides_out_dropped_connections(
    make_folder, tmp_path, s3_bucket, moto_endpoint, monkeypatch
) -> None:
    src = make_folder({"cat": 20, "dog": 20})
    storage.upload_dir(src, f"{s3_bucket}/photos")
    monkeypatch.setenv("AWS_ENDPOINT_URL", RecordingProxy(moto_endpoint, resets=6).url)
    dest = storage.download_prefix(f"{s3_bucket}/photos", tmp_path / "dest")
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*.png")}


def test_s3_prefix_download_that_fails_leaves_no_files(
    make_folder, tmp_path, s3_bucket, moto_endpoint, monkeypatch
) -> None:
    src = make_folder({"cat": 20, "dog": 20})
    storage.upload_dir(src, f"{s3_bucket}/photos")
    entries = storage._s3_listing(f"{s3_bucket}/photos")  # listed while S3 is up
    monkeypatch.setenv("AWS_ENDPOINT_URL", RecordingProxy(moto_endpoint, resets=10**6).url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with pytest.raises(Unreachable, match="unreachable after 2 attempts"):
        storage._download_entries(f"{s3_bucket}/photos", entries, tmp_path / "dest")
    assert not [p for p in (tmp_path / "dest").rglob("*") if p.is_file()]
