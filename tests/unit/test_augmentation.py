"""Augmentation policies: crops keep left and right where they were; only crop_flip mirrors."""

import torch

from thaw.training.feeds import augmentation, epoch_seed


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


def test_crops_follow_their_generator_whatever_the_global_one_draws():
    """Issue 20: the processes of a data-parallel stage seed the global generator (dropout)
    per rank, yet must draw the same crops: crops come from the feed's own generator."""
    augment = augmentation("crop_flip", [32, 32])
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    drawn = []
    for rank in (0, 1):
        torch.manual_seed(epoch_seed(7, 2, rank))
        generator = torch.Generator().manual_seed(epoch_seed(7, 2))
        drawn.append(augment(images, generator=generator))
        torch.rand(5)  # a dropout mask drawn between two batches changes nothing either
    assert torch.equal(drawn[0], drawn[1])
    assert not torch.equal(drawn[0], images)


def test_epoch_seeds_differ_per_rank_and_per_epoch():
    seeds = {epoch_seed(3, epoch, rank) for epoch in range(100) for rank in range(64)}
    assert len(seeds) == 100 * 64
    assert epoch_seed(3, 0) == epoch_seed(3, 0, 0)
