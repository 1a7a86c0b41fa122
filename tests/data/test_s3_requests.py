"""The requests thaw sends to S3, recorded by an HTTPS proxy on loopback in front of moto.

moto accepts what older S3-compatible stores refuse, so these tests check the requests
themselves, not only the answers:

- Checksums only where the S3 API requires them. botocore 1.44.18 defaults
  ``request_checksum_calculation`` and ``response_checksum_validation`` to "when_supported"
  (botocore/configprovider.py; variables ``AWS_REQUEST_CHECKSUM_CALCULATION`` /
  ``AWS_RESPONSE_CHECKSUM_VALIDATION``): CRC32 on every upload, sent over HTTPS as an
  ``aws-chunked`` body with an ``x-amz-trailer`` (botocore/httpchecksum.py
  ``resolve_request_checksum_algorithm`` / ``_apply_request_trailer_checksum``), and
  ``x-amz-checksum-mode: ENABLED`` on every GET (botocore/handlers.py
  ``_handle_request_validation_mode_member``). s3transfer 0.19.3 adds ``ChecksumAlgorithm``
  to uploads under "when_supported" too (s3transfer/manager.py ``_add_operation_defaults``).
  The KFP launcher forces "when required" for the same stores
  (backend/src/v2/objectstore/object_store.go ``newS3Client``, KFP 2.17.0, #13315); thaw
  makes it the default and leaves the variables the last word.
- Every GET pinned to the listed ETag. s3transfer 0.19.3 sends ``IfMatch`` only on ranged
  GETs (s3transfer/download.py ``DownloadSubmissionTask._submit_ranged_download_request`` and
  ``_submit_first_chunk_request``, the latter taken when response validation is
  "when_required") and refuses it from callers (``ALLOWED_DOWNLOAD_ARGS`` in
  s3transfer/constants.py); a 412 reaches the caller as ``S3DownloadFailedError``
  (``GetObjectTask._main``).

The boto/botocore and boto/s3transfer mirrors here stop at 1.43.67 and 0.16.1; the file
names above were read in the installed botocore 1.44.18 and s3transfer 0.19.3.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.loopback import LoopbackServer, serving
from thaw import storage

_HOP_BY_HOP = {"host", "connection", "transfer-encoding", "content-length", "keep-alive"}
_NOT_PASSED_BACK = _HOP_BY_HOP | {"server", "date"}  # the proxy's own server adds these
_SMALL = 1000
_PART = 64 * 1024  # the part size of "large" downloads in these tests
_LARGE = 2 * _PART + 1000  # three ranged GETs
_UPLOAD_PART = 5 * 1024 * 1024  # S3's (and moto's) smallest part of a multipart upload


@dataclass
class Sent:
    """One request as the proxy received it, and the status moto answered."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    status: int = 0


class RecordingProxy(LoopbackServer):
    """HTTPS on 127.0.0.1 in front of moto: records each request, then forwards it.
    ``before_get[path]`` runs once before the first GET of ``path`` is forwarded (a writer
    racing the reader); ``ignore_if_match`` drops ``If-Match`` on the way, as a store that
    does not implement it would."""

    def __init__(self, upstream: str, tls: ssl.SSLContext) -> None:
        self._server = HTTPServer(host="127.0.0.1", ssl_context=tls, threaded=True)
        self._upstream = urlsplit(upstream)
        self._lock = threading.Lock()
        self.sent: list[Sent] = []
        self.before_get: dict[str, Callable[[], None]] = {}
        self.ignore_if_match = False

    def requests(self, method: str, path: str | None = None) -> list[Sent]:
        return [s for s in self.sent if s.method == method and path in (None, s.path)]

    def _handle(self, request: Request) -> Response:
        headers = {name.lower(): value for name, value in request.headers.items()}
        sent = Sent(request.method, request.path, request.query_string.decode(), headers)
        with self._lock:
            self.sent.append(sent)
            hook = self.before_get.pop(request.path, None) if request.method == "GET" else None
        if hook is not None:
            hook()
        forwarded = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP}
        if self.ignore_if_match:
            forwarded.pop("if-match", None)
        connection = http.client.HTTPConnection(self._upstream.hostname, self._upstream.port)
        try:
            connection.request(request.method, request.environ["RAW_URI"],
                               body=request.get_data(), headers=forwarded)
            answer = connection.getresponse()
            body = answer.read()
        finally:
            connection.close()
        sent.status = answer.status
        kept = [(k, v) for k, v in answer.getheaders() if k.lower() not in _NOT_PASSED_BACK]
        response = Response(body, status=answer.status, headers=kept)
        response.headers["Content-Length"] = answer.getheader("Content-Length", "0")  # HEAD's
        return response


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def proxy(s3_bucket: str, moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingProxy]:
    """thaw's S3 endpoint is the recording proxy (HTTPS, so botocore would use aws-chunked
    trailers); the checksum variables are unset, as in a fresh pod."""
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    for name in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",
                 "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    with serving(RecordingProxy(moto_endpoint, tls)) as recording:
        monkeypatch.setenv("AWS_ENDPOINT_URL", recording.url)
        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
        yield recording


