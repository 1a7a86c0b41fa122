"""Typed, validated settings: the one place where defaults live.

Pure Python (no torch) so that pipelines can compile with these defaults on a machine
without the training stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from thaw.errors import ThawError

TRAINABLE_SETS = ("head", "last_stage", "all", "adapters")
# The recipe's stages, then the optional ones (the pipeline runs ``lora`` only when its ``lora``
# parameter says so). Candidates for registration follow this order: a tie goes to the later.
STAGE_NAMES = ("probe", "partial", "full", "lora")
SOLVERS = ("adamw", "lbfgs")
AUGMENTATIONS = ("none", "crop", "crop_flip")

# What every process of a data-parallel stage gets (a TrainJob node, or a pod running
# torchrun over its GPUs) unless the same name is set otherwise.
DISTRIBUTED_ENV = {
    # NCCL says why a collective failed (peer unreachable, wrong network interface, version
    # mismatch) without INFO's per-rank setup flood.
    "NCCL_DEBUG": "WARN",
    # A rank whose collective fails or times out aborts instead of leaving the other nodes
    # blocked until the launcher's timeout; torchrun then fails the node and so the TrainJob.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # Print lines reach the pod log, and so the step's log, as they are written.
    "PYTHONUNBUFFERED": "1",
}


class InvalidStageSettings(ThawError):
    """Settings a stage refuses; ``problems`` says what is wrong with each field by name,
    so callers that know the field under another name (a pipeline parameter) can say so."""

    def __init__(self, stage: str, problems: dict[str, str]) -> None:
        self.stage = stage
        self.problems = problems
        super().__init__(f"invalid settings for stage {stage!r}: " + "; ".join(
            f"{field} {problem}" for field, problem in problems.items()))


@dataclass(frozen=True)
class StageConfig:
    """What one training stage trains and how.

    ``lr`` is the head's peak learning rate. Backbone groups (timm's coarse
    ``group_matcher`` groups, e.g. stem, layer1..layer4) get
    ``lr * backbone_lr_scale * layer_decay ** k`` where ``k`` counts groups back from the
    last stage, so earlier layers learn more slowly (discriminative learning rates).

    ``solver="lbfgs"`` (head only, no augmentation) fits the head as L2-regularised
    logistic regression on cached backbone features, the way the probing literature does:
    each "epoch" is one full-batch L-BFGS fit at the next, weaker regularisation strength
    of a path from 1e-1 to 1e-5 (``epochs`` points; a single point is 1e-3), and
    validation picks the strength. Seconds where SGD needs epochs.

    ``augment``: ``none``, ``crop`` (random resized crops, 60-100 % of the area) or
    ``crop_flip`` (plus horizontal flips, which change the label of text, digits and other
    mirror-sensitive images, so they are not the default).

    ``warmup_fraction``: the share of the stage's steps spent warming the LR up linearly,
    so a short stage is not half warmup.

    ``nominal_epochs``: the stage length its learning rates were chosen for. A shorter stage
    trains at ``lr * epochs / nominal_epochs`` (``peak_lr``), every group scaled alike; 0
    turns this off. A full fine-tune of two epochs at the LRs that suit six spends its first
    epoch wrecking the probed model and has no epochs left to recover (on the tuning datasets
    of benchmarks/quality.py: glyphs 1/2/2 from 31 to 49 % test accuracy with it).

    BatchNorm of frozen layers always stays in eval mode. ``update_bn_stats`` decides it for
    the unfrozen ones: off by default, because batch statistics of a new domain replace the
    pretrained ones at once and break the features the probed head was fitted to (measured on
    the sample: full fine-tune val accuracy 0.28 with updates vs 0.73 without). Turn it on
    for large datasets, where the statistics have time to settle.
    ``num_workers``: DataLoader processes that read and collate batches (augmentation runs
    on the device, so little CPU work is left for them); 0 reads in the training process.
    ``compile``: run the trained network through ``torch.compile`` (slower first steps,
    faster later ones on a GPU). Neither changes what a stage computes.

    ``trainable="adapters"`` (the LoRA stage, ``thaw.training.lora``) freezes every weight of
    the model but its head and trains low-rank adapters ``B @ A`` (rank ``lora_rank``, scaled
    by ``lora_alpha / lora_rank``, ``lora_dropout`` on their input) added to the attention and
    MLP linear layers; the adapters of a layer group get that group's discriminative LR, like
    its weights would. Checkpoints hold the merged weights: a plain timm model.
    """

    name: str
    trainable: str
    epochs: int
    lr: float
    backbone_lr_scale: float = 0.1
    layer_decay: float = 1.0
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    nominal_epochs: int = 0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    class_weighting: bool = False
    patience: int = 3
    batch_size: int = 64
    seed: int = 0
    augment: str = "crop"
    solver: str = "adamw"
    cache_features: bool = True
    update_bn_stats: bool = False
    num_workers: int = 0
    compile: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise InvalidStageSettings(self.name, problems)

    def _problems(self) -> dict[str, str]:
        """What is wrong, by field: ``{"epochs": "must be >= 1, got 0"}``."""
        problems = {}
        if self.trainable not in TRAINABLE_SETS:
            problems["trainable"] = f"must be one of {TRAINABLE_SETS}, got {self.trainable!r}"
        if self.epochs < 1:
            problems["epochs"] = f"must be >= 1, got {self.epochs}"
        if not self.lr > 0:
            problems["lr"] = f"must be > 0, got {self.lr}"
        if not 0 < self.backbone_lr_scale <= 1:
            problems["backbone_lr_scale"] = f"must be in (0, 1], got {self.backbone_lr_scale}"
        if not 0 < self.layer_decay <= 1:
            problems["layer_decay"] = f"must be in (0, 1], got {self.layer_decay}"
        if self.weight_decay < 0:
            problems["weight_decay"] = f"must be >= 0, got {self.weight_decay}"
        if self.nominal_epochs < 0:
            problems["nominal_epochs"] = f"must be >= 0, got {self.nominal_epochs}"
        if not 0 <= self.warmup_fraction < 1:
            problems["warmup_fraction"] = f"must be in [0, 1), got {self.warmup_fraction}"
        if self.augment not in AUGMENTATIONS:
            problems["augment"] = f"must be one of {AUGMENTATIONS}, got {self.augment!r}"
        if self.solver not in SOLVERS:
            problems["solver"] = f"must be one of {SOLVERS}, got {self.solver!r}"
        elif self.solver == "lbfgs" and not self.uses_cached_features:
            problems["solver"] = ("'lbfgs' fits the head on cached features: it needs "
                                  "trainable='head', augment='none' and cache_features=True")
        if not 0 <= self.min_lr_ratio <= 1:
            problems["min_lr_ratio"] = f"must be in [0, 1], got {self.min_lr_ratio}"
        if not 0 <= self.label_smoothing < 1:
            problems["label_smoothing"] = f"must be in [0, 1), got {self.label_smoothing}"
        if self.patience < 1:
            problems["patience"] = f"must be >= 1, got {self.patience}"
        if self.batch_size < 1:
            problems["batch_size"] = f"must be >= 1, got {self.batch_size}"
        if self.num_workers < 0:
            problems["num_workers"] = f"must be >= 0, got {self.num_workers}"
        if self.lora_rank < 1:
            problems["lora_rank"] = f"must be >= 1, got {self.lora_rank}"
        if not self.lora_alpha > 0:
            problems["lora_alpha"] = f"must be > 0, got {self.lora_alpha}"
        if not 0 <= self.lora_dropout < 1:
            problems["lora_dropout"] = f"must be in [0, 1), got {self.lora_dropout}"
        return problems

    @property
    def peak_lr(self) -> float:
        """The head's peak LR for this stage's length (see ``nominal_epochs``)."""
        if self.nominal_epochs and self.epochs < self.nominal_epochs:
            return self.lr * self.epochs / self.nominal_epochs
        return self.lr

    @property
    def uses_cached_features(self) -> bool:
        """The head-only stage without augmentation sees every image identically each epoch,
        so one forward pass of the frozen backbone can serve all epochs."""
        return self.trainable == "head" and self.augment == "none" and self.cache_features

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The recipe, chosen on benchmarks/quality.py (four datasets, two budgets, three seeds; the
# README's recipe table gives the rows). Probe: AdamW on cached features (L-BFGS fits a
# better probe in fewer seconds, but fine-tuning from it ends lower). Partial: the last
# stage + head, backbone at 0.3x the head. Full: everything, LRs decaying 0.8x per group
# from head to stem so early, generic features move least, scaled down when the stage is
# shorter than six epochs. Crops without flips. Every stage starts by scoring its start.
DEFAULT_STAGES: dict[str, StageConfig] = {
    "probe": StageConfig(
        name="probe", trainable="head", epochs=10, lr=3e-3, weight_decay=1e-4,
        warmup_fraction=0.0, label_smoothing=0.0, augment="none", patience=3,
    ),
    "partial": StageConfig(
        name="partial", trainable="last_stage", epochs=6, lr=1e-3, backbone_lr_scale=0.3,
        patience=3,
    ),
    "full": StageConfig(
        name="full", trainable="all", epochs=6, lr=2e-3, backbone_lr_scale=0.5,
        layer_decay=0.8, nominal_epochs=6, patience=3,
    ),
    # Optional: adapters on attention and MLP layers + head, from the probe's checkpoint, the
    # adapters at the head's LR (LoRA's B starts at zero, so its updates start small anyway).
    "lora": StageConfig(
        name="lora", trainable="adapters", epochs=6, lr=1e-3, backbone_lr_scale=1.0,
        patience=3,
    ),
}


def stage_config(name: str, **overrides: Any) -> StageConfig:
    """The default settings of stage ``name`` with ``overrides`` applied and validated."""
    if name not in DEFAULT_STAGES:
        raise ThawError(f"unknown stage {name!r}: expected one of {STAGE_NAMES}")
    fields = {f.name for f in dataclasses.fields(StageConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ThawError(f"unknown stage setting(s) {unknown} for stage {name!r}")
    return dataclasses.replace(DEFAULT_STAGES[name], **overrides)


@dataclass(frozen=True)
class PipelineDefaults:
    """Defaults of the pipeline's parameters (the production recipe; ``make demo`` overrides
    backbone, weights, image size and epochs to fit a CPU)."""

    data_uri: str = "s3://thaw/datasets/fashion-mnist-sample"
    backbone: str = "resnet50"
    weights: str = "hub"
    image_size: int = 224
    batch_size: int = 64
    seed: int = 0
    # DataLoader workers of each training step. Augmentation runs on the GPU, so a worker
    # only reads and collates uint8 batches (about 10 MB per batch of 64 at 224 px, a few ms
    # of copying against ~20-25 ms for a ResNet-50 bf16 step on an H100: an estimate, not yet
    # measured on a GPU), two overlap reads that miss the page cache, and their 4 batches in
    # flight fit the 64 MB /dev/shm of a pod without a memory-backed mount.
    num_workers: int = 2
    # Decoding processes of preprocess: the preprocess step's CPU limit
    # (pipelines/settings.py), so it decodes on every core its pod gets.
    preprocess_workers: int = 4
    # How preprocess stores images: "raw" pixels (fastest to read, 150 KB per image at
    # 224 px) or "jpeg" (about 10 KB; for large sets). With shard_uri (an s3:// prefix,
    # jpeg only) the shards live there and steps stream them; empty: inside the artifact.
    image_format: str = "raw"
    shard_uri: str = ""
    max_bad_fraction: float = 0.05
    mlflow_experiment: str = "thaw"
    model_name: str = "thaw-classifier"
    selection_metric: str = "macro_f1"
    promotion_margin: float = 0.0
    # A champion trained on another class list cannot be scored on the new data: keep it
    # unless this is set.
    promote_on_class_change: bool = False
    # The LoRA stage (``thaw.training.lora``): one more candidate, trained from the probe
    # beside partial and full; ViT-like backbones only (attention/MLP linear layers).
    lora: bool = False


PIPELINE_DEFAULTS = PipelineDefaults()
