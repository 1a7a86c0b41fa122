"""Cluster settings applied at compile time (`thaw compile --config cluster.yaml`).

Everything about *where* the pipeline runs lives here, not in the pipeline's parameters:
the image, the pipeline root, which Secret and ConfigMap the steps read their environment
from (credentials are referenced by name only, never written into the YAML), GPU requests
and scheduling (node selector and tolerations on GPU steps only), resources, retries and
caching per step. ``infra/cluster.example.yaml`` documents every field.

Pure standard library + PyYAML, so pipelines compile on a machine without torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from components import DEFAULT_IMAGE

STEP_KINDS = ("source_version", "preprocess", "train", "launcher", "evaluate", "register",
              "finalize")
GPU_STEPS = ("train", "evaluate", "register")  # register scores stages and champion
TOLERATION_OPERATORS = ("Equal", "Exists")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


class SettingsError(ValueError):
    """A cluster settings file that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Retry:
    """KFP's retry policy for a step (``set_retry``)."""

    num_retries: int = 0
    backoff_duration: str = "60s"
    backoff_factor: float = 2.0
    backoff_max_duration: str = "3600s"


@dataclass(frozen=True)
class Step:
    """Resources, retries and caching of one kind of step. ``scratch`` sizes an emptyDir
    mounted at /tmp (the step's ephemeral storage: downloads, decoded shards)."""

    cpu: str | None = None
    memory: str | None = None
    scratch: str | None = None
    retry: Retry = field(default_factory=Retry)
    cache: bool = False


@dataclass(frozen=True)
class Toleration:
    key: str | None = None
    operator: str = "Equal"
    value: str | None = None
    effect: str | None = None


@dataclass(frozen=True)
class Gpu:
    """What the GPU steps (train, evaluate, register) request and where they may be scheduled."""

    resource: str = "nvidia.com/gpu"
    count: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[Toleration] = field(default_factory=list)


@dataclass(frozen=True)
class Training:
    """How the partial and full stages spread over GPUs (the probe fits a head on cached
    features: it always trains on one).

    ``gpus_per_node`` > 1: each of those steps requests that many GPUs and runs one torchrun
    process per GPU in its pod. ``num_nodes`` > 1: each becomes a launcher (step kind
    ``launcher``: no GPU) that runs the stage as a Kubeflow Trainer TrainJob of ``num_nodes``
    nodes x ``gpus_per_node`` GPUs on runtime ``trainer_runtime``, which must start within
    ``start_timeout_s`` and finish within ``timeout_s``; its nodes get the ``train`` step's
    CPU and memory and the GPU node selector and tolerations."""

    gpus_per_node: int = 1
    num_nodes: int = 1
    trainer_runtime: str = "torch-distributed"
    start_timeout_s: int = 1800
    timeout_s: int = 48 * 3600

    @property
    def launches_trainjobs(self) -> bool:
        return self.num_nodes > 1


def _default_steps() -> dict[str, Step]:
    return {
        "source_version": Step(cpu="1", memory="1G"),
        "preprocess": Step(cpu="4", memory="16G", cache=True),
        "train": Step(cpu="8", memory="32G",
                      retry=Retry(num_retries=2, backoff_duration="60s")),
        # follows a TrainJob; a retry starts a new one, which resumes from the checkpoints
        "launcher": Step(cpu="1", memory="2G",
                         retry=Retry(num_retries=2, backoff_duration="60s")),
        "evaluate": Step(cpu="4", memory="16G",
                         retry=Retry(num_retries=2, backoff_duration="30s")),
        "register": Step(cpu="4", memory="16G"),
        "finalize": Step(cpu="1", memory="1G"),
    }


@dataclass(frozen=True)
class ClusterSettings:
    image: str = DEFAULT_IMAGE
    pipeline_root: str | None = None
    s3_secret: str = "thaw-s3-credentials"
    config_map: str = "thaw-config"
    mlflow_tracking_uri: str | None = None
    gpu: Gpu = field(default_factory=Gpu)
    training: Training = field(default_factory=Training)
    steps: dict[str, Step] = field(default_factory=_default_steps)

    def step(self, kind: str) -> Step:
        return self.steps[kind]