@pytest.fixture
def moto_client(moto_endpoint: str) -> object:
    """A plain boto3 client talking to moto directly: setup and rival writers, unrecorded."""
    return boto3.client("s3", endpoint_url=moto_endpoint)


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", _PART)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", _PART)


def _checksum_headers(sent: Sent) -> dict[str, str]:
    return {name: value for name, value in sent.headers.items()
            if name.startswith(("x-amz-checksum-", "x-amz-sdk-checksum-", "x-amz-trailer"))
            or (name == "content-encoding" and "aws-chunked" in value)}


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("requested", [None, "when_supported"])
def test_uploads_carry_checksums_only_when_the_environment_asks(
        proxy: RecordingProxy, tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
        requested: str | None) -> None:
    """A small object (PutObject) and a multipart one (CreateMultipartUpload, UploadPart,
    CompleteMultipartUpload): none carries a checksum by default; with
    ``AWS_REQUEST_CHECKSUM_CALCULATION=when_supported`` every body is CRC32-trailed."""
    if requested:
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", requested)
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", _UPLOAD_PART)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", _UPLOAD_PART)
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.bin").write_bytes(os.urandom(_SMALL))
    (src / "large.bin").write_bytes(os.urandom(_UPLOAD_PART + 1000))
    storage.upload_dir(src, f"{s3_bucket}/up")
    storage.upload_file(src / "small.bin", f"{s3_bucket}/one/small.bin")

    writes = proxy.requests("PUT") + proxy.requests("POST")
    bodies = proxy.requests("PUT")  # PutObject x2, UploadPart x2
    if requested is None:
        assert [_checksum_headers(s) for s in writes] == [{}] * len(writes)
    else:
        for sent in bodies:
            assert _checksum_headers(sent)["x-amz-trailer"] == "x-amz-checksum-crc32"
            assert _checksum_headers(sent)["content-encoding"] == "aws-chunked"
    parts = [s for s in bodies if "partNumber=" in s.query]
    assert (len(bodies), len(parts)) == (4, 2)  # the large file went up in two parts
    assert all(s.status == 200 for s in writes)
    dest = storage.download_prefix(f"{s3_bucket}/up", tmp_path / "dest")
    assert (dest / "large.bin").read_bytes() == (src / "large.bin").read_bytes()


@pytest.mark.parametrize(("manifest_env", "checksummed"), [(None, True), ("when_required", False)])
def test_the_mlflow_servers_uploads_follow_the_manifests_checksum_env(
        proxy: RecordingProxy, tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
        manifest_env: str | None, checksummed: bool) -> None:
    """The MLflow server (and the bucket Job) use a plain boto3 client, not thaw's: MLflow's
    S3ArtifactRepository (mlflow/store/artifact/s3_artifact_repo.py ``_cached_get_s3_client``,
    ``_upload_file``, mlflow 3.17.2). Left alone, it CRC32-trails every upload; with the
    ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` that infra/base/mlflow.yaml and
    buckets-job.yaml set, it sends none."""
    from mlflow.store.artifact import s3_artifact_repo

    if manifest_env:
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", manifest_env)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", proxy.url)
    s3_artifact_repo._cached_get_s3_client.cache_clear()  # a client keeps its checksum setting
    artifact = tmp_path / "metrics.json"
    artifact.write_text("{}")

    s3_artifact_repo.S3ArtifactRepository(f"{s3_bucket}/mlflow/run").log_artifact(str(artifact))

    (put,) = proxy.requests("PUT")
    assert put.status == 200
    assert ("x-amz-trailer" in _checksum_headers(put)) is checksummed


def _read(reader: str, uri: str, key: str, dest: Path) -> Path:
    """Read the object ``key`` below the folder ``uri`` the way thaw's callers do."""
    if reader == "download_prefix":
        return storage.download_prefix(uri, dest) / key
    if reader == "materialize":
        return storage.materialize(f"{uri}/{key}", dest)
    return storage.download_file(f"{uri}/{key}", dest / key)


READERS = ["download_prefix", "materialize", "download_file"]


