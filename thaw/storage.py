"""Read and write `s3://bucket/prefix` URIs and local paths.

The S3 endpoint and credentials come from the standard environment variables
(`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), which boto3 reads
itself, so the same code talks to AWS, MinIO or a local test server.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from thaw.errors import ThawError

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_TRANSFER_THREADS = 8


def s3_client() -> Any:
    """A boto3 S3 client configured from the environment (endpoint, region, credentials)."""
    return boto3.client("s3")


def is_s3_uri(uri: str | os.PathLike[str]) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> `("bucket", "some/prefix")`."""
    if not is_s3_uri(uri):
        raise ThawError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ThawError(
            f"malformed S3 URI {uri!r}: bucket name {bucket!r} is not valid "
            "(3-63 characters: lowercase letters, digits, '.' and '-')"
        )
    return bucket, prefix


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn botocore failures into a ThawError that names the URI and the likely fix."""
    try:
        yield
    except NoCredentialsError as exc:
        raise ThawError(
            f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from exc
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", str(exc))
        raise ThawError(f"S3 request for {uri} failed: {code}: {message}") from exc
    except BotoCoreError as exc:
        raise ThawError(
            f"S3 request for {uri} failed: {exc} (check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3)"
        ) from exc


def _folder_prefix(prefix: str) -> str:
    """Treat a prefix as a folder, so `s3://b/data` does not also match `data2/...`."""
    return prefix.rstrip("/") + "/" if prefix.strip("/") else ""


def _s3_listing(uri: str) -> list[dict[str, Any]]:
    """ListObjectsV2 entries (Key, Size, ETag, ...) under the folder `uri`, in key order."""
    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    entries: list[dict[str, Any]] = []
    with _s3_errors(uri):
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=_folder_prefix(prefix)):
            entries.extend(page.get("Contents", []))
    return entries


def list_s3_objects(uri: str) -> list[str]:
    """All object keys under the folder `uri` (full keys, in S3's lexicographic order)."""
    return [entry["Key"] for entry in _s3_listing(uri)]


def source_version(uri_or_path: str | os.PathLike[str]) -> str:
    """A digest that changes whenever an object under `uri_or_path` is added, removed or
    rewritten: S3 keys with their size and ETag, or local files with size and mtime.

    Cheap (one listing, no reads), so it can run before every pipeline run and serve as
    the cache key of the expensive preprocessing: the same prefix with new content is then
    never a cache hit.
    """
    digest = hashlib.sha256()
    if is_s3_uri(uri_or_path):
        entries = [(e["Key"], e["Size"], e.get("ETag", "")) for e in _s3_listing(str(uri_or_path))]
    else:
        root = Path(uri_or_path)
        if not root.exists():
            raise ThawError(f"{root} does not exist")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        entries = [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in files]
    if not entries:
        raise ThawError(f"nothing found at {uri_or_path}: no objects to version")
    for entry in entries:
        digest.update(repr(entry).encode())
    return f"{len(entries)}-{digest.hexdigest()[:32]}"


def exists(uri: str) -> bool:
    """Whether the single object `uri` exists."""
    bucket, key = split_s3_uri(uri)
    with _s3_errors(uri):
        return _object_exists(bucket, key)


def safe_join(dest: Path, relative_key: str) -> Path:
    """Map an object key (relative to the downloaded prefix) to a path inside `dest`.

    Keys are untrusted: `..`, absolute keys and empty segments could write outside `dest` or
    collide, so they are refused rather than normalised.
    """
    parts = relative_key.split("/")
    if relative_key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ThawError(
            f"unsafe S3 key {relative_key!r}: keys with '..', '.', '//' or a leading '/' "
            "cannot be mapped to a local file; rename the object"
        )
    path = dest.joinpath(*parts)
    if not path.resolve().is_relative_to(dest.resolve()):
        raise ThawError(f"unsafe S3 key {relative_key!r}: it resolves outside {dest}")
    return path


def _download_to(client: Any, bucket: str, key: str, dest: Path) -> None:
    """Download into a hidden temporary name, then rename: a failure leaves no half file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        client.download_file(bucket, key, str(tmp))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _run_parallel(fn: Callable[..., None], jobs: list[tuple[Any, ...]]) -> None:
    with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
        for future in [pool.submit(fn, *job) for job in jobs]:
            future.result()


def _download_keys(uri: str, keys: list[str], dest: Path) -> Path:
    bucket, prefix = split_s3_uri(uri)
    folder = _folder_prefix(prefix)
    # Check every key before writing anything.
    jobs = [
        (key, safe_join(dest, key[len(folder) :]))
        for key in keys
        if not key.endswith("/")  # folder markers written by some tools
    ]
    dest.mkdir(parents=True, exist_ok=True)
    client = s3_client()
    with _s3_errors(uri):
        _run_parallel(lambda key, path: _download_to(client, bucket, key, path), jobs)
    return dest


def download_prefix(uri: str, dest: Path) -> Path:
    """Download every object under the folder `uri` into `dest`, keeping relative paths."""
    return _download_keys(uri, list_s3_objects(uri), Path(dest))


def _join_key(prefix: str, relative: str) -> str:
    return f"{prefix.rstrip('/')}/{relative}" if prefix.strip("/") else relative


def upload_dir(src: Path, uri: str) -> None:
    """Upload every file under `src` to the folder `uri`, keeping relative paths."""
    bucket, prefix = split_s3_uri(uri)
    src = Path(src)
    if not src.is_dir():
        raise ThawError(f"cannot upload {src}: not a directory")
    client = s3_client()
    jobs = [
        (path, _join_key(prefix, PurePosixPath(path.relative_to(src)).as_posix()))
        for path in sorted(src.rglob("*"))
        if path.is_file()
    ]
    with _s3_errors(uri):
        _run_parallel(lambda path, key: client.upload_file(str(path), bucket, key), jobs)


def download_file(uri: str, dest: Path) -> Path:
    """Download one object to the file path `dest` (atomically)."""
    bucket, key = split_s3_uri(uri)
    with _s3_errors(uri):
        _download_to(s3_client(), bucket, key, Path(dest))
    return Path(dest)


def upload_file(src: Path, uri: str) -> None:
    bucket, key = split_s3_uri(uri)
    if not Path(src).is_file():
        raise ThawError(f"cannot upload {src}: not a file")
    with _s3_errors(uri):
        s3_client().upload_file(str(src), bucket, key)


def ensure_bucket(uri: str) -> None:
    """Create the bucket of `uri` if it does not exist yet."""
    bucket, _ = split_s3_uri(uri)
    client = s3_client()
    with _s3_errors(uri):
        try:
            client.head_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
        region = client.meta.region_name
        if region and region != "us-east-1":
            client.create_bucket(
                Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region}
            )
        else:
            client.create_bucket(Bucket=bucket)


def _object_exists(bucket: str, key: str) -> bool:
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def materialize(uri_or_path: str | os.PathLike[str], workdir: Path) -> Path:
    """A local path for `uri_or_path`: local paths as they are, S3 folders or objects
    downloaded under `workdir/<fresh dir>/<bucket>/<key>` (fresh, so files deleted from S3
    since an earlier download never reappear)."""
    if not is_s3_uri(uri_or_path):
        path = Path(uri_or_path)
        if not path.exists():
            raise ThawError(f"{path} does not exist")
        return path
    uri = str(uri_or_path)
    bucket, prefix = split_s3_uri(uri)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix="s3-", dir=workdir))
    dest = fresh / bucket / prefix.strip("/")
    keys = [key for key in list_s3_objects(uri) if not key.endswith("/")]
    if keys:
        return _download_keys(uri, keys, dest)
    with _s3_errors(uri):
        if prefix.strip("/") and _object_exists(bucket, prefix):
            return download_file(uri, dest)
    raise ThawError(f"nothing found at {uri}: no object and no objects under that prefix")
