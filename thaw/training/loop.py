"""The one training loop. Probe, last stage and full fine-tune differ only by StageConfig."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from thaw.backbone_contract import share_first_head
from thaw.backbones import stage_groups
from thaw.checkpoint import CheckpointMirror, load_checkpoint, save_checkpoint
from thaw.config import StageConfig
from thaw.data.prepared import PreparedDataset
from thaw.errors import ThawError
from thaw.evaluation import classification_metrics
from thaw.storage import write_json_atomic
from thaw.training import distributed
from thaw.training.feeds import FeatureFeed, ImageFeed, epoch_seed
from thaw.training.freeze import apply_trainable, set_train_mode
from thaw.training.optim import build_optimizer, build_scheduler
from thaw.training.probe import fit_logistic, regularisation_path

log = logging.getLogger(__name__)

SELECTION_METRIC = "macro_f1"
# Steps between host checks for a non-finite loss: the loop otherwise never waits for the
# device, so a diverged epoch is noticed within this many steps (or at its end).
DIVERGENCE_CHECK_STEPS = 200
# Settings that change how fast a stage runs, never what it computes: a checkpoint written
# with other values of them is still resumed.
RUNTIME_SETTINGS = ("num_workers", "compile")
EpochCallback = Callable[[dict[str, Any]], None]


class Diverged(Exception):
    """The loss became NaN or infinite: training stops, the model is no longer usable."""


@dataclass
class StageResult:
    """What a stage produced: its curves, its best epoch (by validation macro-F1) and where
    the best and last checkpoints are."""

    stage: str
    config: dict[str, Any]
    best_epoch: int
    best_val: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    best_checkpoint: str = ""
    last_checkpoint: str = ""
    wall_seconds: float = 0.0
    train_images_per_sec: float = 0.0
    stopped_early: bool = False
    cached_features: bool = False
    trainable_params: int = 0
    # Why training stopped on a NaN/infinite loss ("training loss became nan at epoch 2
    # step 5"); None when it did not. A diverged stage keeps its best healthy checkpoint
    # but is never chosen for registration (thaw.champion.choose).
    diverged: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_device() -> torch.device:
    """This process's GPU (under torchrun: the one of its local rank), else the CPU."""
    return distributed.current().device()


