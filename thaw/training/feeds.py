"""What the training loop iterates over: images (augmented and normalised in batches on the
device) or, for the head-only stage, backbone features computed once."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset, TensorDataset

from thaw.backbone_contract import classifier_modules
from thaw.data.prepared import ImageSplit, PreparedDataset, epoch_permutation
from thaw.errors import ThawError
from thaw.training.distributed import SINGLE, Distributed, share

# Batches each DataLoader worker keeps ready (torch's default). With the default 2 workers
# that is 4 batches in flight: 38 MB at 224 px and batch 64, inside the 64 MB /dev/shm a pod
# gets without a memory-backed mount.
PREFETCH_BATCHES = 2


class BatchAugment:
    """Random resized crops (and, with ``flip``, horizontal flips) of a whole batch in one
    ``grid_sample`` on the batch's device, each image with its own crop and flip.

    The crops follow torchvision's ``RandomResizedCrop(scale, ratio)``, which thaw applied
    per image on the CPU before: the area a uniform share of ``scale``, the log aspect ratio
    uniform in ``ratio``, up to 10 tries for a crop that fits, else torchvision's fallback:
    the largest central crop within ``ratio`` (the whole image when its own aspect ratio is
    within ``ratio``, as thaw's square images are). Each crop is resized to ``size`` (H, W);
    thaw passes the stored size, and a crop is never larger than the image, so resizing only
    ever enlarges: bilinear sampling needs no antialiasing.

    Random draws come from ``generator`` (``ImageFeed`` passes one seeded by (seed, epoch),
    the same on every process, apart from the global generator that dropout draws from, which
    differs per process), or torch's global one on the batch's device, so a seed repeats
    them. Returns the input's dtype (uint8 rounded).
    """

    TRIES = 10

    def __init__(self, size: list[int], *, flip: bool, scale: tuple[float, float] = (0.6, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size = list(size)
        self.flip = flip
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = ratio

    def __call__(self, images: torch.Tensor, rows: tuple[int, int, int] | None = None, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Augmented ``images``. ``rows`` = (global batch size, start, stop): these images
        are rows start:stop of a global batch split over processes; every process draws the
        whole global batch's crops and uses its rows, so each image gets its own crop and the
        crops do not depend on the number of processes."""
        batch = images if images.ndim == 4 else images[None]
        x = batch if batch.is_floating_point() else batch.float()
        total, start, stop = rows or (len(x), 0, len(x))
        theta = self.crops(total, x.shape[-2:], x.device, generator)[start:stop]
        grid = F.affine_grid(theta, [len(x), x.shape[1], *self.size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        if not batch.is_floating_point():
            out = out.round_().clamp_(0, 255).to(batch.dtype)
        return out if images.ndim == 4 else out[0]

    def crops(self, n: int, size: torch.Size, device: torch.device,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, 2, 3) affine maps from output to input coordinates, one crop (and flip) each."""
        height, width = size
        draw = {"device": device, "generator": generator}
        area = (torch.empty(n, self.TRIES, device=device)
                .uniform_(*self.scale, generator=generator) * height * width)
        aspect = torch.exp(torch.empty(n, self.TRIES, device=device)
                           .uniform_(*self.log_ratio, generator=generator))
        w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
        fits = (w <= width) & (h <= height)
        first = fits.int().argmax(1, keepdim=True)  # the first try that fits
        found = fits.any(1)
        fallback_w, fallback_h = self._fallback(height, width)
        w = torch.where(found, w.gather(1, first)[:, 0], fallback_w)
        h = torch.where(found, h.gather(1, first)[:, 0], fallback_h)
        # a random place for a crop that fitted, the centre for the fallback
        place = torch.where(found[:, None], torch.rand(n, 2, **draw), 0.5)
        left, top = place[:, 0] * (width - w), place[:, 1] * (height - h)
        sign = torch.ones(n, device=device)
        if self.flip:
            sign = torch.where(torch.rand(n, **draw) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0] = sign * w / width
        theta[:, 0, 2] = (left + w / 2) / width * 2 - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (top + h / 2) / height * 2 - 1
        return theta

    def _fallback(self, height: int, width: int) -> tuple[float, float]:
        """torchvision's crop when no try fits: the largest central crop within ``ratio``."""
        low, high = self.ratio
        if width / height < low:
            return float(width), width / low
        if width / height > high:
            return height * high, float(height)
        return float(width), float(height)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of epoch ``epoch`` (0-based) of a run with ``seed``: of the crops (``rank``
    0, the same on every process), and of the global generator that dropout and drop-path
    draw from on process ``rank``, so the processes of a data-parallel stage draw different
    masks, as as many images on one device would. A resumed run draws what an uninterrupted
    one would have."""
    return seed * 100_003 + epoch + 1 + rank * 1_000_000_007


def augmentation(policy: str, size: list[int]) -> BatchAugment | None:
    """The batched transform of an augmentation policy (see ``StageConfig.augment``) to
    images of ``size`` (H, W)."""
    if policy == "none":
        return None
    return BatchAugment(size, flip=policy == "crop_flip")


class EpochShuffle(Sampler[int]):
    """Samples in the order ``epoch_permutation`` gives the epoch set in ``epoch``."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_permutation(self.size, self.seed, self.epoch))

    def __len__(self) -> int:
        return self.size


class GlobalBatches(Sampler[list[int]]):
    """This process's share of each step's global batch: the epoch's order (``order(epoch)``,
    set ``epoch`` before iterating) cut into global batches of ``batch_size * world_size``,
    each cut into contiguous shares (``distributed.share``). One process gets exactly the
    batches ``DataLoader(sampler=EpochShuffle, batch_size)`` gave; several together cover the
    epoch exactly once, and every process gets a share of every step.

    A last global batch shorter than ``world_size`` would leave some processes an empty
    share (an empty batch, which no collate, BatchNorm or DDP step takes): its images join
    the step before, whose global batch grows by fewer than ``world_size`` images (at most
    one more per process). Padding with repeated images would count them twice in the
    gradient and in BatchNorm statistics, dropping them would skip images, and DDP's ``Join``
    shadows only DDP's own all-reduce, not the loss sums of the step; this keeps every
    image once per epoch, every step's gradient the mean over its global batch, and the
    same number of steps on every process."""

    def __init__(self, order: Callable[[int], Sequence[int]], size: int, batch_size: int,
                 ranks: Distributed) -> None:
        if size < ranks.world_size:
            raise ThawError(f"the training split has {size} images, fewer than the "
                            f"{ranks.world_size} training processes: train on fewer")
        self.order = order
        self.size = size
        self.ranks = ranks
        self.global_batch = batch_size * ranks.world_size
        self.epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.order(self.epoch))
        for step in range(len(self)):
            start, stop = self.rows(step)[1:]
            offset = step * self.global_batch
            yield order[offset + start:offset + stop]

    def rows(self, step: int) -> tuple[int, int, int]:
        """(global batch size, start, stop) of this process's rows in ``step``'s batch."""
        last = step == len(self) - 1
        total = self.size - step * self.global_batch if last else self.global_batch
        return (total, *share(total, self.ranks.world_size, self.ranks.rank))

    def __len__(self) -> int:
        full, tail = divmod(self.size, self.global_batch)
        return full + (tail >= self.ranks.world_size or full == 0)


class ImageFeed:
    """Batches of uint8 images read by DataLoader workers (pinned memory on CUDA,
    persistent workers, prefetch), then augmented and normalised as whole batches on the
    device, where it is cheapest: the CPU only reads and collates.

    Under DDP (``ranks``) training batches are this process's share of each global batch
    (``GlobalBatches``) and the batches of an evaluated split this process's contiguous part
    of it (``ranks.concat`` puts the parts back together, in order)."""

    def __init__(self, model: nn.Module, data: PreparedDataset, device: torch.device, *,
                 batch_size: int, augment: str = "none", seed: int = 0,
                 num_workers: int = 0, ranks: Distributed = SINGLE) -> None:
        self.net = model
        self.data = data
        self.device = device
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.ranks = ranks
        manifest = data.manifest
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(manifest.mean, device=device).view(shape) * 255
        self.std = torch.tensor(manifest.std, device=device).view(shape) * 255
        self.augment = augmentation(augment, manifest.input_size[1:])
        self._loaders: dict[tuple[str, bool], DataLoader] = {}

    def batches(self, split: str, *, train: bool, epoch: int = 0) -> Iterator:
        """(normalised float images, labels) on the device; ``train`` shuffles by (seed,
        epoch) and augments. Under DDP: this process's share (see the class)."""
        loader = self._loader(split, train)
        augment = self.augment if train else None
        crops = None
        if train:
            loader.batch_sampler.epoch = epoch
            crops = torch.Generator(self.device).manual_seed(epoch_seed(self.seed, epoch))
        for step, (images, labels) in enumerate(loader):
            images = images.to(self.device, non_blocking=True).float()
            if augment is not None:
                images = augment(images, loader.batch_sampler.rows(step), generator=crops)
            yield self.normalise(images), labels.to(self.device, non_blocking=True)

    def steps_per_epoch(self) -> int:
        """Training steps (global batches) per epoch."""
        return len(self._loader("train", True).batch_sampler)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        images = (images - self.mean) / self.std
        return images.contiguous(memory_format=torch.channels_last)

    def _loader(self, split: str, train: bool) -> DataLoader:
        """One DataLoader per (split, train), kept so its workers live across epochs."""
        key = (split, train)
        if key not in self._loaders:
            dataset = ImageSplit(self.data, split)
            if train:
                # a streamed split orders its samples shard by shard; else a permutation
                # (streamed: each rank's rows of a global batch from its own shards)
                order = partial(dataset.epoch_order, self.seed,
                                readers=self.ranks.world_size,
                                global_batch=self.batch_size * self.ranks.world_size)
                batching = {"batch_sampler": GlobalBatches(order, len(dataset),
                                                           self.batch_size, self.ranks)}
            else:
                # shard by shard: a streamed split is then fetched once, whatever the cache
                order = dataset.storage_order()
                start, stop = share(len(order), self.ranks.world_size, self.ranks.rank)
                if self.ranks.enabled or dataset.streamed:
                    dataset = Subset(dataset, order[start:stop])
                batching = {"batch_size": self.batch_size}
            workers = {"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES
                       } if self.num_workers else {}
            self._loaders[key] = DataLoader(
                dataset,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                generator=_private_generator(self.seed),
                **batching,
                **workers,
            )
        return self._loaders[key]


class FeatureFeed:
    """Pooled backbone features of every image, computed once with the frozen backbone in
    eval mode; the loop then trains only the classifier on them.

    Under DDP every process computes all features and fits the same head on them (the
    same seed gives the same weights): a head fit takes seconds, and the pipeline runs this
    stage on one GPU anyway."""

    # Nothing is split between processes, so nothing is summed or gathered across them.
    ranks = SINGLE

    def __init__(self, model: nn.Module, data: PreparedDataset, device: torch.device, *,
                 batch_size: int, seed: int = 0, num_workers: int = 0) -> None:
        self.net = classifier_modules(model)[0][1]  # the one head (`share_first_head`)
        self.device = device
        self.batch_size = batch_size
        self.seed = seed
        images = ImageFeed(model, data, device, batch_size=batch_size, num_workers=num_workers)
        self.features = {split: self._extract(model, images, split) for split in ("train", "val")}

    @staticmethod
    @torch.no_grad()
    def _extract(model: nn.Module, images: ImageFeed, split: str) -> TensorDataset:
        was_training = model.training
        model.eval()
        feats, labels = [], []
        for x, y in images.batches(split, train=False):
            with torch.autocast(images.device.type, dtype=torch.bfloat16,
                                enabled=images.device.type == "cuda"):
                feats.append(model.forward_head(model.forward_features(x), pre_logits=True)
                             .float())
            labels.append(y)
        model.train(was_training)
        return TensorDataset(torch.cat(feats), torch.cat(labels))

    def steps_per_epoch(self) -> int:
        return -(-len(self.features["train"]) // self.batch_size)

    def batches(self, split: str, *, train: bool, epoch: int = 0) -> Iterator:
        sampler = EpochShuffle(len(self.features[split]), self.seed) if train else None
        if sampler is not None:
            sampler.epoch = epoch
        yield from DataLoader(self.features[split], batch_size=self.batch_size, sampler=sampler,
                              generator=_private_generator(self.seed))


def _private_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator: every new iterator draws a seed for its workers, from
    the global RNG without one, and a persistent iterator does not: that draw would shift the
    augmentations that follow and make a resumed run differ from an uninterrupted one."""
    return torch.Generator().manual_seed(seed)
