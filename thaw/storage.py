"""Read and write `s3://bucket/prefix` URIs and local paths.

The S3 endpoint and credentials come from the standard environment variables
(`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), which boto3 reads
itself, so the same code talks to AWS, MinIO or a local test server.

Faults: botocore retries refused or dropped connections, timeouts and 5xx answers with
jittered exponential backoff (its "standard" mode) up to `AWS_MAX_ATTEMPTS` attempts; after
that an `Unreachable` error names the endpoint, the attempts and the time spent. Object keys
are untrusted and never become paths outside the download folder.

Checksums: botocore >= 1.36 adds CRC32 checksums to uploads (as aws-chunked trailers over
HTTPS) and asks for checksums on downloads whenever the API allows it ("when_supported").
Older MinIO and other S3-compatible stores refuse those requests, so thaw's default is
"when_required" for both, as the KFP launcher's (backend/src/v2/objectstore/object_store.go,
KFP 2.17.0). ``AWS_REQUEST_CHECKSUM_CALCULATION`` / ``AWS_RESPONSE_CHECKSUM_VALIDATION`` or the
AWS config file still decide when set: botocore reads them itself.

Consistent reads: every object thaw downloads is pinned to the ETag it had when it was listed
(or, for a single object, when its HEAD answered). Each GET carries ``If-Match: <ETag>`` and the
ETag of the answer is compared too (for stores that ignore the header); an object rewritten in
between fails with ``SourceChanged``, never mixing old and new content or leaving a file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
import botocore.session
from boto3.exceptions import Boto3Error
from boto3.exceptions import RetriesExceededError as TransferRetriesExceeded
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import S3DownloadFailedError
from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber

from thaw.errors import ThawError

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_TRANSFER_THREADS = 8
_MAX_PENDING_DOWNLOADS = 256  # queued downloads: bounds memory for millions of objects
_MIB = 1024 * 1024
# Objects of at least MULTIPART_THRESHOLD bytes travel in parts of MULTIPART_CHUNKSIZE bytes
# (s3transfer's defaults; uploads need parts of at least 5 MiB).
MULTIPART_THRESHOLD = 8 * _MIB
MULTIPART_CHUNKSIZE = 8 * _MIB
# botocore's settings whose default ("when_supported") thaw replaces with "when_required".
_CHECKSUM_SETTINGS = ("request_checksum_calculation", "response_checksum_validation")
S3_ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"  # botocore's own variable, read here to report it
S3_DEFAULT_ATTEMPTS = 12  # jittered backoff capped at 20 s: rides out ~30 s on average
_S3_CONNECT_TIMEOUT_S = 10
_S3_READ_TIMEOUT_S = 60
# Values of these variables are never written to logs, MLflow or error records.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN")
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


class Unreachable(ThawError):
    """A service (S3, MLflow) did not answer after its retries. Unlike other ThawErrors
    this is not a problem of the input: the same step may succeed once it is back."""


def redact(text: str) -> str:
    """``text`` without the values of the secret variables in ``SECRET_ENV`` and without
    the ``user:password@`` part of URLs."""
    for name in SECRET_ENV:
        secret = os.environ.get(name, "")
        if len(secret) >= 4:  # shorter values would blank out ordinary words
            text = text.replace(secret, "***")
    return _URL_USERINFO.sub("***@", text)


def unreachable_message(service: str, endpoint: str, attempts: int, started: float,
                        cause: BaseException | str, fix: str) -> str:
    """The one wording of "a service stayed down": endpoint, attempts, time, cause, fix."""
    return redact(f"{service} {endpoint} unreachable after {attempts} attempts over "
                  f"{time.monotonic() - started:.1f} s: {cause} ({fix})")


def s3_attempts() -> int:
    """Attempts per S3 request (first try included): ``$AWS_MAX_ATTEMPTS`` or 12."""
    raw = os.environ.get(S3_ATTEMPTS_ENV, "").strip()
    if not raw:
        return S3_DEFAULT_ATTEMPTS
    if not raw.isdigit() or int(raw) < 1:
        raise ThawError(f"{S3_ATTEMPTS_ENV}={raw!r} is not valid: set a whole number of "
                        "attempts >= 1, or unset it for the default of "
                        f"{S3_DEFAULT_ATTEMPTS}")
    return int(raw)


class SourceChanged(ThawError):
    """An object was rewritten between the listing (or HEAD) and the read of it."""


_session_lock = threading.Lock()


@functools.cache
def _session() -> boto3.Session:
    """thaw's boto3 session: botocore resolves every setting as usual (environment, then the
    AWS config file, then its default), only the default of the two checksum settings is
    "when_required". A value in ``Config(...)`` would outrank the environment, hence the
    default is replaced instead (botocore.session.Session(session_vars=...))."""
    variables = botocore.session.Session.SESSION_VARIABLES
    when_required = {
        name: (config_name, env_var, "when_required", convert)
        for name in _CHECKSUM_SETTINGS
        for config_name, env_var, _, convert in [variables[name]]
    }
    return boto3.Session(botocore_session=botocore.session.Session(session_vars=when_required))


def s3_client() -> Any:
    """A boto3 S3 client configured from the environment (endpoint, region, credentials,
    checksum settings), retrying transient failures ``s3_attempts()`` times in botocore's
    standard mode."""
    config = Config(retries={"max_attempts": s3_attempts(), "mode": "standard"},
                    connect_timeout=_S3_CONNECT_TIMEOUT_S, read_timeout=_S3_READ_TIMEOUT_S)
    with _session_lock:  # a boto3 session is not thread-safe
        return _session().client("s3", config=config)


def _transfer_config() -> TransferConfig:
    """s3transfer's classic transfer manager (the one whose downloads thaw pins to an ETag)
    with thaw's part sizes and concurrency."""
    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                          multipart_chunksize=MULTIPART_CHUNKSIZE,
                          max_concurrency=_TRANSFER_THREADS,
                          preferred_transfer_client="classic")


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
    """Turn botocore failures into a ThawError that names the URI and the likely fix (an
    ``Unreachable`` one when the endpoint stayed down through every retry)."""
    started = time.monotonic()
    try:
        yield
    except NoCredentialsError as exc:
        raise ThawError(
            f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from exc
    except ClientError as exc:
        raise _client_error(uri, exc, started) from exc
    except (BotoConnectionError, HTTPClientError, TransferRetriesExceeded) as exc:
        raise Unreachable(_s3_unreachable(uri, exc, started)) from exc
    except BotoCoreError as exc:
        raise ThawError(redact(
            f"S3 request for {uri} failed: {exc} (check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3)"
        )) from exc
    except Boto3Error as exc:  # boto3 wraps a ClientError of an upload in S3UploadFailedError
        cause = exc.__context__
        if isinstance(cause, ClientError):
            raise _client_error(uri, cause, started) from exc
        raise ThawError(redact(f"S3 request for {uri} failed: {exc}")) from exc


def _client_error(uri: str, exc: ClientError, started: float) -> ThawError:
    """An S3 error answer; a 5xx that outlived every retry means the service is down."""
    error = exc.response.get("Error", {})
    code, message = error.get("Code", "?"), error.get("Message", str(exc))
    meta = exc.response.get("ResponseMetadata", {})
    if int(meta.get("HTTPStatusCode", 0)) >= 500:
        return Unreachable(_s3_unreachable(uri, f"{code}: {message}", started))
    return ThawError(redact(f"S3 request for {uri} failed: {code}: {message}"))


def _s3_unreachable(uri: str, cause: BaseException | str, started: float) -> str:
    return unreachable_message(
        "S3 endpoint", s3_client().meta.endpoint_url, s3_attempts(), started,
        f"{cause} (for {uri})",
        f"check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3; {S3_ATTEMPTS_ENV} sets the attempts")


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
        return _object_entry(bucket, key) is not None


def safe_join(dest: Path, relative_key: str) -> Path:
    """Map an object key (relative to the downloaded prefix) to a path inside `dest`.

    Keys are untrusted: `..`, absolute keys, empty segments, backslashes (a separator on
    Windows) and NUL could write outside `dest` or collide, so they are refused rather than
    normalised.
    """
    parts = relative_key.split("/")
    if (relative_key.startswith("/") or any(p in ("", ".", "..") for p in parts)
            or "\\" in relative_key or "\0" in relative_key):
        raise ThawError(
            f"unsafe S3 key {relative_key!r}: keys with '..', '.', '//', a leading '/', a "
            "backslash or NUL cannot be mapped to a local file; rename the object"
        )
    path = dest.joinpath(*parts)
    if not path.resolve().is_relative_to(dest.resolve()):
        raise ThawError(f"unsafe S3 key {relative_key!r}: it resolves outside {dest}")
    return path


def _run_parallel(fn: Callable[..., None], jobs: list[tuple[Any, ...]]) -> None:
    with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
        for future in [pool.submit(fn, *job) for job in jobs]:
            future.result()


def _check_no_file_is_a_folder(relative_keys: Iterable[str]) -> None:
    """Refuse keys like ``a/b`` next to ``a/b/c``: ``a/b`` cannot be a file and a folder."""
    keys = set(relative_keys)
    for key in sorted(keys):
        parts = key.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in keys:
                raise ThawError(f"S3 keys {folder!r} and {key!r} clash: {folder!r} would have "
                                "to be both a file and a folder; rename or delete one of them")


class _Listed(BaseSubscriber):
    """Hands s3transfer an object's size and ETag from the listing, so it skips its HEAD
    request (s3transfer itself then sends `If-Match` on ranged GETs only: ``_ETagPins`` covers
    every GET)."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(int(self.entry["Size"]))
        future.meta.provide_object_etag(self.entry["ETag"])


def _bare_etag(etag: str) -> str:
    return etag.strip('"')  # some stores list ETags unquoted


class _ETagPins:
    """Every GetObject of one client pinned to the ETag its object was listed with: sent as
    ``If-Match`` (the store refuses a changed object with 412 before sending a byte), and
    compared with the ETag of the answer (for stores that ignore ``If-Match``). Both hold
    within the one GET that also returns the bytes, so no rewrite can slip in between; a
    HEAD before the GET could not promise that.

    s3transfer 0.19.3 adds ``IfMatch`` by itself only to ranged GETs
    (s3transfer/download.py) and does not accept it from callers (ALLOWED_DOWNLOAD_ARGS in
    s3transfer/constants.py), hence botocore's ``before-parameter-build`` event."""

    def __init__(self, bucket: str, entries: Iterable[dict[str, Any]]) -> None:
        self.bucket = bucket
        self.etags = {entry["Key"]: entry["ETag"] for entry in entries}

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-parameter-build.s3.GetObject", self._ask)
        client.meta.events.register("after-call.s3.GetObject", self._check)
        return client

    def _ask(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        etag = self.etags.get(params.get("Key", ""))
        if params.get("Bucket") == self.bucket and etag is not None:
            params["IfMatch"] = etag
            context["thaw_pinned"] = (params["Key"], etag)

    def _check(self, http_response: Any, parsed: dict[str, Any], context: dict[str, Any],
               **_: Any) -> None:
        pinned = context.get("thaw_pinned")
        if pinned is None or http_response.status_code >= 300:
            return  # errors (412 included) raise in botocore and s3transfer
        key, etag = pinned
        if _bare_etag(parsed.get("ETag", "")) != _bare_etag(etag):
            parsed["Body"].close()  # not a byte of it is read
            raise SourceChanged(_changed_message(self.bucket, key))


def _changed_message(bucket: str, key: str) -> str:
    return (f"s3://{bucket}/{key} changed while thaw was reading it: the object was rewritten "
            "or deleted after it was listed, so the data changed during this run (its ETag no "
            "longer matches). Nothing was kept from it. Run again once nothing writes under "
            "that prefix, or point the run at a copy that stays unchanged")


def _download_entries(uri: str, entries: list[dict[str, Any]], dest: Path) -> Path:
    """Download the listed objects (ListObjectsV2 entries) under `dest`, keeping their paths
    below the folder `uri`."""
    bucket, prefix = split_s3_uri(uri)
    folder = _folder_prefix(prefix)
    # Check every key before writing anything.
    jobs = [
        (entry, safe_join(dest, entry["Key"][len(folder) :]))
        for entry in entries
        if not entry["Key"].endswith("/")  # folder markers written by some tools
    ]
    _check_no_file_is_a_folder(entry["Key"][len(folder):] for entry, _ in jobs)
    dest.mkdir(parents=True, exist_ok=True)
    _download_pinned(uri, bucket, jobs)
    return dest


def _download_pinned(uri: str, bucket: str, jobs: list[tuple[dict[str, Any], Path]]) -> None:
    """Download each (entry, path) job: one transfer per object, `_TRANSFER_THREADS` requests
    at a time through one transfer manager, every GET pinned to the entry's ETag, each object
    into a hidden temporary name renamed when complete."""
    client = _ETagPins(bucket, (entry for entry, _ in jobs)).attach(s3_client())
    pending: deque[tuple[Any, str, Path, Path]] = deque()  # future, key, temporary, final
    try:
        with _s3_errors(uri), TransferManager(client, _transfer_config()) as manager:
            for entry, path in jobs:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = _part_name(path)
                future = manager.download(bucket, entry["Key"], str(tmp),
                                          subscribers=[_Listed(entry)])
                pending.append((future, entry["Key"], tmp, path))
                if len(pending) >= _MAX_PENDING_DOWNLOADS:
                    _finish_download(bucket, *pending[0])
                    pending.popleft()
            while pending:
                _finish_download(bucket, *pending[0])
                pending.popleft()
    finally:
        for _, _, tmp, _ in pending:  # failed, cancelled or never renamed into place
            tmp.unlink(missing_ok=True)


def _part_name(path: Path) -> Path:
    """A hidden, unique name beside ``path`` for writing it before the rename."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")


def _finish_download(bucket: str, future: Any, key: str, tmp: Path, path: Path) -> None:
    try:
        future.result()
    except S3DownloadFailedError as exc:  # s3transfer's answer to 412 PreconditionFailed
        raise SourceChanged(_changed_message(bucket, key)) from exc
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchKey":  # deleted since listed
            raise SourceChanged(_changed_message(bucket, key)) from exc
        raise
    os.replace(tmp, path)


def download_prefix(uri: str, dest: Path) -> Path:
    """Download every object under the folder `uri` into `dest`, keeping relative paths."""
    return _download_entries(uri, _s3_listing(uri), Path(dest))


def write_atomic(path: Path, write: Callable[[Any], None], *, binary: bool = False) -> Path:
    """Create or replace ``path`` with what ``write(handle)`` writes, through a temporary
    file in the same folder and a rename: after a failure or a crash the file is complete
    (new or old) or absent, never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _part_name(path)  # mode from the umask
    try:
        with open(tmp, "xb" if binary else "x", encoding=None if binary else "utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """``path.write_text(text)``, atomically (see ``write_atomic``)."""
    return write_atomic(path, lambda handle: handle.write(text))


def write_json_atomic(path: Path, value: Any, **dump_args: Any) -> Path:
    """``value`` as JSON in ``path``, atomically: a value that cannot be serialised half way
    through leaves no partial file."""
    return write_atomic(path, lambda handle: json.dump(value, handle, **dump_args))


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
        _run_parallel(lambda path, key: _upload(client, path, bucket, key), jobs)


def _upload(client: Any, src: Path, bucket: str, key: str) -> None:
    client.upload_file(str(src), bucket, key, Config=_transfer_config())


def download_file(uri: str, dest: Path) -> Path:
    """Download one object to the file path `dest` (atomically), pinned to the ETag its HEAD
    answered with."""
    bucket, key = split_s3_uri(uri)
    with _s3_errors(uri):
        head = s3_client().head_object(Bucket=bucket, Key=key)
    _download_pinned(uri, bucket, [(_entry(key, head), Path(dest))])
    return Path(dest)


def upload_file(src: Path, uri: str) -> None:
    bucket, key = split_s3_uri(uri)
    if not Path(src).is_file():
        raise ThawError(f"cannot upload {src}: not a file")
    with _s3_errors(uri):
        _upload(s3_client(), Path(src), bucket, key)


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


def _entry(key: str, head: dict[str, Any]) -> dict[str, Any]:
    """A HEAD answer as the listing entry of that object."""
    return {"Key": key, "Size": head["ContentLength"], "ETag": head["ETag"]}


def _object_entry(bucket: str, key: str) -> dict[str, Any] | None:
    """The object's listing entry from a HEAD request; None when there is no such object."""
    try:
        return _entry(key, s3_client().head_object(Bucket=bucket, Key=key))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


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
    entries = [entry for entry in _s3_listing(uri) if not entry["Key"].endswith("/")]
    if entries:
        return _download_entries(uri, entries, dest)
    with _s3_errors(uri):
        entry = _object_entry(bucket, prefix) if prefix.strip("/") else None
    if entry is not None:
        _download_pinned(uri, bucket, [(entry, dest)])
        return dest
    raise ThawError(f"nothing found at {uri}: no object and no objects under that prefix")
