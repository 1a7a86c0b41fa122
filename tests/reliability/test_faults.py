"""S3 and MLflow outages against the real local stack, seen through a loopback TCP proxy
that drops connections for a while (or for good)."""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from thaw import storage
from thaw.checkpoint import load_checkpoint
from thaw.errors import ThawError
from thaw.stack import StackInfo
from thaw.steps import CHECKPOINT_ROOT_ENV, FAILURE_FILE, STAGE_RUN_FILE, train_step
from thaw.storage import Unreachable

TEST_ARCH = "efficientnet_lite0"
PROBE = {"epochs": 1, "batch_size": 64}
FINISH_MARKER = b"thaw.stopped_early"  # only finish_stage_run's request carries it


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, waking any thread blocked on the socket."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class FlakyProxy:
    """A loopback TCP proxy in front of ``port``. While down it accepts and resets every
    connection and cuts the open ones, as a crashed server would. ``trip_on(marker)`` takes
    it down when a request containing ``marker`` arrives (that request is not forwarded)."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._down_until = 0.0
        self._trip: tuple[bytes, float] | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.dropped = 0
        self.tripped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def is_down(self) -> bool:
        return time.monotonic() < self._down_until

    def down(self, seconds: float = math.inf) -> None:
        self._down_until = time.monotonic() + seconds
        with self._lock:
            for sock in self._open:
                _reset(sock)
            self._open.clear()

    def up(self) -> None:
        self._down_until = 0.0

    def trip_on(self, marker: bytes, seconds: float = math.inf) -> None:
        self._trip = (marker, seconds)

    def close(self) -> None:
        self.down()
        _reset(self._listener)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.is_down:
                self.dropped += 1
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open |= {client, server}
            for src, dst, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, upstream),
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if upstream and self._trip is not None and self._trip[0] in data:
                    seconds, self._trip, self.tripped = self._trip[1], None, True
                    self.dropped += 1
                    self.down(seconds)
                if self.is_down:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {src, dst}
            _reset(src)
            _reset(dst)


def _free_port() -> int:
    """A loopback port nothing listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_proxy(stack: StackInfo, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(stack.s3_port)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(name, proxy.url)
    yield proxy
    proxy.close()


@pytest.fixture
def mlflow_proxy(stack: StackInfo, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyProxy]:
    """MLflow through a proxy, with retries backing off 0, 2, 4 s (no jitter)."""
    proxy = FlakyProxy(stack.mlflow_port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    yield proxy
    proxy.close()


def _uri(stack: StackInfo, name: str) -> str:
    return f"s3://{stack.bucket}/faults-{uuid.uuid4().hex[:8]}/{name}"


def _direct(stack: StackInfo) -> MlflowClient:
    """A client that bypasses the proxy, to read what the server holds."""
    return MlflowClient(tracking_uri=stack.tracking_uri)


def _train(prepared_dir: Path, out: Path, **overrides) -> dict:
    args = {"stage": "probe", "settings": PROBE, "arch": TEST_ARCH, "weights": "packaged",
            "init_dir": None, "experiment": "faults", "pipeline_run_id": uuid.uuid4().hex}
    return train_step(prepared_dir, out, **(args | overrides))


def _stage_run(stack: StackInfo, out: Path):
    return _direct(stack).get_run(json.loads((out / STAGE_RUN_FILE).read_text())["run_id"])


def _only_run(stack: StackInfo, pipeline_run_id: str, stage: str):
    client = _direct(stack)
    experiment = client.get_experiment_by_name("faults")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`thaw.stage` = '{stage}'")
    parents = {r.info.run_id for r in client.search_runs(
        [experiment.experiment_id], f"tags.`thaw.pipeline_run_id` = '{pipeline_run_id}'")}
    (run,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents]
    return run


# --- S3 ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_outage_is_ridden_out_by_retries(stack, s3_proxy, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.S3_ATTEMPTS_ENV, "14")
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights" * 1000)
    uri = _uri(stack, "w.bin")
    s3_proxy.down(1.5)
    started = time.monotonic()
    storage.upload_file(src, uri)
    assert s3_proxy.dropped > 0 and time.monotonic() - started >= 1.0  # it waited it out
    s3_proxy.down(1.5)
    got = storage.download_file(uri, tmp_path / "back" / "w.bin")
    assert got.read_bytes() == src.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["refused", "dropped"])
@pytest.mark.parametrize("operation", ["list", "upload", "download"])
def test_s3_that_stays_down_fails_clearly_in_bounded_time(stack, s3_proxy, tmp_path,
                                                          monkeypatch, mode, operation):
    monkeypatch.setenv(storage.S3_ATTEMPTS_ENV, "3")
    endpoint = s3_proxy.url
    if mode == "refused":
        endpoint = f"http://127.0.0.1:{_free_port()}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    else:
        s3_proxy.down()
    src = tmp_path / "x.bin"
    src.write_bytes(b"x")
    uri = _uri(stack, "x.bin")
    calls = {"list": lambda: storage.list_s3_objects(uri),
             "upload": lambda: storage.upload_file(src, uri),
             "download": lambda: storage.download_file(uri, tmp_path / "dl" / "x.bin")}
    started = time.monotonic()
    with pytest.raises(Unreachable, match=rf"S3 endpoint {re.escape(endpoint)} unreachable "
                       rf"after 3 attempts over [\d.]+ s.*{re.escape(uri)}.*AWS_MAX_ATTEMPTS"):
        calls[operation]()
    assert time.monotonic() - started < 15
    assert not (tmp_path / "dl").exists() or not any((tmp_path / "dl").iterdir())


def test_bad_attempts_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.S3_ATTEMPTS_ENV, "lots")
    with pytest.raises(ThawError, match="AWS_MAX_ATTEMPTS='lots' is not valid"):
        storage.s3_client()


