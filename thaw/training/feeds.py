"""What the training loop iterates over: images (augmented, normalised on the device) or,
for the head-only stage, backbone features computed once."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from thaw.data.prepared import ImageSplit, PreparedDataset


class ImageFeed:
    """Batches of uint8 images; augmentation per sample on tensors (DataLoader workers),
    normalisation on the device where it is cheapest."""

    def __init__(self, model: nn.Module, data: PreparedDataset, device: torch.device, *,
                 batch_size: int, augment: str = "none", seed: int = 0,
                 num_workers: int = 0) -> None:
        self.net = model
        self.data = data
        self.device = device
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        manifest = data.manifest
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(manifest.mean, device=device).view(shape) * 255
        self.std = torch.tensor(manifest.std, device=device).view(shape) * 255
        self.augment = augmentation(augment, manifest.input_size[1:])

    def batches(self, split: str, *, train: bool, epoch: int = 0) -> Iterator:
        dataset = ImageSplit(self.data, split, transform=self.augment if train else None)
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            generator=_epoch_generator(self.seed, epoch),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for images, labels in loader:
            yield self.to_input(images), labels.to(self.device, non_blocking=True)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        images = (images - self.mean) / self.std
        return images.contiguous(memory_format=torch.channels_last)


def augmentation(policy: str, size: list[int]) -> v2.Compose | None:
    """The per-sample transform of an augmentation policy (see ``StageConfig.augment``)."""
    if policy == "none":
        return None
    steps = [v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True)]
    if policy == "crop_flip":
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


class FeatureFeed:
    """Pooled backbone features of every image, computed once with the frozen backbone in
    eval mode; the loop then trains only the classifier on them."""

    def __init__(self, model: nn.Module, data: PreparedDataset, device: torch.device, *,
                 batch_size: int, seed: int = 0, num_workers: int = 0) -> None:
        self.net = model.get_classifier()
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

    def batches(self, split: str, *, train: bool, epoch: int = 0) -> Iterator:
        yield from DataLoader(self.features[split], batch_size=self.batch_size, shuffle=train,
                              generator=_epoch_generator(self.seed, epoch))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling order fixed by (seed, epoch), so a resumed run sees the same batches."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)
