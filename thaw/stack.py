"""The embedded stack: a local S3-compatible server (moto) and a real MLflow tracking server
with model registry, both on loopback, for `make demo` and the end-to-end tests.

Loopback only: neither server checks credentials (moto accepts any key, the MLflow server has
no auth), so both bind 127.0.0.1 and nothing else; `Stack` refuses a non-loopback host and
`thaw stack up` says where they listen. Other machines cannot reach them; for a shared setup
use a real S3/MinIO and MLflow server with authentication.

`thaw stack up` starts both as detached processes and records them in `<state>/stack.json`;
`thaw stack down` stops them; `thaw stack env` prints what a client process needs
(`eval "$(thaw stack env)"`). MLflow runs with proxied artifacts
(`--artifacts-destination s3://<bucket>/mlflow`), so MLflow clients never need S3
credentials; thaw's own storage code talks to the S3 server directly.

Real endpoints: when `MLFLOW_TRACKING_URI` and `AWS_ENDPOINT_URL` (or real AWS) are already
configured, simply don't start the stack; nothing in thaw depends on it. `stack env` prints
nothing unless a stack is running, so it never overrides such settings by accident.

The stack is scratch space: moto keeps objects in memory, so a fresh start also wipes the
MLflow database (runs whose artifacts are gone would only confuse). Reusing a running stack
(`stack up` twice) keeps everything. Before the server starts, `mlflow db upgrade` brings the
database to the installed MLflow's schema, as the cluster's MLflow Deployment does in its
initContainer (infra/base/mlflow.yaml): MLflow refuses a database at an older schema.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from thaw.errors import ThawError

DEFAULT_STATE_DIR = Path(".thaw") / "stack"
STATE_FILE = "stack.json"
S3_LOG = "s3.log"
MLFLOW_LOG = "mlflow.log"

# Loopback HTTP must not go through a proxy configured for the outside world.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Stack:
    """Settings of the embedded stack. Ports of None or 0 mean "pick a free port"."""

    state_dir: Path = DEFAULT_STATE_DIR
    host: str = "127.0.0.1"
    s3_port: int | None = None
    mlflow_port: int | None = None
    bucket: str = "thaw"
    artifact_prefix: str = "mlflow"
    access_key_id: str = "thaw-local"
    secret_access_key: str = "thaw-local-secret"  # dummy: moto accepts any credentials
    region: str = "us-east-1"
    startup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", _resolve(self.state_dir))
        if not _is_loopback(self.host):
            raise ThawError(
                f"The embedded stack has no authentication, so it listens on loopback only: "
                f"host must be 127.0.0.1 (or another 127.x address, or localhost), got "
                f"{self.host!r}. To share servers, run S3/MinIO and MLflow with authentication."
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


@dataclass(frozen=True)
class StackInfo:
    """A running stack, as recorded in `<state>/stack.json`."""

    state_dir: Path
    host: str
    s3_port: int
    mlflow_port: int
    bucket: str
    artifact_prefix: str
    access_key_id: str
    secret_access_key: str
    region: str
    s3_pid: int
    mlflow_pid: int

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def ui_url(self) -> str:
        return self.tracking_uri

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.bucket}/{self.artifact_prefix}"

    def env(self) -> dict[str, str]:
        """Environment variables a client process needs to use this stack."""
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }

    def is_healthy(self) -> bool:
        """True when both servers answer."""
        return _answers(self.s3_endpoint + "/") and _answers(self.tracking_uri + "/health")

    def to_json(self) -> str:
        data = asdict(self)
        data["state_dir"] = str(self.state_dir)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> StackInfo:
        data = json.loads(text)
        data["state_dir"] = Path(data["state_dir"])
        return cls(**data)


def read_stack(state_dir: str | os.PathLike[str] | None = None) -> StackInfo | None:
    """The stack recorded in `state_dir`, or None if there is none (it may not be healthy)."""
    path = _resolve(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return StackInfo.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as exc:
        raise ThawError(f"{path} is not a valid stack state file ({exc}); delete it.") from exc


def stack_up(state_dir: str | os.PathLike[str] | None = None, **settings: Any) -> StackInfo:
    """Start the stack (see `Stack` for `settings`), or reuse the one already running there."""
    stack = Stack(state_dir=_resolve(state_dir), **settings)
    running = read_stack(stack.state_dir)
    if running is not None:
        if running.is_healthy():
            _check_compatible(stack, running)
            return running
        _stop(running)  # half-dead leftovers: clear them before starting afresh
    return _start(stack)


def stack_down(state_dir: str | os.PathLike[str] | None = None) -> bool:
    """Stop the stack recorded in `state_dir`. Returns False if none was recorded."""
    info = read_stack(state_dir)
    if info is None:
        return False
    _stop(info)
    return True


@contextlib.contextmanager
def running_stack(state_dir: str | os.PathLike[str], **settings: Any) -> Iterator[StackInfo]:
    """Stack up on enter, down on exit (for tests and scripts)."""
    info = stack_up(state_dir, **settings)
    try:
        yield info
    finally:
        stack_down(info.state_dir)


def _resolve(state_dir: str | os.PathLike[str] | None) -> Path:
    # Absolute, so the sqlite URI and stack.json stay valid from any working directory.
    return Path(state_dir or DEFAULT_STATE_DIR).expanduser().resolve()


def _check_compatible(stack: Stack, running: StackInfo) -> None:
    asked = {"s3_port": stack.s3_port, "mlflow_port": stack.mlflow_port, "bucket": stack.bucket}
    clash = [k for k, v in asked.items() if v and v != getattr(running, k)]
    if clash:
        have = ", ".join(f"{k}={getattr(running, k)}" for k in clash)
        raise ThawError(
            f"A stack is already running in {stack.state_dir} with {have}; "
            "run `thaw stack down` first to start one with other settings."
        )


def _start(stack: Stack) -> StackInfo:
    if importlib.util.find_spec("moto") is None:
        raise ThawError("The embedded stack needs moto's S3 server: pip install 'moto[server]'.")
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    s3_port = _pick_port(stack.host, stack.s3_port, "S3")
    mlflow_port = _pick_port(stack.host, stack.mlflow_port, "MLflow", avoid=s3_port)
    db = stack.state_dir / "mlflow.db"
    db.unlink(missing_ok=True)
    s3_endpoint = f"http://{stack.host}:{s3_port}"

    started: list[int] = []
    try:
        s3 = _spawn(_s3_command(stack.host, s3_port), os.environ.copy(), stack.state_dir / S3_LOG)
        started.append(s3.pid)
        _wait_until_up(s3, s3_endpoint + "/", stack.state_dir / S3_LOG, "S3", stack)
        _create_bucket(stack, s3_endpoint)

        server_env = {
            **os.environ,
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_ENDPOINT_URL_S3": s3_endpoint,
            "AWS_ACCESS_KEY_ID": stack.access_key_id,
            "AWS_SECRET_ACCESS_KEY": stack.secret_access_key,
            "AWS_DEFAULT_REGION": stack.region,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # The job executor spawns seven background worker processes we never use.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        destination = f"s3://{stack.bucket}/{stack.artifact_prefix}"
        upgrade_schema(f"sqlite:///{db}", server_env)
        mlflow = _spawn(
            _mlflow_command(stack.host, mlflow_port, f"sqlite:///{db}", destination),
            server_env,
            stack.state_dir / MLFLOW_LOG,
        )
        started.append(mlflow.pid)
        tracking_uri = f"http://{stack.host}:{mlflow_port}"
        _wait_until_up(
            mlflow, tracking_uri + "/health", stack.state_dir / MLFLOW_LOG, "MLflow", stack
        )
    except BaseException:
        for pid in started:
            _kill_group(pid)
        raise

    info = StackInfo(
        state_dir=stack.state_dir,
        host=stack.host,
        s3_port=s3_port,
        mlflow_port=mlflow_port,
        bucket=stack.bucket,
        artifact_prefix=stack.artifact_prefix,
        access_key_id=stack.access_key_id,
        secret_access_key=stack.secret_access_key,
        region=stack.region,
        s3_pid=s3.pid,
        mlflow_pid=mlflow.pid,
    )
    (stack.state_dir / STATE_FILE).write_text(info.to_json())
    return info


def _s3_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]


def _mlflow_command(host: str, port: int, backend_uri: str, destination: str) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", destination,
        "--workers", "1",
    ]  # fmt: skip


def upgrade_schema(backend_uri: str, env: dict[str, str]) -> None:
    """`mlflow db upgrade BACKEND_URI`: create the tables of an empty database, migrate an old
    one to the installed MLflow's schema (the MLflow server refuses an out-of-date one)."""
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "db", "upgrade", backend_uri],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, check=False,
    )
    if done.returncode != 0:
        output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise ThawError(f"`mlflow db upgrade` of {backend_uri} failed:\n{output}")


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a detached server (its own session, so it outlives `thaw stack up`)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _pick_port(host: str, port: int | None, what: str, avoid: int | None = None) -> int:
    """The requested port if it is free (else a clear error), or a free one."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port or 0))
            except (OSError, OverflowError) as exc:
                raise ThawError(
                    f"Cannot start the {what} server: port {port} on {host} is not available "
                    f"({exc}). Choose another port or leave it unset to pick a free one."
                ) from exc
            chosen = sock.getsockname()[1]
        if chosen != avoid:
            return chosen


def _answers(url: str) -> bool:
    """Whether a server answers `GET url` with a 2xx status."""
    try:
        with _HTTP.open(url, timeout=2):
            return True
    except (OSError, ValueError):  # URLError and HTTPError are OSErrors
        return False


def _wait_until_up(
    proc: subprocess.Popen[bytes], url: str, log: Path, what: str, stack: Stack
) -> None:
    deadline = time.monotonic() + stack.startup_timeout_s
    while not _answers(url):
        if proc.poll() is not None:
            problem = f"exited with status {proc.returncode}"
            break
        if time.monotonic() > deadline:
            problem = f"did not answer at {url} within {stack.startup_timeout_s:.0f} s"
            break
        time.sleep(0.2)
    else:
        return
    raise ThawError(f"The {what} server {problem}. Last lines of {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _create_bucket(stack: Stack, endpoint: str) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=stack.access_key_id,
        aws_secret_access_key=stack.secret_access_key,
        region_name=stack.region,
    )
    try:
        s3.create_bucket(Bucket=stack.bucket)
    except (BotoCoreError, ClientError) as exc:
        raise ThawError(f"Cannot create bucket {stack.bucket!r} on {endpoint}: {exc}") from exc


def _stop(info: StackInfo) -> None:
    for pid, marker in ((info.mlflow_pid, "mlflow"), (info.s3_pid, "moto")):
        if _is_ours(pid, marker):
            _kill_group(pid)
    (info.state_dir / STATE_FILE).unlink(missing_ok=True)


def _is_ours(pgid: int, marker: str) -> bool:
    """Guard against pid reuse: only signal a process group that still runs our server."""
    members = _group_members(pgid)
    if members is None:  # no /proc (macOS): trust the recorded pid
        return _group_alive(pgid)
    return any(marker in cmdline for cmdline in members)


def _group_members(pgid: int) -> list[str] | None:
    """Command lines of the live (not zombie) processes in a group; None without /proc."""
    proc = Path("/proc")
    if not (proc / "self").exists():
        return None
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                members.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # gone meanwhile, or not readable
    return members


def _group_alive(pgid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # reap the leader if it is our own child
    members = _group_members(pgid)
    if members is not None:
        return bool(members)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group (server, workers), SIGKILL what is left after grace."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        if not _group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.1)


def add_stack_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `stack up|down|env`; each sets `func(args) -> int` as the handler."""
    stack = subparsers.add_parser(
        "stack",
        help="local S3 + MLflow servers for demos and tests",
        description="Local S3-compatible server and MLflow tracking server on loopback.",
    )
    commands = stack.add_subparsers(dest="stack_command", required=True)

    def state_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-dir", type=Path, default=DEFAULT_STATE_DIR,
            help=f"where pids, logs and the MLflow database live (default: {DEFAULT_STATE_DIR})",
        )  # fmt: skip

    up = commands.add_parser("up", help="start the stack (or reuse a running one)")
    state_dir_arg(up)
    up.add_argument("--s3-port", type=int, default=None, help="default: a free port")
    up.add_argument("--mlflow-port", type=int, default=None, help="default: a free port")
    up.add_argument("--bucket", default=Stack.bucket)
    up.set_defaults(func=_cmd_up)

    down = commands.add_parser("down", help="stop the stack")
    state_dir_arg(down)
    down.set_defaults(func=_cmd_down)

    env = commands.add_parser("env", help="print `export` lines for a running stack")
    state_dir_arg(env)
    env.set_defaults(func=_cmd_env)


def _exports(info: StackInfo) -> str:
    lines = [f"export {k}={shlex.quote(v)}" for k, v in info.env().items()]
    listening = f"# S3 and MLflow listen on {info.host} only (loopback, no authentication)"
    return "\n".join([*lines, f"# MLflow UI: {info.ui_url}", listening])


def _cmd_up(args: argparse.Namespace) -> int:
    info = stack_up(
        args.state_dir, s3_port=args.s3_port, mlflow_port=args.mlflow_port, bucket=args.bucket
    )
    print(_exports(info))
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    if not stack_down(args.state_dir):
        print(f"No stack recorded in {args.state_dir}.", file=sys.stderr)
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    info = read_stack(args.state_dir)
    if info is None or not info.is_healthy():
        raise ThawError(
            f"No running stack in {args.state_dir}: start one with `thaw stack up`, "
            "or set MLFLOW_TRACKING_URI / AWS_ENDPOINT_URL to use real endpoints."
        )
    print(_exports(info))
    return 0
