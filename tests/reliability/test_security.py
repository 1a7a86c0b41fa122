"""Security: files thaw loads never run code, the registered model holds no pickle and no
credential, and the embedded stack is reachable from this machine only."""

from __future__ import annotations

import argparse
import ast
import contextlib
import ipaddress
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.models.model import ModelInfo

import thaw
from thaw.backbones import create_backbone, data_config
from thaw.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from thaw.errors import ThawError
from thaw.serving import ImageClassifier, log_classifier
from thaw.stack import Stack, StackInfo, add_stack_commands

ARCH = "efficientnet_lite0"
CLASSES = ["cat", "dog"]


def _marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('this ran')"


class _RunsCode:
    """Unpickling this runs ``code``: the classic trojaned checkpoint."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


class _RunsCommand:
    """Unpickling this runs a shell command through ``os.system``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def _torch_file(path: Path, marker: Path) -> tuple[Path, str]:
    """A torch.save zip that looks like a thaw checkpoint, its weights a code-running object."""
    torch.save({"format": FORMAT, "arch": ARCH, "meta": {"classes": CLASSES},
                "model": _RunsCode(_marker_code(marker))}, path)
    return path, "exec"


def _plain_pickle(path: Path, marker: Path) -> tuple[Path, str]:
    """A bare pickle (torch.load reads those too) calling os.system."""
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _RunsCommand(f"touch {marker}")}, handle, protocol=2)
    return path, "system"


TROJANS = {"torch.save zip, exec": _torch_file, "bare pickle, os.system": _plain_pickle}


def _serve(path: Path) -> None:
    ImageClassifier().load_context(
        mlflow.pyfunc.PythonModelContext(artifacts={"checkpoint": str(path)}, model_config=None))


LOADERS: dict[str, Callable[[Path], Any]] = {
    "checkpoint": load_checkpoint,
    "weights file": lambda path: create_backbone(ARCH, len(CLASSES), str(path)),
    "weights file:// URI": lambda path: create_backbone(ARCH, len(CLASSES), f"file://{path}"),
    "checkpoint to log as a model": log_classifier,
    "checkpoint of a served model": _serve,
}


@pytest.mark.parametrize("craft", TROJANS.values(), ids=TROJANS.keys())
def test_the_crafted_files_do_run_code_when_unpickled(tmp_path: Path, craft) -> None:
    """The control: without weights_only these files run their code (so the refusals below
    are refusals, not harmless files)."""
    marker = tmp_path / "marker"
    path, _ = craft(tmp_path / "evil.pt", marker)
    # A bare pickle runs its code, then torch.load finds no magic number after it.
    with contextlib.suppress(RuntimeError):
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("load", LOADERS.values(), ids=LOADERS.keys())
@pytest.mark.parametrize("craft", TROJANS.values(), ids=TROJANS.keys())
def test_a_file_that_would_run_code_is_refused_unrun(tmp_path: Path, craft, load) -> None:
    marker = tmp_path / "marker"
    path, function = craft(tmp_path / "evil.pt", marker)
    refused = rf"refused to load .*{re.escape(str(path))}.* pickled Python objects.*never runs"
    with pytest.raises(ThawError, match=refused) as raised:
        load(path)
    assert not marker.exists()
    assert "weights_only=False" not in str(raised.value)  # no advice to run the code
    if load is load_checkpoint:  # torch's own message names what it would have imported
        assert function in str(raised.value)


def test_a_plain_state_dict_still_loads(tmp_path: Path) -> None:
    """The refusal is of code, not of .pth files: a state dict of tensors loads."""
    path = tmp_path / "plain.pth"
    torch.save(create_backbone(ARCH, 5, "none").state_dict(), path)
    assert create_backbone(ARCH, len(CLASSES), str(path)).num_classes == len(CLASSES)


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_every_torch_load_in_thaw_is_weights_only() -> None:
    """torch.load, and timm's wrapper of it, always with weights_only=True; no pickle module."""
    loads, pickles = [], []
    for source in Path(thaw.__file__).parent.rglob("*.py"):
        tree = ast.parse(source.read_text())
        for call in _calls(tree):
            name = _dotted(call.func)
            if name in ("torch.load", "timm.models.load_state_dict", "timm.models.load_checkpoint"):
                flags = {k.arg: getattr(k.value, "value", None) for k in call.keywords}
                loads.append((f"{source.name}:{call.lineno}", flags.get("weights_only")))
        pickles += [f"{source.name}:{node.lineno}" for node in ast.walk(tree)
                    if isinstance(node, ast.Import | ast.ImportFrom)
                    and {"pickle", "cloudpickle", "dill", "joblib"} & {
                        (alias.name if isinstance(node, ast.Import) else node.module or "")
                        .split(".")[0] for alias in node.names}]
    assert len(loads) >= 3, loads  # checkpoints, packaged weights, weights files
    assert all(weights_only is True for _, weights_only in loads), loads
    assert not pickles