def train_stage(
    model: nn.Module,
    data: PreparedDataset,
    cfg: StageConfig,
    out_dir: Path,
    *,
    on_epoch_end: EpochCallback | None = None,
    device: torch.device | None = None,
    start_point: str = "",
    checkpoint_uri: str | None = None,
) -> StageResult:
    """Train the parameters ``cfg.trainable`` selects, keep the best checkpoint by validation
    macro-F1, stop early after ``cfg.patience`` epochs without improvement on the best
    trained epoch. The starting point is scored first, as epoch 0, and stays the best when
    no epoch beats it. A NaN or infinite loss (training or validation) stops the stage
    within its epoch: the epoch is not kept, ``best.pt`` stays the best healthy epoch and
    ``StageResult.diverged`` says where it happened. A starting point whose validation loss is
    already not finite is refused with a ``ThawError``.

    A fresh optimizer and schedule are built here, after freezing, so they only ever see
    this stage's trainable parameters. ``out_dir/last.pt`` is written every epoch; calling
    again with the same ``out_dir`` resumes from it. With ``checkpoint_uri`` (an ``s3://``
    prefix or a folder outside ``out_dir``) both checkpoints are also mirrored there after
    every epoch, so a retried pod, whose output folder starts empty, resumes too.

    A checkpoint is resumed only if it was written for the same stage settings, the same
    prepared data (manifest digest) and the same ``start_point`` (what the model started
    from: the previous stage's checkpoint digest, or the backbone and its weights).
    Each epoch reseeds the crops from (seed, epoch) and the global RNG (dropout) from
    (seed, epoch, rank) (``feeds.epoch_seed``), so a resumed run draws the same augmentations
    and dropout masks as an uninterrupted one. Every process draws the same crops for the
    whole global batch (each keeps its rows), so they do not depend on the number of
    processes; dropout masks differ per process, as they would per image on one device.

    Training steps never wait for the device: the loss sum and the correct count stay on it
    and are read once per epoch, and a non-finite loss is caught there too (and every
    ``DIVERGENCE_CHECK_STEPS`` steps); from that step on the optimizer skips its updates on
    the device, so a NaN never reaches the weights. ``train_seconds`` includes fetching the
    batches, so images/s shows a device waiting for data. ``cfg.compile`` runs the trained
    network through ``torch.compile``.

    Under torchrun (``thaw.training.distributed``) each process trains on its share of
    every global batch of ``cfg.batch_size * world_size`` images in a fresh DDP wrapper;
    the learning rates scale with the global batch by ``lr_scale``; every process computes
    the same metrics and takes the same decisions, and only rank 0 writes files or calls
    ``on_epoch_end``. The others wait for rank 0's writes and ``on_epoch_end`` (an MLflow
    outage: minutes of retries) in ``Distributed.barrier`` after every epoch, under
    ``THAW_RANK_WAIT_TIMEOUT_S``, not in the next step's collectives, which time out after
    ``THAW_COLLECTIVE_TIMEOUT_S``.
    """
    ranks = distributed.current()
    device = device or default_device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    mirror = CheckpointMirror(checkpoint_uri, out_dir)
    if ranks.is_local_main:
        mirror.fetch_missing()
    ranks.barrier()
    torch.manual_seed(cfg.seed)

    if cfg.uses_cached_features:
        share_first_head(model)  # distilled models: one head fits the cached features
    groups = stage_groups(model)
    apply_trainable(model, groups.trainable(cfg.trainable))
    # channels_last: faster convolutions on GPUs and, with oneDNN, on CPUs too (about 1.8x
    # for a full EfficientNet-Lite0 step at 64 px here; benchmarks/results/quality.json).
    model.to(device, memory_format=torch.channels_last)
    start = time.perf_counter()  # feature caching counts towards the stage's time
    feed_options = {"batch_size": cfg.batch_size, "seed": cfg.seed,
                    "num_workers": cfg.num_workers}
    if cfg.uses_cached_features:
        feed = FeatureFeed(model, data, device, **feed_options)
    else:
        feed = ImageFeed(model, data, device, augment=cfg.augment, ranks=ranks, **feed_options)
        # a new wrapper for this stage's trainable set (see thaw.training.distributed)
        feed.net = ranks.wrap(model)
    if cfg.compile:
        feed.net = torch.compile(feed.net)
    steps_per_epoch = feed.steps_per_epoch()
    optimizer = build_optimizer(model, groups, cfg, lr_scale=lr_scale(feed.ranks))
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    criterion = nn.CrossEntropyLoss(
        weight=_class_weights(data, device) if cfg.class_weighting else None,
        label_smoothing=cfg.label_smoothing,
    )
    identity = {"stage_config": {k: v for k, v in cfg.to_dict().items()
                                 if k not in RUNTIME_SETTINGS},
                "data": data.manifest.digest(),
                "start_point": start_point}
    meta = {"classes": data.manifest.classes, "data_config": data.manifest.data_config(),
            "stage": cfg.name, "stage_config": cfg.to_dict(), "resume_identity": identity}

    state = _resume(last_path, model, optimizer, scheduler, identity, ranks.is_main)
    if not state["history"]:
        # Epoch 0 is the starting point, scored like any epoch: a stage whose epochs all
        # score below it hands on the model it was given, never a worse one.
        tick = time.perf_counter()
        val = _validate(feed, criterion, data.manifest.classes)
        if not math.isfinite(val["loss"]):
            raise ThawError(f"stage {cfg.name} cannot start: its starting point "
                            f"({start_point or 'the given model'}) gives a {val['loss']} "
                            "validation loss; check its weights or the checkpoint it was "
                            "loaded from")
        record = {"epoch": 0, "train_images": 0, "train_seconds": 0.0,
                  **{f"val_{k}": v for k, v in val.items()},
                  "epoch_seconds": time.perf_counter() - tick}
        _keep(state, record, val, model, best_path, {**meta, "epoch": 0, "val": val},
              mirror if ranks.is_main else None)
        log.info("%s epoch 0/%d: starting point %s", cfg.name, cfg.epochs, _brief(record))
        if on_epoch_end and ranks.is_main:
            on_epoch_end(record)
        ranks.barrier()  # rank 0 alone: the best checkpoint, its mirror, on_epoch_end
    path = regularisation_path(cfg.epochs) if cfg.solver == "lbfgs" else []
    for epoch in range(state["epoch"], cfg.epochs):
        if state["bad_epochs"] >= cfg.patience or state.get("diverged"):
            break
        epoch_start = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, ranks.rank))  # dropout: per process
        try:
            if path:
                features, labels = feed.features["train"].tensors
                train = fit_logistic(feed.net, features, labels, criterion, path[epoch])
                _check_finite(train["train_loss"], f"training loss became {{}} at epoch "
                                                   f"{epoch + 1} (L-BFGS fit)")
            else:
                train = _train_epoch(model, feed, optimizer, scheduler, criterion, epoch,
                                     steps_per_epoch, cfg.update_bn_stats)
                train["lr"] = optimizer.param_groups[0]["lr"]
            val = _validate(feed, criterion, data.manifest.classes)
            _check_finite(val["loss"], f"validation loss became {{}} after epoch {epoch + 1}")
        except Diverged as err:
            state["diverged"] = str(err)
            log.error("%s diverged: %s; training stopped, its best healthy checkpoint "
                      "(epoch %d) is kept and the stage will not be chosen for registration",
                      cfg.name, err, state["best_epoch"])
            break
        record = {"epoch": epoch + 1, **train, **{f"val_{k}": v for k, v in val.items()},
                  "epoch_seconds": time.perf_counter() - epoch_start}
        _keep(state, record, val, model, best_path, {**meta, "epoch": epoch + 1, "val": val},
              mirror if ranks.is_main else None)
        state["epoch"] = epoch + 1
        if ranks.is_main:
            save_checkpoint(last_path, model, meta, optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), progress=_jsonable(state))
            mirror.push(last_path)
        log.info("%s epoch %d/%d: %s", cfg.name, epoch + 1, cfg.epochs, _brief(record))
        if on_epoch_end and ranks.is_main:
            on_epoch_end(record)
        ranks.barrier()  # rank 0 alone: checkpoints, their mirror, on_epoch_end
    state["wall_seconds"] += time.perf_counter() - start
    if ranks.is_main:
        save_checkpoint(last_path, model, meta, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), progress=_jsonable(state))

    history = state["history"]
    best = next(r for r in history if r["epoch"] == state["best_epoch"])
    images = sum(r["train_images"] for r in history)
    train_seconds = sum(r["train_seconds"] for r in history)
    result = StageResult(
        stage=cfg.name,
        config=cfg.to_dict(),
        best_epoch=state["best_epoch"],
        best_val={k[4:]: v for k, v in best.items() if k.startswith("val_")},
        history=history,
        best_checkpoint=str(best_path),
        last_checkpoint=str(last_path),
        wall_seconds=state["wall_seconds"],
        train_images_per_sec=images / train_seconds if train_seconds else 0.0,
        stopped_early=state["epoch"] < cfg.epochs,
        cached_features=cfg.uses_cached_features,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        diverged=state.get("diverged"),
    )
    if ranks.is_main:
        write_json_atomic(out_dir / "result.json", result.to_dict(), indent=2)
    ranks.barrier()  # every process returns once rank 0's files are complete
    return result