def load_settings(path: str | Path | None) -> ClusterSettings:
    """Read and validate a settings file; ``None`` gives the defaults. Step entries in the
    file override the defaults field by field, so a file names only what differs."""
    if path is None:
        return ClusterSettings()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SettingsError(f"cannot read cluster settings {path}: {err}") from err
    return settings_from_dict(data, where=str(path))


def settings_from_dict(data: Any, where: str = "settings") -> ClusterSettings:
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: expected a mapping at the top level")
    steps = data.get("steps") or {}
    if not isinstance(steps, dict):
        raise SettingsError(f"{where}: steps must be a mapping of step kind to settings")
    unknown = sorted(set(steps) - set(STEP_KINDS))
    if unknown:
        raise SettingsError(f"{where}: unknown step(s) {unknown}; steps are {list(STEP_KINDS)}")
    defaults = _default_steps()
    merged = {kind: _merge(defaults[kind], steps.get(kind) or {}, f"{where}: steps.{kind}")
              for kind in STEP_KINDS}
    settings = _build(ClusterSettings, {**data, "steps": {}}, where)
    settings = dataclasses.replace(settings, steps=merged)
    _check(settings, where)
    return settings


def _merge(default: Step, override: Any, where: str) -> Step:
    if not isinstance(override, dict):
        raise SettingsError(f"{where}: expected a mapping")
    retry = override.get("retry")
    if retry is not None:
        base = dataclasses.asdict(default.retry)
        if not isinstance(retry, dict):
            raise SettingsError(f"{where}.retry: expected a mapping")
        override = {**override, "retry": {**base, **retry}}
    return _build(Step, {**dataclasses.asdict(default), **override}, where)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)`` with every value checked against the field's annotation."""
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SettingsError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    return cls(**{name: _value(hints[name], value, f"{where}.{name}")
                  for name, value in data.items()})


def _value(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise SettingsError(f"{where}: expected a mapping, got {value!r}")
        return {_value(args[0], k, where): _value(args[1], v, f"{where}.{k}")
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise SettingsError(f"{where}: expected a list, got {value!r}")
        return [_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # cpu: 4 in YAML means "4"
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise SettingsError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _check(settings: ClusterSettings, where: str) -> None:
    problems = []
    if not settings.image or any(c.isspace() for c in settings.image):
        problems.append(f"image must be a container image reference, got {settings.image!r}")
    root = settings.pipeline_root
    if root is not None and not root.startswith(("s3://", "minio://", "gs://")):
        problems.append(f"pipeline_root must be an s3://, minio:// or gs:// URI, got {root!r}")
    if settings.mlflow_tracking_uri and urlsplit(settings.mlflow_tracking_uri).password:
        problems.append("mlflow_tracking_uri must not carry a password (user:password@): it "
                        "would be written into the compiled pipeline in plain text; put "
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the Secret")
    if settings.gpu.count < 0:
        problems.append(f"gpu.count must be >= 0, got {settings.gpu.count}")
    training = settings.training
    for name in ("gpus_per_node", "num_nodes", "start_timeout_s", "timeout_s"):
        if getattr(training, name) < 1:
            problems.append(f"training.{name} must be >= 1, got {getattr(training, name)}")
    if training.start_timeout_s > training.timeout_s:
        problems.append("training.start_timeout_s must not exceed training.timeout_s")
    if training.gpus_per_node > 1 and not settings.gpu.count:
        problems.append("training.gpus_per_node > 1 needs GPU steps (gpu.count >= 1)")
    for i, tol in enumerate(settings.gpu.tolerations):
        if tol.operator not in TOLERATION_OPERATORS:
            problems.append(f"gpu.tolerations[{i}].operator must be one of "
                            f"{TOLERATION_OPERATORS}, got {tol.operator!r}")
        if tol.effect is not None and tol.effect not in TOLERATION_EFFECTS:
            problems.append(f"gpu.tolerations[{i}].effect must be one of "
                            f"{TOLERATION_EFFECTS}, got {tol.effect!r}")
    for kind, step in settings.steps.items():
        if step.retry.num_retries < 0:
            problems.append(f"steps.{kind}.retry.num_retries must be >= 0")
        if step.retry.backoff_factor < 1:
            problems.append(f"steps.{kind}.retry.backoff_factor must be >= 1")
    if problems:
        raise SettingsError(f"{where}: " + "; ".join(problems))