# --- the registered model ------------------------------------------------------------------

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKETHAWKEY7Q2X",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-Q7xZ93kdTq",
    "AWS_SESSION_TOKEN": "fake-session-token-Lm28WqPe",
    "MLFLOW_TRACKING_USERNAME": "thaw-user-Rk51",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-Hy43Nc",
    "PIP_INDEX_URL": "https://__token__:fake-pip-token-Zd90Ua@pypi.example.com/simple",
}
# In the working directory's pyproject.toml, which MLflow would copy into a model by default.
INDEX_TOKEN = "fake-uv-index-token-Vb62Ks"


@pytest.fixture(scope="module")
def registered(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[str, ModelInfo]:
    """A tiny classifier logged and registered as champion from a uv project directory,
    with fake secrets in the environment."""
    checkpoint = tmp_path_factory.mktemp("ckpt") / "best.pt"
    model = create_backbone(ARCH, len(CLASSES), "packaged")
    save_checkpoint(checkpoint, model, {"classes": CLASSES, "stage": "full",
                                        "data_config": data_config(ARCH, 64)})
    project = tmp_path_factory.mktemp("project")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "mine"\nversion = "0"\n\n[[tool.uv.index]]\nname = "private"\n'
        f'url = "https://__token__:{INDEX_TOKEN}@pypi.example.com/simple"\n')
    (project / "uv.lock").write_text(f'version = 1\n# {INDEX_TOKEN}\n')
    name = f"security-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        for key, value in SECRETS.items():
            patch.setenv(key, value)
        run = MlflowClient().create_run(MlflowClient().create_experiment(name))
        info = log_classifier(checkpoint, registered_model_name=name, run_id=run.info.run_id)
    MlflowClient().set_registered_model_alias(name, "champion", info.registered_model_version)
    return name, info


@pytest.mark.slow
def test_the_registered_model_holds_no_credential(registered, tmp_path: Path) -> None:
    _, info = registered
    tree = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    files = [path for path in tree.rglob("*") if path.is_file()]
    names = {str(path.relative_to(tree)) for path in files}
    # The whole model is there to search: metadata, environment, code, checkpoint.
    assert {"MLmodel", "requirements.txt", "conda.yaml", "python_env.yaml",
            "image_classifier.py", "artifacts/best.pt", "code/thaw/serving.py"} <= names, names
    assert not {"pyproject.toml", "uv.lock"} & names
    found = {(str(path.relative_to(tree)), secret) for path in files
             for secret in [*SECRETS.values(), INDEX_TOKEN] if secret.encode() in path.read_bytes()}
    assert not found


LOAD_WITHOUT_PICKLE = """
import json, sys
import mlflow, numpy as np
from mlflow.exceptions import MlflowException

model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict([np.zeros((20, 30, 3), np.uint8), np.full((50, 10), 200, np.uint8)])
try:
    mlflow.pyfunc.load_model(sys.argv[2])
    pickled = "loaded"
except MlflowException as err:
    pickled = str(err)
print(json.dumps({"labels": out["label"].tolist(), "pickled": pickled}))
"""


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return model_input


@pytest.mark.slow
def test_the_registered_model_loads_with_pickle_deserialization_off(registered,
                                                                    tmp_path: Path) -> None:
    name, _ = registered
    pickled = tmp_path / "pickled"  # the control: a classic cloudpickled pyfunc
    mlflow.pyfunc.save_model(str(pickled), python_model=_Echo(), pip_requirements=["mlflow"])
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PICKLE, f"models:/{name}@champion",
                           str(pickled)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["labels"]) == 2 and set(result["labels"]) <= set(CLASSES)
    assert "pickle is disallowed" in result["pickled"]  # the setting is in force


# --- the embedded stack --------------------------------------------------------------------

LISTEN = "0A"


def _proc_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address of /proc/net/tcp{,6}: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def _listening_on(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of the TCP sockets listening on ``port`` (all processes)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, _remote, state = line.split()[1:4]
            address, hex_port = local.split(":")
            if state == LISTEN and int(hex_port, 16) == port:
                found.append(_proc_address(address))
    return found


def _outward_address() -> str | None:
    """This machine's address towards other machines, if it has one (a UDP connect sends
    nothing; it only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # TEST-NET-2: never contacted
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if ipaddress.ip_address(address).is_loopback else address


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_stack_servers_listen_on_loopback_only(stack: StackInfo) -> None:
    for port in (stack.s3_port, stack.mlflow_port):
        listening = _listening_on(port)
        assert listening, f"nothing listens on port {port}"
        assert all(address.is_loopback for address in listening), (port, listening)


@pytest.mark.slow
def test_stack_servers_cannot_be_reached_from_another_interface(stack: StackInfo) -> None:
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    for port in (stack.s3_port, stack.mlflow_port):
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex(("127.0.0.1", port)) == 0
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex((address, port)) != 0, f"port {port} answers on {address}"


@pytest.mark.slow
def test_stack_says_it_listens_on_loopback_only(stack: StackInfo,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_stack_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["stack", "env", "--state-dir", str(stack.state_dir)])
    args.func(args)
    assert "listen on 127.0.0.1 only" in capsys.readouterr().out


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.2", "example.com"])
def test_stack_refuses_a_non_loopback_host(host: str) -> None:
    with pytest.raises(ThawError, match=rf"loopback only: host must be 127\.0\.0\.1.*{host!r}"):
        Stack(host=host)
