"""Cluster settings applied at compile time (`thaw compile --config cluster.yaml`).

Everything about *where* the pipeline runs lives here, not in the pipeline's parameters:
the image, the pipeline root, which Secret and ConfigMap the steps read their environment
from (credentials are referenced by name only, never written into the YAML), GPU requests
and scheduling (node selector and tolerations on GPU steps only), resources, retries and
caching per step. ``infra/cluster.example.yaml`` documents every field.

What the Kubeflow Pipelines backend would only find out at run time is refused here, naming
the field: Kubernetes quantities the driver parses with ``resource.MustParse`` (a bad one panics
the driver), backoff factors Argo cannot read as an integer, retry windows no retry fits in.

Pure standard library + PyYAML, so pipelines compile on a machine without torch.
"""

from __future__ import annotations

import dataclasses
import re
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
# Kubernetes' quantity grammar (apimachinery pkg/api/resource/quantity.go), without a sign. The
# KFP driver parses emptyDir size limits with resource.MustParse, which panics on anything else
# (kubeflow/pipelines backend/src/v2/driver/k8s.go at 2.14.0-2.17.0).
QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[mkMGTPE]|[eE][+-]?\d+)?")
# Within that grammar, what the KFP SDK's set_cpu_limit / set_memory_limit accept
# (kfp/dsl/pipeline_task.py, kfp 2.17): the SDK takes a memory of "16K", Kubernetes wants "16k".
CPU = re.compile(r"(\d*\.)?\d+m?")
MEMORY_UNITS = {"Ei": 2**60, "E": 10**18, "Pi": 2**50, "P": 10**15, "Ti": 2**40, "T": 10**12,
                "Gi": 2**30, "G": 10**9, "Mi": 2**20, "M": 10**6, "Ki": 2**10, "k": 10**3}
MEMORY = re.compile(r"(\d+)(" + "|".join(MEMORY_UNITS) + ")?")
# Durations as the KFP SDK's set_retry reads them, in the one spelling thaw takes.
DURATION = re.compile(r"(\d+)([smhdw])")
SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
SHM_SHARE_OF_MEMORY = 4  # /dev/shm defaults to a quarter of the step's memory limit
# The environment MLflow's client reads its credentials from, per kind of authentication, and
# the Secret keys thaw maps into it (mlflow 3.17.2: mlflow/utils/credentials.py
# get_default_host_creds; mlflow/utils/rest_utils.py sends Basic or Bearer authorization).
MLFLOW_AUTH_ENV = {"basic": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
                   "token": ("MLFLOW_TRACKING_TOKEN",)}
# botocore's two checksum settings (botocore/config.py, 1.36+): "when_required" sends no CRC32
# checksums or aws-chunked trailers unless the operation demands them, which old MinIO and other
# S3-compatible stores need (KFP forces it in its launcher: kubeflow/pipelines#13314, #13315).
S3_CHECKSUM_ENV = ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")
S3_CHECKSUM_MODES = ("when_required", "when_supported")