def lr_scale(ranks: distributed.Distributed) -> float:
    """How much the learning rates grow with the global batch: ``sqrt(world_size)``.

    ``lr`` is set for ``batch_size`` images per step; with N processes a step sees
    ``N * batch_size``, and AdamW's LR scales with the square root of the batch (timm's
    default rule for Adam-family optimizers, ``--lr-base-scale sqrt``). One process: 1."""
    return math.sqrt(ranks.world_size)


def _keep(state: dict[str, Any], record: dict[str, Any], val: dict[str, float],
          model: nn.Module, best_path: Path, meta: dict[str, Any],
          mirror: CheckpointMirror | None) -> None:
    """Append ``record``; a new best (strictly better validation macro-F1, the starting
    point included) is checkpointed, unless ``mirror`` is None (not rank 0: nothing written).

    Patience counts against the best *trained* epoch, not the starting point: the first
    epochs at a high learning rate often score below the start and recover as the LR
    decays, and stopping them would end the stage before it had a chance.
    """
    state["history"].append(record)
    score = val[SELECTION_METRIC]
    if score > state["best"]:
        state.update(best=score, best_epoch=record["epoch"])
        if mirror is not None:
            save_checkpoint(best_path, model, meta)
            mirror.push(best_path)
    if record["epoch"] == 0:
        return
    if score > state["trained_best"]:
        state.update(trained_best=score, bad_epochs=0)
    else:
        state["bad_epochs"] += 1


