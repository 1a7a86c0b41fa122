"""Augmentation policies: crops keep left and right where they were; only crop_flip mirrors."""

import torch

from thaw.training.feeds import augmentation


def _left_to_right_ramp(size=32):
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8)
    return ramp.expand(3, size, size).clone()


def _mirrored(image: torch.Tensor) -> bool:
    row = image[0, image.shape[1] // 2].float()
    return bool(row[0] > row[-1])


def test_crop_never_mirrors_and_crop_flip_does():
    torch.manual_seed(0)
    image = _left_to_right_ramp()
    crop, crop_flip = augmentation("crop", [32, 32]), augmentation("crop_flip", [32, 32])
    crops = [crop(image) for _ in range(40)]
    assert all(c.shape == image.shape and c.dtype == torch.uint8 for c in crops)
    assert not any(_mirrored(c) for c in crops)
    assert any(not torch.equal(c, image) for c in crops)  # it does crop
    assert any(_mirrored(crop_flip(image)) for _ in range(40))


def test_none_means_no_transform():
    assert augmentation("none", [32, 32]) is None