class SettingsError(ValueError):
    """A cluster settings file that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Retry:
    """KFP's retry policy for a step (``set_retry``), as the backend hands it to Argo Workflows
    (kubeflow/pipelines ``backend/src/v2/compiler/argocompiler/container.go``, 2.14.0-2.17.0;
    Argo ``workflow/controller/operator.go`` ``processNodeRetries``, v3.6.7-v4.0.5):

    - ``backoff_duration``: the wait before the first retry; each later wait is
      ``backoff_factor`` times the one before.
    - ``backoff_factor``: a whole number. Argo reads ``backoff.factor`` as an integer
      (``util/intstr/parametrizable.go``): 1.5 errors the step instead of retrying it.
    - ``backoff_max_duration``: a WINDOW counted from the start of the step's FIRST attempt, not
      a cap on one wait: no retry starts once it has passed (nor one whose wait would end after
      it), and a retry still running when it closes is killed. ``None`` (the default) sizes it
      to the step's time budget: ``num_retries + 1`` attempts of ``training.timeout_s`` (plus
      ``training.start_timeout_s`` for launchers) and the waits between them.
    - Only a Failed attempt (non-zero exit) is retried: KFP sets no Argo ``retryPolicy``, so
      Argo's default ``OnFailure`` leaves a node in Error unretried, e.g. a pod deleted with a
      drained or lost node (kubeflow/pipelines#13386; infra/README.md says what to do).
    """

    num_retries: int = 0
    backoff_duration: str = "60s"
    backoff_factor: float = 2.0
    backoff_max_duration: str | None = None

    def waits_s(self) -> list[int]:
        """The wait before each retry, in seconds."""
        first = duration_s(self.backoff_duration)
        return [int(first * self.backoff_factor**n) for n in range(self.num_retries)]


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
    """What the GPU steps (train, evaluate, register) request and where they may be scheduled.

    ``shm_size`` limits the memory-backed emptyDir at /dev/shm through which DataLoader workers
    hand over batches. Its pages count against the step's memory limit, so it must stay below
    it; ``None`` (the default) gives a quarter of the step's memory limit."""

    resource: str = "nvidia.com/gpu"
    count: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[Toleration] = field(default_factory=list)
    shm_size: str | None = None


@dataclass(frozen=True)
class Training:
    """How the partial and full stages spread over GPUs (the probe fits a head on cached
    features: it always trains on one).

    ``gpus_per_node`` > 1: each of those steps requests that many GPUs and runs one torchrun
    process per GPU in its pod. ``num_nodes`` > 1: each becomes a launcher (step kind
    ``launcher``: no GPU) that runs the stage as a Kubeflow Trainer TrainJob of ``num_nodes``
    nodes x ``gpus_per_node`` GPUs on runtime ``trainer_runtime``, which must start within
    ``start_timeout_s`` and finish within ``timeout_s``; its nodes get the ``train`` step's
    CPU and memory and the GPU node selector and tolerations. ``timeout_s`` is also the time
    budget of one attempt of a retried step: it sizes the default retry window (``Retry``)."""

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
class MlflowAuth:
    """Credentials for an MLflow server behind authentication: the Secret that holds them and
    their kind. ``basic``: keys MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; ``token``:
    key MLFLOW_TRACKING_TOKEN (sent as a bearer token). Each step and TrainJob node gets them as
    the environment variables of the same names, which MLflow's client reads by itself."""

    secret: str
    kind: str = "basic"

    @property
    def keys(self) -> tuple[str, ...]:
        return MLFLOW_AUTH_ENV[self.kind]


@dataclass(frozen=True)
class ClusterSettings:
    image: str = DEFAULT_IMAGE
    pipeline_root: str | None = None
    s3_secret: str = "thaw-s3-credentials"
    config_map: str = "thaw-config"
    mlflow_tracking_uri: str | None = None
    # None: the MLflow server takes anyone (in-cluster, no auth); else where its credentials are.
    mlflow_auth: MlflowAuth | None = None
    # AWS_REQUEST_CHECKSUM_CALCULATION and AWS_RESPONSE_CHECKSUM_VALIDATION of every step.
    s3_checksums: str = "when_required"
    gpu: Gpu = field(default_factory=Gpu)
    training: Training = field(default_factory=Training)
    steps: dict[str, Step] = field(default_factory=_default_steps)

    def step(self, kind: str) -> Step:
        return self.steps[kind]

    def retry_window(self, kind: str) -> str:
        """The step's ``backoff_max_duration``: as set, or long enough for every attempt to
        run its whole time budget and every wait between them."""
        retry = self.step(kind).retry
        if retry.backoff_max_duration is not None:
            return retry.backoff_max_duration
        budget = self.training.timeout_s
        if kind == "launcher":
            budget += self.training.start_timeout_s
        return f"{(retry.num_retries + 1) * budget + sum(retry.waits_s())}s"

    def shm_size(self, kind: str) -> str | None:
        """The size limit of a GPU step's /dev/shm (None: the step has no memory limit)."""
        memory = self.step(kind).memory
        if self.gpu.shm_size is not None or memory is None:
            return self.gpu.shm_size
        return _memory_text(memory_bytes(memory) // SHM_SHARE_OF_MEMORY)


def duration_s(duration: str) -> int:
    """Seconds of a duration such as ``90s``, ``15m``, ``6h``, ``2d`` or ``1w``."""
    number, unit = DURATION.fullmatch(duration).groups()
    return int(number) * SECONDS_PER_UNIT[unit]


def memory_bytes(memory: str) -> int:
    """Bytes of a memory limit such as ``32G`` or ``30Gi``."""
    number, unit = MEMORY.fullmatch(memory).groups()
    return int(number) * MEMORY_UNITS.get(unit, 1)


def _memory_text(size: int) -> str:
    """``size`` bytes in the largest unit that holds it exactly (``8G``, ``7680Mi``)."""
    unit = next((u for u, b in MEMORY_UNITS.items() if size % b == 0), "")
    return f"{size // MEMORY_UNITS.get(unit, 1)}{unit}"


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
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in a Secret "
                        "and name it in mlflow_auth.secret")
    auth = settings.mlflow_auth
    if auth is not None and auth.kind not in MLFLOW_AUTH_ENV:
        problems.append(f"mlflow_auth.kind must be one of {list(MLFLOW_AUTH_ENV)}, got "
                        f"{auth.kind!r}")
    if auth is not None and not auth.secret:
        problems.append("mlflow_auth.secret must name the Secret with MLflow's credentials")
    if settings.s3_checksums not in S3_CHECKSUM_MODES:
        problems.append(f"s3_checksums must be one of {list(S3_CHECKSUM_MODES)}, got "
                        f"{settings.s3_checksums!r}")
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
        problems += _quantity_problems(f"steps.{kind}", step)
        problems += _retry_problems(f"steps.{kind}.retry", step.retry)
    problems += _shm_problems(settings)
    if problems:
        raise SettingsError(f"{where}: " + "; ".join(problems))


def _quantity_problems(where: str, step: Step) -> list[str]:
    """Kubernetes quantities the KFP SDK or the driver would refuse only at compile or run time."""
    checks = (("cpu", CPU, "a CPU quantity such as 4, 0.5 or 500m"),
              ("memory", MEMORY, "a memory quantity such as 32G or 30Gi"),
              ("scratch", QUANTITY, "a Kubernetes quantity such as 100Gi (the KFP driver "
                                    "panics on any other: resource.MustParse)"))
    return [f"{where}.{name} must be {what}, got {getattr(step, name)!r}"
            for name, pattern, what in checks
            if getattr(step, name) is not None and not pattern.fullmatch(getattr(step, name))]


def _retry_problems(where: str, retry: Retry) -> list[str]:
    problems = []
    if retry.num_retries < 0:
        problems.append(f"{where}.num_retries must be >= 0")
    if retry.backoff_factor < 1 or not float(retry.backoff_factor).is_integer():
        problems.append(f"{where}.backoff_factor must be a whole number >= 1, got "
                        f"{retry.backoff_factor}: Argo reads retryStrategy.backoff.factor as an "
                        "integer and errors the step on any other")
    durations = {"backoff_duration": retry.backoff_duration,
                 "backoff_max_duration": retry.backoff_max_duration}
    malformed = [name for name, value in durations.items()
                 if value is not None and not DURATION.fullmatch(value)]
    problems += [f"{where}.{name} must be a duration such as 90s, 15m, 6h or 2d, got "
                 f"{durations[name]!r}" for name in malformed]
    window = retry.backoff_max_duration
    if (not malformed and window is not None and retry.num_retries
            and duration_s(window) <= duration_s(retry.backoff_duration)):
        problems.append(f"{where}.backoff_max_duration is a window counted from the first "
                        f"attempt's start: {window} leaves no room for a retry after a wait of "
                        f"{retry.backoff_duration}; leave it out to size it to the step's budget")
    return problems


def _shm_problems(settings: ClusterSettings) -> list[str]:
    """/dev/shm is memory-backed: its pages count against the step's memory limit."""
    shm = settings.gpu.shm_size
    if shm is None or not settings.gpu.count:
        return []
    if not MEMORY.fullmatch(shm):
        return [f"gpu.shm_size must be a memory quantity such as 8G or 8Gi, got {shm!r}"]
    memories = {kind: settings.step(kind).memory for kind in GPU_STEPS}
    return [f"gpu.shm_size ({shm}) must be below steps.{kind}.memory ({memory}): /dev/shm "
            "counts against the step's memory limit"
            for kind, memory in memories.items()
            if memory is not None and MEMORY.fullmatch(memory)
            and memory_bytes(shm) >= memory_bytes(memory)]