@pytest.mark.parametrize("validation", [None, "when_supported"])
@pytest.mark.parametrize("size", [_SMALL, _LARGE], ids=["small", "large"])
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.usefixtures("small_parts")
def test_every_get_carries_the_listed_etag(
        proxy: RecordingProxy, moto_client, s3_bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, reader: str, size: int, validation: str | None) -> None:
    """If-Match with the listing's ETag on every GET, whole or ranged, whichever path
    s3transfer takes; ``x-amz-checksum-mode`` only when the environment asks for it."""
    if validation:
        monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", validation)
    bucket = s3_bucket.removeprefix("s3://")
    content = os.urandom(size)
    moto_client.put_object(Bucket=bucket, Key="data/x.bin", Body=content)
    listed = moto_client.list_objects_v2(Bucket=bucket, Prefix="data/")["Contents"][0]["ETag"]

    got = _read(reader, f"{s3_bucket}/data", "x.bin", tmp_path / "dest")

    assert got.read_bytes() == content
    gets = proxy.requests("GET", f"/{bucket}/data/x.bin")
    assert len(gets) == (1 if size == _SMALL else 3)
    assert [s.headers.get("if-match") for s in gets] == [listed] * len(gets)
    assert [s.headers.get("x-amz-checksum-mode") for s in gets] == \
        [{None: None, "when_supported": "ENABLED"}[validation]] * len(gets)


@pytest.mark.parametrize("store", ["honours If-Match", "ignores If-Match"])
@pytest.mark.parametrize("size", [_SMALL, _LARGE], ids=["small", "large"])
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.usefixtures("small_parts")
def test_an_object_rewritten_after_the_listing_is_a_clear_error(
        proxy: RecordingProxy, moto_client, s3_bucket: str, tmp_path: Path,
        reader: str, size: int, store: str) -> None:
    """The object is rewritten (same size, new bytes) after thaw listed it, just before its
    first GET: a ``SourceChanged`` naming the object, and no file, whole or partial."""
    bucket = s3_bucket.removeprefix("s3://")
    moto_client.put_object(Bucket=bucket, Key="data/x.bin", Body=os.urandom(size))
    rewritten = os.urandom(size)
    proxy.before_get[f"/{bucket}/data/x.bin"] = lambda: moto_client.put_object(
        Bucket=bucket, Key="data/x.bin", Body=rewritten)
    proxy.ignore_if_match = store == "ignores If-Match"
    work = tmp_path / "work"

    with pytest.raises(storage.SourceChanged) as raised:
        _read(reader, f"{s3_bucket}/data", "x.bin", work)

    assert str(raised.value).startswith(
        f"s3://{bucket}/data/x.bin changed while thaw was reading it: the object was "
        "rewritten or deleted after it was listed, so the data changed during this run")
    assert "Run again once nothing writes under that prefix" in str(raised.value)
    first_get = proxy.requests("GET", f"/{bucket}/data/x.bin")[0]
    if store == "honours If-Match":
        assert first_get.status == 412  # refused before a byte was sent
    else:
        assert first_get.status in (200, 206)  # served: only the ETag check caught it
    assert not work.exists() or _files(work) == []


@pytest.mark.parametrize("reader", READERS)
def test_an_object_deleted_after_the_listing_is_the_same_clear_error(
        proxy: RecordingProxy, moto_client, s3_bucket: str, tmp_path: Path, reader: str) -> None:
    """Deleted between listing (or HEAD) and GET: S3 answers NoSuchKey (SeaweedFS up to 4.44
    answers 412 to a GET with If-Match on a missing object, seaweedfs/seaweedfs#10984): either
    way ``SourceChanged``, and no file."""
    bucket = s3_bucket.removeprefix("s3://")
    moto_client.put_object(Bucket=bucket, Key="data/x.bin", Body=b"x")
    proxy.before_get[f"/{bucket}/data/x.bin"] = lambda: moto_client.delete_object(
        Bucket=bucket, Key="data/x.bin")
    work = tmp_path / "work"
    with pytest.raises(storage.SourceChanged, match=f"s3://{bucket}/data/x.bin changed"):
        _read(reader, f"{s3_bucket}/data", "x.bin", work)
    assert proxy.requests("GET", f"/{bucket}/data/x.bin")[0].status == 404
    assert not work.exists() or _files(work) == []


def test_the_aws_config_file_still_decides(tmp_path: Path) -> None:
    """botocore's chain (botocore/configprovider.py, 1.44.18): environment, then the config
    file, then thaw's "when_required" in place of botocore's "when_supported"."""
    config = tmp_path / "config"
    config.write_text("[default]\nresponse_checksum_validation = when_supported\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    script = ("from thaw.storage import s3_client; c = s3_client().meta.config; "
              "print(c.request_checksum_calculation, c.response_checksum_validation)")

    def settings(**extra: str) -> str:
        return subprocess.run([sys.executable, "-c", script], env={**env, **extra},
                              capture_output=True, text=True, check=True).stdout.strip()

    region = {"AWS_DEFAULT_REGION": "us-east-1"}
    assert settings(**region) == "when_required when_required"
    assert settings(**region, AWS_CONFIG_FILE=str(config)) == "when_required when_supported"
    assert settings(**region, AWS_CONFIG_FILE=str(config),
                    AWS_REQUEST_CHECKSUM_CALCULATION="WHEN_SUPPORTED",
                    AWS_RESPONSE_CHECKSUM_VALIDATION="when_required") == \
        "when_supported when_required"
