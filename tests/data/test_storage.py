"""thaw.storage against a real S3 API (moto server on loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from thaw import storage
from thaw.errors import ThawError


def test_is_s3_uri() -> None:
    assert storage.is_s3_uri("s3://bucket/x")
    assert not storage.is_s3_uri("/data/s3://x")
    assert not storage.is_s3_uri(Path("s3:/bucket"))


def test_split_s3_uri() -> None:
    assert storage.split_s3_uri("s3://my-bucket/a/b/") == ("my-bucket", "a/b/")
    assert storage.split_s3_uri("s3://my.bucket") == ("my.bucket", "")


@pytest.mark.parametrize(
    "uri", ["s3://", "s3:///prefix", "http://bucket/x", "s3://Bad_Bucket/x", "s3://ab"]
)
def test_split_s3_uri_rejects_malformed(uri: str) -> None:
    with pytest.raises(ThawError, match="S3 URI"):
        storage.split_s3_uri(uri)


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs", "a//b", "./a"])
def test_safe_join_rejects_unsafe_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(ThawError, match="unsafe S3 key"):
        storage.safe_join(tmp_path, key)


def test_safe_join_maps_nested_keys(tmp_path: Path) -> None:
    assert storage.safe_join(tmp_path, "cat/x.png") == tmp_path / "cat" / "x.png"


def test_upload_list_download_round_trip(tmp_path: Path, s3_bucket: str) -> None:
    src = tmp_path / "src"
    for rel in ("cat/a.png", "cat/sub/b.png", "dog/c.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode())
    storage.upload_dir(src, f"{s3_bucket}/data")
    storage.upload_file(src / "dog/c.png", f"{s3_bucket}/data2/c.png")

    bucket = s3_bucket.removeprefix("s3://")
    assert storage.list_s3_objects(f"{s3_bucket}/data") == [
        "data/cat/a.png",
        "data/cat/sub/b.png",
        "data/dog/c.png",
    ]  # "data2/" is not under the folder "data"
    dest = storage.download_prefix(f"{s3_bucket}/data/", tmp_path / "dest")
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["cat/a.png", "cat/sub/b.png", "dog/c.png"]
    assert (dest / "cat/sub/b.png").read_bytes() == b"cat/sub/b.png"

    single = storage.download_file(f"s3://{bucket}/data2/c.png", tmp_path / "one" / "c.png")
    assert single.read_bytes() == b"dog/c.png"
    assert [p.name for p in single.parent.iterdir()] == ["c.png"]  # no temporary leftovers


def test_download_prefix_refuses_unsafe_key_before_writing(tmp_path: Path, s3_bucket: str):
    client = storage.s3_client()
    bucket = s3_bucket.removeprefix("s3://")
    client.put_object(Bucket=bucket, Key="data/ok.png", Body=b"ok")
    client.put_object(Bucket=bucket, Key="data/../x", Body=b"evil")
    assert "data/../x" in storage.list_s3_objects(s3_bucket)  # stored literally
    with pytest.raises(ThawError, match=r"unsafe S3 key '\.\./x'"):
        storage.download_prefix(f"{s3_bucket}/data", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert not (tmp_path / "x").exists()


def test_materialize(tmp_path: Path, s3_bucket: str) -> None:
    local = tmp_path / "local"
    local.mkdir()
    assert storage.materialize(str(local), tmp_path / "work") == local
    with pytest.raises(ThawError, match="does not exist"):
        storage.materialize(str(tmp_path / "missing"), tmp_path / "work")

    (local / "w.bin").write_bytes(b"weights")
    storage.upload_file(local / "w.bin", f"{s3_bucket}/models/w.bin")
    got = storage.materialize(f"{s3_bucket}/models/w.bin", tmp_path / "work")
    assert got.is_file() and got.read_bytes() == b"weights"
    folder = storage.materialize(f"{s3_bucket}/models", tmp_path / "work")
    assert (folder / "w.bin").read_bytes() == b"weights"
    storage.s3_client().delete_object(Bucket=s3_bucket[5:], Key="models/w.bin")
    storage.upload_file(local / "w.bin", f"{s3_bucket}/models/v2.bin")
    again = storage.materialize(f"{s3_bucket}/models", tmp_path / "work")
    assert sorted(p.name for p in again.iterdir()) == ["v2.bin"]  # no stale w.bin
    with pytest.raises(ThawError, match="nothing found at"):
        storage.materialize(f"{s3_bucket}/nope", tmp_path / "work")


def test_ensure_bucket_is_idempotent_and_missing_bucket_is_clear(s3_bucket: str) -> None:
    storage.ensure_bucket(s3_bucket)
    storage.ensure_bucket("s3://brand-new-bucket/prefix")
    assert storage.list_s3_objects("s3://brand-new-bucket") == []
    with pytest.raises(ThawError, match="NoSuchBucket"):
        storage.list_s3_objects("s3://no-such-bucket/x")
