"""The GPU acceptance run (``make gpu-check``): one script, one JSON, pass or fail.

On one CUDA GPU (an H100 is the target: a few minutes, at most 8), from a checkout whose
``.venv`` is installed:

1. synthetic photos in ``train/ val/ test/`` folders, prepared by thaw's own
   ``prepare_dataset`` (decoded, resized, stored as shards: the pipeline's preprocess step);
2. ResNet-50 at 224 px, full fine-tune, through thaw's training loop (``train_stage``: data
   loading, augmentation and bookkeeping included) next to the same model's forward,
   backward and optimizer step on a fixed batch already on the device, bf16 autocast, each
   without and with ``torch.compile`` (``benchmarks/throughput.py`` measures both). The
   loop runs with ``torch.cuda.set_sync_debug_mode("error")`` over its training steps
   (``HostSyncWatch``), so a step that waits for the device fails the check and the JSON
   names the line; the peak GPU memory (``torch.cuda.max_memory_allocated``) of each;
3. the partial stage as the pipeline starts it on a GPU pod: ``torchrun
   --nproc-per-node=<--processes> -m thaw.stage_job`` (``thaw.torchrun.torchrun_in_pod``),
   MLflow on a local SQLite file. With one process thaw joins no process group
   (``thaw.training.distributed.join_from_environment``): NCCL only carries collectives from
   two GPUs on (``--processes 2`` or more); ``nccl_initialised`` says whether it started.

The JSON (``benchmarks/results/gpu-check.json``, and a copy in ``$OUT`` when set) records
the machine (GPU, driver, CUDA, cuDNN, NCCL, torch, CPUs, load average) and is checked
against ``gpu_check.schema.json`` before the exit status is decided: 0 when every part
passed, 1 when one failed (``failures`` says which), 2 when there is no CUDA device.

``--dry-run`` runs the same parts on the CPU, small enough for ``make test``: timm's
``test_resnet`` at 32 px, a few steps, gloo, ``torch.compile`` under the ``force_eager``
stance (compiling on two cores takes minutes) and the sync watch emulated (it counts the
steps it would watch: CPUs have no device to wait for). Its JSON goes to
``benchmarks/results/gpu-check-dry-run.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import torch
from mlflow import MlflowClient
from throughput import CLASSES, loop_images_per_sec, machine_facts, synthetic_images_per_sec
from throughput_preprocess import photo, unique_copy
from torch.optim.optimizer import register_optimizer_step_post_hook

import thaw
from thaw.backbones import create_backbone, data_config
from thaw.config import PIPELINE_DEFAULTS, stage_config
from thaw.data.prepare import prepare_dataset
from thaw.data.prepared import PreparedDataset, open_prepared
from thaw.errors import ThawError
from thaw.torchrun import stage_arguments, torchrun_in_pod
from thaw.training.loop import DIVERGENCE_CHECK_STEPS

SCHEMA_PATH = Path(__file__).with_name("gpu_check.schema.json")
RESULTS = Path(__file__).parent / "results"
SYNC_ERROR = "called a synchronizing CUDA operation"  # c10/cuda: warn_or_error_on_sync
THAW_CODE = f"{Path(thaw.__file__).parent}{os.sep}"
BASE_PHOTOS = 16  # distinct pictures; every file is unique all the same (unique_copy)
EVAL_IMAGES = CLASSES  # val and test: one image per class


@dataclass(frozen=True)
class Settings:
    """What the check trains: ``steps`` training steps of ``batch_size`` per epoch (the
    training split holds exactly ``steps * batch_size`` images)."""

    arch: str
    weights: str
    image_size: int
    batch_size: int
    steps: int
    num_workers: int
    partial_epochs: int
    processes: int
    prepare_workers: int


# ResNet-50 with random weights: speed does not depend on them, and nothing is downloaded.
# The pipeline's batch size and DataLoader workers: the check measures what runs.
GPU = Settings(arch="resnet50", weights="none", image_size=224,
               batch_size=PIPELINE_DEFAULTS.batch_size, steps=40,
               num_workers=PIPELINE_DEFAULTS.num_workers, partial_epochs=2, processes=1,
               prepare_workers=min(8, len(os.sched_getaffinity(0))))
DRY_RUN = Settings(arch="test_resnet", weights="none", image_size=32, batch_size=8, steps=4,
                   num_workers=1, partial_epochs=1, processes=1, prepare_workers=0)


# -- the data ----------------------------------------------------------------------------

def write_source(root: Path, train_images: int) -> Path:
    """``root/{train,val,test}/class<k>/<n>.jpg``: ``train_images`` photo-like JPEGs for
    training and one per class for val and test, every file of its own content."""
    rng = np.random.default_rng(0)
    base = [photo(rng) for _ in range(BASE_PHOTOS)]
    number = 0
    for split, count in (("train", train_images), ("val", EVAL_IMAGES), ("test", EVAL_IMAGES)):
        for index in range(count):
            path = root / split / f"class{index % CLASSES}" / f"{number:07d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(unique_copy(base[number % BASE_PHOTOS], number))
            number += 1
    return root


def prepared_dataset(tmp: Path, settings: Settings) -> PreparedDataset:
    """The check's data, prepared as the pipeline's preprocess step prepares a bucket."""
    source = write_source(tmp / "source", settings.steps * settings.batch_size)
    prepare_dataset(source, tmp / "prepared",
                    data_config=data_config(settings.arch, settings.image_size),
                    num_workers=settings.prepare_workers)
    return open_prepared(tmp / "prepared")


# -- host syncs inside the training step ---------------------------------------------------

class HostSyncWatch:
    """``torch.cuda.set_sync_debug_mode("error")`` over the training steps of every epoch
    of thaw's loop: from the end of an epoch's first optimizer step (the first step
    compiles and warms up) to the end of its last, so steps 2..N run whole inside it,
    fetching their batch included. Epoch ends and validation, which read results on the
    host by design, stay outside. Steps are seen through a global optimizer-step hook, so
    the loop is watched through its public API only.

    ``enforce=False`` (no CUDA device) keeps the bookkeeping and sets no mode."""

    def __init__(self, steps_per_epoch: int, *, enforce: bool) -> None:
        self.check_steps(steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self.enforce = enforce
        self.step = 0
        self.watched_steps = 0

    @staticmethod
    def check_steps(steps_per_epoch: int) -> None:
        """``ValueError`` unless the watch can cover ``steps_per_epoch`` steps."""
        if not 2 <= steps_per_epoch < DIVERGENCE_CHECK_STEPS:
            raise ValueError(f"the watch needs 2 to {DIVERGENCE_CHECK_STEPS - 1} steps per "
                             f"epoch (the loop reads its loss every {DIVERGENCE_CHECK_STEPS} "
                             f"steps on purpose), got {steps_per_epoch}")

    def __enter__(self) -> HostSyncWatch:
        self._hook = register_optimizer_step_post_hook(self._after_step)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hook.remove()
        self._set_mode("default")

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self.step == 1:
            self._set_mode("error")
            return
        self.watched_steps += 1
        if self.step == self.steps_per_epoch:
            self._set_mode("default")
            self.step = 0

    def _set_mode(self, mode: str) -> None:
        if self.enforce:
            torch.cuda.set_sync_debug_mode(mode)


def _where(err: BaseException) -> str:
    """The innermost line of thaw's own code in ``err``'s traceback (else the innermost)."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if f.filename.startswith(THAW_CODE)] or frames
    frame = ours[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"


# -- the parts -----------------------------------------------------------------------------

def full_fine_tune(data: PreparedDataset, settings: Settings, device: torch.device,
                   compile_model: bool, out: Path) -> dict[str, Any]:
    """Loop vs device-tensor images/s of the full fine-tune, the loop under the watch."""
    cfg = stage_config("full", epochs=3, batch_size=settings.batch_size,
                       num_workers=settings.num_workers, compile=compile_model)
    row: dict[str, Any] = {"compile": compile_model, "loop_images_per_sec": None,
                           "synthetic_images_per_sec": None, "efficiency": None,
                           "peak_memory_bytes": {"loop": None, "synthetic": None},
                           "error": None}
    watch = HostSyncWatch(settings.steps, enforce=device.type == "cuda")
    host_sync = {"status": "passed" if watch.enforce else "emulated", "where": None}
    try:
        with watch, _peak_memory(device, row["peak_memory_bytes"], "loop"):
            loop = loop_images_per_sec(data, settings.arch, settings.weights, cfg, out, device)
        with _peak_memory(device, row["peak_memory_bytes"], "synthetic"):
            synthetic = synthetic_images_per_sec(
                create_backbone(settings.arch, CLASSES, settings.weights), cfg,
                settings.image_size, settings.steps, device)
    except RuntimeError as err:
        if SYNC_ERROR not in str(err):
            raise
        host_sync.update(status="failed", where=_where(err))
        row["error"] = f"a training step waited for the device: {err}"
    else:
        row.update(loop_images_per_sec=round(loop, 2),
                   synthetic_images_per_sec=round(synthetic, 2),
                   efficiency=round(loop / synthetic, 3))
    row["host_sync"] = {**host_sync, "watched_steps": watch.watched_steps}
    return row


@contextmanager
def _peak_memory(device: torch.device, into: dict[str, int | None], key: str) -> Iterator[None]:
    """``into[key]``: the peak GPU memory allocated inside the block (None on the CPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.reset_peak_memory_stats(device)
    yield
    into[key] = torch.cuda.max_memory_allocated(device)


def partial_under_torchrun(prepared: Path, settings: Settings, device: torch.device,
                           tmp: Path) -> dict[str, Any]:
    """The partial stage as the train step runs it with ``gpus_per_node`` processes."""
    nccl_logs = tmp / "nccl"
    nccl_logs.mkdir()
    child_env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "THAW_CHECKPOINT_URI": None,  # nothing mirrored, no earlier attempt consulted
        "NCCL_DEBUG": "INFO",
        "NCCL_DEBUG_FILE": str(nccl_logs / "nccl.%h.%p"),
        # a dry run stays on the CPU (on a GPU machine too), with this process's threads
        **({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(torch.get_num_threads())}
           if device.type == "cpu" else {}),
    }
    out = tmp / "partial"
    settings_json = {"epochs": settings.partial_epochs, "batch_size": settings.batch_size,
                     "num_workers": settings.num_workers}
    arguments = stage_arguments(stage="partial", prepared=str(prepared), out=str(out),
                                settings=settings_json, arch=settings.arch,
                                weights=settings.weights, init=None,
                                experiment="thaw-gpu-check",
                                pipeline_run_id=f"gpu-check-{uuid.uuid4().hex[:12]}")
    record: dict[str, Any] = {"processes": settings.processes,
                              "backend": "nccl" if device.type == "cuda" else "gloo",
                              "error": None, "epochs_run": None, "train_images_per_sec": None,
                              "best_val_macro_f1": None}
    # the experiment made here keeps its artifacts in tmp (a SQLite store's default is
    # ./mlruns in the working directory: the checkout)
    MlflowClient(child_env["MLFLOW_TRACKING_URI"]).create_experiment(
        "thaw-gpu-check", artifact_location=(tmp / "mlflow-artifacts").as_uri())
    start = time.perf_counter()
    try:
        with _environment(child_env):
            torchrun_in_pod(settings.processes, arguments)
        result = json.loads((out / "result.json").read_text())
    except (ThawError, OSError, ValueError) as err:
        record["error"] = str(err)
    else:
        record.update(epochs_run=len(result["history"]) - 1,  # epoch 0 scores the start
                      train_images_per_sec=round(result["train_images_per_sec"], 2),
                      best_val_macro_f1=result["best_val"]["macro_f1"])
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["nccl_initialised"] = (_nccl_started(nccl_logs) if device.type == "cuda" else None)
    return record


@contextmanager
def _environment(changes: dict[str, str | None]) -> Iterator[None]:
    """``os.environ`` with ``changes`` (None removes) inside the block: what torchrun's
    processes inherit."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            _set_env(name, value)
        yield
    finally:
        for name, value in saved.items():
            _set_env(name, value)


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _nccl_started(logs: Path) -> bool:
    """Whether a torchrun process initialised NCCL (it logs its version when it does)."""
    return any("NCCL version" in path.read_text(errors="replace") for path in logs.iterdir())


# -- the run -------------------------------------------------------------------------------

def machine(device: torch.device) -> dict[str, Any]:
    """``throughput.machine_facts`` plus the GPU's memory, driver, CUDA, cuDNN and NCCL."""
    cuda = device.type == "cuda"
    return {**machine_facts(device),
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory
            if cuda else None,
            "driver": _driver_version() if cuda else None,
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None}


def _driver_version() -> str | None:
    """The NVIDIA driver's version as ``nvidia-smi`` reports it (None without the tool)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    answer = subprocess.run([tool, "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, check=False)
    return answer.stdout.splitlines()[0].strip() if answer.returncode == 0 else None


def run_check(settings: Settings, device: torch.device, dry_run: bool) -> dict[str, Any]:
    """Every part, in order; a part that fails is recorded and the others still run."""
    start = time.perf_counter()
    document: dict[str, Any] = {
        "schema_version": 1, "dry_run": dry_run, "machine": machine(device),
        "settings": {**dataclasses.asdict(settings),
                     "autocast": "bfloat16" if device.type == "cuda" else "none",
                     "compile_stance": "force_eager" if dry_run else "default"},
        "load_average_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="thaw-gpu-check-") as scratch:
        tmp = Path(scratch)
        tick = time.perf_counter()
        data = prepared_dataset(tmp, settings)
        document["prepare_seconds"] = round(time.perf_counter() - tick, 1)
        rows = []
        for compile_model in (False, True):
            with _compile_stance(dry_run):
                rows.append(full_fine_tune(data, settings, device, compile_model,
                                           tmp / f"full-compile-{compile_model}"))
        document["full_fine_tune"] = rows
        document["partial_under_torchrun"] = partial_under_torchrun(data.root, settings,
                                                                    device, tmp)
    document["failures"] = failures(document)
    document["passed"] = not document["failures"]
    document["load_average_end"] = list(os.getloadavg())
    document["seconds"] = round(time.perf_counter() - start, 1)
    return document


def _compile_stance(dry_run: bool) -> AbstractContextManager[Any]:
    """``torch.compile`` as it is on a GPU run; on a dry run the compiled model runs eagerly
    (the loop still takes its compile path)."""
    return torch.compiler.set_stance("force_eager") if dry_run else nullcontext()


def failures(document: dict[str, Any]) -> list[str]:
    """What did not pass, one sentence each."""
    found = [f"full fine-tune, compile={row['compile']}: {row['error']} (at "
             f"{row['host_sync']['where']})" for row in document["full_fine_tune"]
             if row["error"]]
    partial = document["partial_under_torchrun"]
    if partial["error"]:
        found.append(f"partial stage under torchrun: {partial['error']}")
    elif partial["epochs_run"] != document["settings"]["partial_epochs"]:
        found.append(f"partial stage under torchrun ran {partial['epochs_run']} epochs, not "
                     f"{document['settings']['partial_epochs']}")
    return found


def validate(document: dict[str, Any]) -> None:
    """``jsonschema.ValidationError`` unless ``document`` fits ``gpu_check.schema.json``."""
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU with a tiny model: checks the script and its JSON")
    parser.add_argument("--output", type=Path, default=None,
                        help="default benchmarks/results/gpu-check.json "
                             "(gpu-check-dry-run.json with --dry-run)")
    parser.add_argument("--processes", type=int, default=None,
                        help="torchrun processes of the partial stage (default 1; NCCL "
                             "carries collectives from 2 on, one per GPU)")
    for name in ("steps", "batch_size", "num_workers"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"override the {name} the check trains with")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check needs a CUDA device and found none (torch.cuda.is_available() is "
              "False); run it on a GPU machine, or pass --dry-run for the CPU check of the "
              "script and its JSON", file=sys.stderr)
        return 2
    defaults = DRY_RUN if args.dry_run else GPU
    settings = dataclasses.replace(defaults, **{
        name: value for name in ("processes", "steps", "batch_size", "num_workers")
        if (value := getattr(args, name)) is not None})
    try:
        HostSyncWatch.check_steps(settings.steps)
    except ValueError as err:
        parser.error(f"--steps: {err}")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        # It checks shapes, not speed; on shared two-core machines, two threads per process
        # spin against other work and make each step up to 40x slower (measured).
        torch.set_num_threads(1)
    name = "gpu-check-dry-run.json" if args.dry_run else "gpu-check.json"
    outputs = [args.output or RESULTS / name]
    if os.environ.get("OUT"):
        outputs.append(Path(os.environ["OUT"]) / name)

    document = run_check(settings, device, args.dry_run)
    text = json.dumps(document, indent=2) + "\n"
    for output in outputs:  # written before validation: a schema slip loses no numbers
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        print(f"wrote {output}")
    validate(document)
    for failure in document["failures"]:
        print(f"FAILED: {failure}", file=sys.stderr)
    print("gpu-check " + ("passed" if document["passed"] else "failed"))
    return 0 if document["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
