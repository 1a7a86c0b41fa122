"""Checkpoints: a model's weights plus what is needed to rebuild and serve it.

Written atomically (temp file + rename) so a crash never leaves a half checkpoint, and
read with ``weights_only=True`` (plain tensors and Python values, no pickled code): a file
whose pickle would import a function (``os.system``, a class's ``__reduce__``) is refused
before anything in it runs, with an error that says so.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from thaw import storage
from thaw.backbone_contract import size_kwargs
from thaw.errors import ThawError

FORMAT = "thaw-checkpoint/1"
MIRRORED = ("best.pt", "last.pt")
log = logging.getLogger(__name__)
# torch (and timm's wrapper of torch.load) word it in several ways when weights_only=True
# stops a pickle that imports a function or class ("Unsupported global: GLOBAL exec", "GLOBAL
# posix.system whose module posix is blocked", "non-allowlisted pickle globals"); all say global.
REFUSED = re.compile(r"\bglobals?\b", re.IGNORECASE)


def model_arch(model: nn.Module) -> str:
    return model.pretrained_cfg["architecture"]


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any], **state: Any) -> None:
    """Save ``model``'s weights with ``meta`` (arch, classes, data_config, stage, metrics)
    and any extra training ``state`` (optimizer, scheduler, ...) for resuming."""
    payload = {"format": FORMAT, "arch": model_arch(model), "meta": meta,
               "model": model.state_dict(), **state}
    storage.write_atomic(path, lambda handle: torch.save(payload, handle), binary=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ThawError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise read_error("checkpoint", path, err) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ThawError(f"{path} is not a thaw checkpoint ({FORMAT})")
    return payload


def read_error(what: str, path: object, err: Exception) -> ThawError:
    """The error for a ``what`` file that ``torch.load(weights_only=True)`` (or timm's wrapper
    of it) failed on. torch's own message advises retrying with ``weights_only=False``, which
    would run the file's code, so it is not passed on: a pickle that imports a function is
    named as refused, anything else as unreadable."""
    text = str(err)
    if REFUSED.search(text):
        names = re.findall(r"GLOBAL ([\w.]*\w)", text)
        listed = re.search(r"Unsupported globals: (.*?)\.(?:\s|$)", text)
        names += listed.group(1).split(", ") if listed else []
        imports = f" (it would import {', '.join(sorted(set(names)))})" if names else ""
        return ThawError(
            f"refused to load {what} {path}: it holds pickled Python objects, not only "
            f"tensors and plain values{imports}, and thaw never runs code from a file it "
            f"loads. Save only tensors, e.g. torch.save(model.state_dict(), path), or use "
            f".safetensors")
    unpickler = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    reason = unpickler.group(1) if unpickler else text.strip().split(". ")[0].split("\n")[0]
    return ThawError(f"could not read {what} {path}: not a torch.save file of tensors, or "
                     f"truncated/corrupt ({type(err).__name__}: {reason})")


def model_from_checkpoint(payload: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint was saved from (no download: weights come from it)."""
    num_classes = len(payload["meta"]["classes"])
    size = payload["meta"].get("data_config", {}).get("input_size", [None])[-1]
    model = timm.create_model(payload["arch"], pretrained=False, num_classes=num_classes,
                              **size_kwargs(payload["arch"], size))
    model.reset_classifier(num_classes)
    model.load_state_dict(payload["model"])
    return model


def file_digest(path: Path) -> str:
    """sha256 of a file, read in chunks (checkpoints can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointMirror:
    """Keeps ``best.pt`` and ``last.pt`` of a training folder mirrored at ``uri`` (an
    ``s3://`` prefix or a local folder), so that a retried step, whose output folder starts
    empty, finds them again. ``uri=None`` mirrors nothing."""

    def __init__(self, uri: str | None, local_dir: Path) -> None:
        self.uri = uri.rstrip("/") if uri else None
        self.local_dir = Path(local_dir)

    def _remote(self, name: str) -> str:
        assert self.uri is not None
        return f"{self.uri}/{name}"

    def fetch_missing(self) -> None:
        """Bring back the mirrored checkpoints when the local folder has no ``last.pt``."""
        if self.uri is None or (self.local_dir / "last.pt").exists():
            return
        for name in MIRRORED:
            remote, local = self._remote(name), self.local_dir / name
            if storage.is_s3_uri(remote):
                if storage.exists(remote):
                    storage.download_file(remote, local)
            elif Path(remote).is_file():
                _copy_atomically(Path(remote), local)
        if (self.local_dir / "last.pt").exists():
            log.info("found checkpoints of an earlier attempt at %s", self.uri)

    def push(self, path: Path) -> None:
        """Copy ``path`` to the mirror (atomically on a local folder; S3 puts are atomic)."""
        if self.uri is None:
            return
        remote = self._remote(path.name)
        if storage.is_s3_uri(remote):
            storage.upload_file(path, remote)
            return
        Path(self.uri).mkdir(parents=True, exist_ok=True)
        _copy_atomically(path, Path(remote))


def _copy_atomically(src: Path, dest: Path) -> None:
    """Copy in chunks under a temporary name, then rename: never a half checkpoint."""
    with open(src, "rb") as source:
        storage.write_atomic(dest, lambda handle: shutil.copyfileobj(source, handle),
                             binary=True)
