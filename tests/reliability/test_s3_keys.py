"""S3 object keys are untrusted: keys that would escape the download folder, or that
cannot all be files, are refused with a clear error before anything is written."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from thaw import storage
from thaw.errors import ThawError
from thaw.stack import StackInfo

pytestmark = pytest.mark.slow


def _put(stack: StackInfo, keys: list[str]) -> str:
    """Objects with exactly these keys (relative to a fresh prefix); the prefix's URI."""
    prefix = f"keys-{uuid.uuid4().hex[:8]}/data"
    client = storage.s3_client()
    for key in keys:
        client.put_object(Bucket=stack.bucket, Key=f"{prefix}/{key}", Body=key.encode())
    stored = storage.list_s3_objects(f"s3://{stack.bucket}/{prefix}")
    assert stored == sorted(f"{prefix}/{key}" for key in keys)  # stored literally
    return f"s3://{stack.bucket}/{prefix}"


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("bad", [
    "../evil.png",
    "cat/../../evil.png",
    "/abs/evil.png",
    "cat//evil.png",
    "./evil.png",
    "..\\evil.png",
    "cat\\..\\..\\evil.png",
])
def test_unsafe_keys_are_refused_before_anything_is_written(stack, tmp_path, bad):
    uri = _put(stack, ["cat/ok.png", bad])
    dest = tmp_path / "work" / "dest"
    with pytest.raises(ThawError, match=r"unsafe S3 key .*rename the object"):
        storage.download_prefix(uri, dest)
    assert _files(tmp_path) == []  # not even the safe key: nothing half downloaded
    with pytest.raises(ThawError, match="unsafe S3 key"):
        storage.materialize(uri, tmp_path / "work")  # what preprocess downloads through
    assert _files(tmp_path) == []


def test_a_key_that_is_both_a_file_and_a_folder_is_refused(stack, tmp_path):
    uri = _put(stack, ["a/b", "a/b/c", "z.png"])
    with pytest.raises(ThawError, match=r"S3 keys 'a/b' and 'a/b/c' clash: 'a/b' would have "
                                        r"to be both a file and a folder"):
        storage.download_prefix(uri, tmp_path / "dest")
    assert _files(tmp_path) == []


def test_folder_markers_and_ordinary_keys_download(stack, tmp_path):
    uri = _put(stack, ["a/", "a/b/c.png", "a/d.png", "e f+g.png"])
    dest = storage.download_prefix(uri, tmp_path / "dest")
    assert _files(dest) == ["a/b/c.png", "a/d.png", "e f+g.png"]
    assert (dest / "a/b/c.png").read_bytes() == b"a/b/c.png"


def test_safe_join_refuses_a_symlink_out_of_the_folder(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "cat").symlink_to(outside)
    with pytest.raises(ThawError, match="resolves outside"):
        storage.safe_join(dest, "cat/x.png")