class DivergenceGuard:
    """Watches the training loss on the device: the first non-finite loss (its value and
    step) is kept there, and from that step on the fused optimizer's ``found_inf`` skips
    every update, the way ``torch.amp.GradScaler`` skips steps with infinite gradients.
    ``check`` reads it on the host (one sync) and raises ``Diverged``."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.optimizer = optimizer
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)  # 1-based step
        self.value = torch.zeros((), device=device)
        optimizer.found_inf = torch.zeros((), device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Record ``loss`` of ``step`` (1-based); call before ``optimizer.step()``."""
        new = ~torch.isfinite(loss) & (self.first_bad == 0)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.value = torch.where(new, loss, self.value)
        self.optimizer.found_inf = (self.first_bad > 0).float()

    def check(self, epoch: int) -> None:
        step, value = torch.stack([self.first_bad.double(), self.value.double()]).tolist()
        if step:
            raise Diverged(f"training loss became {value} at epoch {epoch + 1} "
                           f"step {int(step)}")


def _train_epoch(model, feed, optimizer, scheduler, criterion, epoch, steps_per_epoch,
                 update_bn_stats):
    """One epoch; the timer runs from asking for the first batch to reading the metrics."""
    set_train_mode(model, update_bn_stats)
    device = feed.device
    guard = DivergenceGuard(optimizer, device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, seen
    tick = time.perf_counter()
    ranks = feed.ranks
    for step, (x, y) in enumerate(feed.batches("train", train=True, epoch=epoch), start=1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = feed.net(x)
            loss, batch_loss, batch_size = _batch_loss(criterion, logits.float(), y, ranks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        guard.observe(batch_loss, step)
        optimizer.step()
        scheduler.step_update(epoch * steps_per_epoch + step)
        loss_sum += batch_loss * batch_size
        counts[0] += (logits.detach().argmax(1) == y).sum()
        counts[1] += len(y)
        if step % DIVERGENCE_CHECK_STEPS == 0:
            guard.check(epoch)
    guard.check(epoch)
    ranks.average_batchnorm(model)
    counts = ranks.sum(counts)
    total_loss, correct, seen = torch.cat([loss_sum.view(1), counts.double()]).tolist()
    return {"train_loss": total_loss / seen, "train_accuracy": correct / seen,
            "train_images": int(seen), "train_seconds": time.perf_counter() - tick}


def _batch_loss(criterion: nn.CrossEntropyLoss, logits: torch.Tensor, y: torch.Tensor,
                ranks: distributed.Distributed) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(loss to backpropagate, the global batch's loss, the global batch's size).

    One process: ``criterion``'s mean. Under DDP each process backpropagates its share of
    the *global* batch's (class-weighted) mean, scaled by ``world_size`` because DDP
    averages gradients over processes: the update is the one a single process would make on
    the whole global batch, however unevenly its last batch is split over the processes.
    """
    if not ranks.enabled:
        loss = criterion(logits, y)
        return loss, loss.detach(), len(y)
    per_sample = F.cross_entropy(logits, y, weight=criterion.weight, reduction="none",
                                 label_smoothing=criterion.label_smoothing)
    ones = torch.ones_like(per_sample)  # counted on the device: no copy from the host
    weights = criterion.weight[y] if criterion.weight is not None else ones
    totals = ranks.sum(torch.stack([weights.sum(), ones.sum()]))
    loss = per_sample.sum() * ranks.world_size / totals[0]
    batch_loss = ranks.sum(loss.detach().clone()) / ranks.world_size
    return loss, batch_loss, totals[1]


@torch.no_grad()
def _validate(feed, criterion, classes) -> dict[str, float]:
    """Loss and metrics on validation; predictions stay on the device until the end. Under
    DDP each process scores its part and every process gets the whole split's metrics."""
    was_training = feed.net.training
    feed.net.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=feed.device)
    preds = [torch.empty(0, dtype=torch.int64, device=feed.device)]
    labels = [torch.empty(0, dtype=torch.int64, device=feed.device)]
    for x, y in feed.batches("val", train=False):
        with torch.autocast(feed.device.type, dtype=torch.bfloat16,
                            enabled=feed.device.type == "cuda"):
            logits = feed.net(x).float()
        loss_sum += criterion(logits, y) * len(y)
        preds.append(logits.argmax(1))
        labels.append(y)
    feed.net.train(was_training)
    ranks = feed.ranks
    loss_sum = ranks.sum(loss_sum)
    y_true = ranks.concat(torch.cat(labels)).cpu().numpy()
    y_pred = ranks.concat(torch.cat(preds)).cpu().numpy()
    return {"loss": loss_sum.item() / len(y_true),
            **classification_metrics(y_true, y_pred, classes)}


def _check_finite(value: float, message: str) -> None:
    """Raise ``Diverged(message.format(value))`` for a NaN or infinite ``value``."""
    if not math.isfinite(value):
        raise Diverged(message.format(value))


def _class_weights(data: PreparedDataset, device: torch.device) -> torch.Tensor:
    """Inverse-frequency weights (mean 1) so rare classes count as much in the loss."""
    counts = np.bincount(data.labels("train"), minlength=len(data.manifest.classes))
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _resume(last_path: Path, model, optimizer, scheduler,
            identity: dict[str, Any], writes: bool = True) -> dict[str, Any]:
    """Training progress from ``last_path`` when it was written for this very ``identity``;
    a fresh start otherwise (a stale checkpoint is named in the log, never trusted; with
    ``writes``, its ``best.pt`` is removed)."""
    fresh = {"epoch": 0, "best": -1.0, "trained_best": -1.0, "best_epoch": 0, "bad_epochs": 0,
             "history": [], "wall_seconds": 0.0, "diverged": None}
    if not last_path.exists():
        return fresh
    payload = load_checkpoint(last_path)
    written_for = payload["meta"].get("resume_identity") or {}
    differs = sorted(k for k in identity if written_for.get(k) != identity[k])
    if differs:
        log.warning("not resuming from %s: it was written for another %s; starting afresh",
                    last_path, " and ".join(d.replace("_", " ") for d in differs))
        if writes:
            last_path.with_name("best.pt").unlink(missing_ok=True)
        return fresh
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    log.info("resuming %s from epoch %d", identity["stage_config"]["name"],
             payload["progress"]["epoch"])
    return dict(payload["progress"])


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(state))


def _brief(record: dict[str, float]) -> str:
    keys = ("l2", "train_loss", "val_loss", "val_accuracy", "val_macro_f1")
    return " ".join(f"{k}={record[k]:.4g}" if k == "l2" else f"{k}={record[k]:.4f}"
                    for k in keys if k in record)