@pytest.mark.slow
def test_a_failed_checkpoint_upload_fails_the_step(stack, s3_proxy, prepared_sample,
                                                   tmp_path, monkeypatch):
    """Training whose checkpoints cannot reach their S3 mirror raises instead of reporting
    success, and its MLflow run says why."""
    monkeypatch.setenv(storage.S3_ATTEMPTS_ENV, "2")
    root = _uri(stack, "checkpoints")
    monkeypatch.setenv(CHECKPOINT_ROOT_ENV, root)
    bucket, prefix = storage.split_s3_uri(root)
    s3_proxy.trip_on(f"PUT /{bucket}/{prefix}/".encode())  # the first checkpoint upload
    pipeline_run = uuid.uuid4().hex
    with pytest.raises(Unreachable, match=rf"S3 endpoint {re.escape(s3_proxy.url)} unreachable"):
        _train(prepared_sample.root, tmp_path / "out", pipeline_run_id=pipeline_run)
    assert s3_proxy.tripped
    assert not (tmp_path / "out" / STAGE_RUN_FILE).exists()
    run = _only_run(stack, pipeline_run, "probe")
    assert run.info.status == "FAILED"
    assert "unreachable" in run.data.tags["thaw.error"]


# --- MLflow -----------------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_outage_at_the_end_of_training_is_ridden_out(stack, mlflow_proxy,
                                                            prepared_sample, tmp_path):
    mlflow_proxy.trip_on(FINISH_MARKER, seconds=1.5)
    summary = _train(prepared_sample.root, tmp_path / "out")
    assert mlflow_proxy.tripped
    run = _stage_run(stack, tmp_path / "out")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_epoch"] == summary["best_epoch"]
    assert "result.json" in {f.path for f in _direct(stack).list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_mlflow_down_after_training_keeps_the_model_and_fails_clearly(
        stack, mlflow_proxy, prepared_sample, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    mlflow_proxy.trip_on(FINISH_MARKER)
    out = tmp_path / "out"
    started = time.monotonic()
    with pytest.raises(Unreachable, match=rf"stage probe trained and its outputs are complete "
                       rf"in {re.escape(str(out))}.*MLflow tracking server "
                       rf"{re.escape(mlflow_proxy.url)} unreachable after 2 attempts"
                       rf".*Run the step again"):
        _train(prepared_sample.root, out)
    assert time.monotonic() - started < 120
    # Everything the stage made is there, complete.
    result = json.loads((out / "result.json").read_text())
    assert load_checkpoint(out / "best.pt")["meta"]["epoch"] == result["best_epoch"]
    assert _stage_run(stack, out).info.status == "RUNNING"  # never marked done
    assert not list(out.glob(".*.part"))

    # Once MLflow is back, running the step again resumes and the records catch up.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.tracking_uri)
    summary = _train(prepared_sample.root, out)
    assert summary["best_epoch"] == result["best_epoch"]
    assert summary["best_val"] == result["best_val"]
    assert _stage_run(stack, out).info.status == "FINISHED"


class _BringBackOn(logging.Handler):
    """Brings ``proxy`` back up when a record containing ``text`` is logged: the outage
    ends exactly after training went on without MLflow, whatever the machine's speed."""

    def __init__(self, proxy: FlakyProxy, text: str) -> None:
        super().__init__()
        self.proxy, self.text, self.seen = proxy, text, 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen += 1
            self.proxy.up()


@pytest.mark.slow
def test_mlflow_down_as_a_stage_starts_does_not_stop_training(
        stack, mlflow_proxy, prepared_sample, tmp_path, monkeypatch):
    """Issue 20: a tracking outage must never kill training. MLflow is down when the stage
    starts; training goes on, and the run opens at the first epoch end with its params,
    its dataset and every epoch's metrics."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow_proxy.down()
    bring_back = _BringBackOn(mlflow_proxy, "goes on without its MLflow run")
    logging.getLogger("thaw.stage_run").addHandler(bring_back)
    try:
        summary = _train(prepared_sample.root, tmp_path / "out",
                         settings={**PROBE, "epochs": 2, "patience": 5})
    finally:
        logging.getLogger("thaw.stage_run").removeHandler(bring_back)
    assert bring_back.seen == 1 and mlflow_proxy.dropped > 0
    run = _stage_run(stack, tmp_path / "out")
    assert run.info.status == "FINISHED"
    assert run.data.params["arch"] == TEST_ARCH
    history = _direct(stack).get_metric_history(run.info.run_id, "val_macro_f1")
    assert sorted(m.step for m in history) == [r["epoch"] for r in summary["history"]]
    assert len(history) == 3  # the starting point (epoch 0) and both epochs
    assert len(run.inputs.dataset_inputs) == 1


@pytest.mark.slow
def test_mlflow_down_for_a_whole_stage_keeps_the_model_and_fails_at_the_end(
        stack, mlflow_proxy, prepared_sample, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow_proxy.down()
    out = tmp_path / "out"
    with pytest.raises(Unreachable, match=r"stage probe trained and its outputs are complete "
                                          r".*run \(never opened\).*Run the step again"):
        _train(prepared_sample.root, out)
    result = json.loads((out / "result.json").read_text())
    assert load_checkpoint(out / "best.pt")["meta"]["epoch"] == result["best_epoch"]
    assert not (out / STAGE_RUN_FILE).exists()


@pytest.mark.slow
def test_failing_to_mark_a_run_failed_never_hides_the_original_error(
        stack, mlflow_proxy, prepared_sample, tmp_path, monkeypatch, caplog):
    """Training fails on bad input while MLflow is down: the input error is the one raised,
    the tracking failure is a note and a log line, and the retry marker is still left."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv(CHECKPOINT_ROOT_ENV, str(tmp_path / "mirror"))
    secret = stack.secret_access_key
    weights = f"/nonexistent/{secret}/w.pth"
    mlflow_proxy.trip_on(b"/runs/log-inputs")  # the last call before training starts
    pipeline_run = uuid.uuid4().hex
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ThawError, match="weights file not found") as raised:
        _train(prepared_sample.root, tmp_path / "out", weights=weights,
               pipeline_run_id=pipeline_run)
    assert not isinstance(raised.value, Unreachable)
    notes = "\n".join(raised.value.__notes__)
    assert "could not mark MLflow run" in notes and mlflow_proxy.url in notes
    assert any(r.levelno == logging.ERROR and "could not mark MLflow run" in r.getMessage()
               for r in caplog.records)
    marker = json.loads((tmp_path / "mirror" / pipeline_run / "probe" / FAILURE_FILE)
                        .read_text())
    assert "weights file not found" in marker["error"]
    assert secret not in caplog.text and secret not in notes and secret not in marker["error"]
    run = _only_run(stack, pipeline_run, "probe")
    assert run.info.status == "RUNNING"  # MLflow never heard; the exit handler closes it
    assert secret not in json.dumps(run.data.params)
