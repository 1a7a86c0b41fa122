"""The path that keeps a GPU fed, checked on CPU: batched augmentation on the device (same
crops as the per-image torchvision transform it replaced, labels still aligned), DataLoader
workers that change nothing but speed, metrics and divergence kept on the device, a timer
that includes data loading, and the pipeline parameters that set the worker counts."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torchvision.transforms import v2

from thaw.config import PIPELINE_DEFAULTS, stage_config
from thaw.data.prepared import Manifest, PreparedDataset
from thaw.errors import ThawError
from thaw.training.distributed import SINGLE, Distributed
from thaw.training.feeds import BatchAugment, GlobalBatches, ImageFeed, augmentation
from thaw.training.loop import Diverged, _train_epoch
from thaw.training.optim import build_optimizer, build_scheduler

SIZE = 24
CLASSES = [f"c{i}" for i in range(5)]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def labelled_pixels(tmp_path_factory) -> PreparedDataset:
    return _labelled(40, tmp_path_factory.mktemp("labelled"))


def _labelled(size: int, root: Path) -> PreparedDataset:
    """``size`` train images whose label is written in their pixels: channel 0 is 40 * label
    everywhere, channel 1 a left-to-right ramp (shows flips), channel 2 the image's index."""
    labels = np.arange(size) % len(CLASSES)
    images = np.empty((size, SIZE, SIZE, 3), np.uint8)
    images[..., 0] = (40 * labels)[:, None, None]
    images[..., 1] = np.linspace(0, 250, SIZE).round().astype(np.uint8)[None, None, :]
    images[..., 2] = np.arange(size)[:, None, None]
    shards = {}
    for split, rows in (("train", slice(0, size)), ("val", slice(0, 10))):
        np.save(root / f"images-{split}-00000.npy", images[rows])
        np.save(root / f"labels-{split}-00000.npy", labels[rows].astype(np.int64))
        shards[split] = [f"images-{split}-00000.npy"]
    counts = {split: {c: int((labels[rows] == i).sum()) for i, c in enumerate(CLASSES)}
              for split, rows in (("train", slice(0, size)), ("val", slice(0, 10)))}
    manifest = Manifest(classes=CLASSES, class_to_idx={c: i for i, c in enumerate(CLASSES)},
                        counts=counts, input_size=[3, SIZE, SIZE], mean=MEAN, std=STD,
                        interpolation="bilinear", fingerprint="labelled-pixels", skipped=[],
                        shards=shards, source="test", seed=0, split_fractions=[0.7, 0.15, 0.15])
    (root / "manifest.json").write_text(manifest.to_json())
    return PreparedDataset(root, manifest)


def _feed(data: PreparedDataset, **options) -> ImageFeed:
    return ImageFeed(nn.Identity(), data, torch.device("cpu"), batch_size=16, **options)


def _pixels(feed: ImageFeed, x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: 0..255 values again."""
    return x * feed.std + feed.mean


def _epoch(feed: ImageFeed, epoch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    batches = list(feed.batches("train", train=True, epoch=epoch))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# -- augmentation on whole batches -------------------------------------------------------

@pytest.mark.parametrize("policy", ["crop", "crop_flip"])
def test_batched_augmentation_keeps_shapes_ranges_and_labels(labelled_pixels, policy) -> None:
    feed = _feed(labelled_pixels, augment=policy)
    x, y = _epoch(feed, epoch=1)
    assert x.shape == (40, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    pixels = _pixels(feed, x)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    # Each image still carries its own label: channel 0 is 40 * label at every pixel.
    expected = (40 * y).float().view(-1, 1, 1).expand(-1, SIZE, SIZE)
    torch.testing.assert_close(pixels[:, 0], expected, atol=1e-3, rtol=0)
    assert sorted(y.tolist()) == sorted(labelled_pixels.labels("train").tolist())
    # ... and the images are cropped: the ramp spans less than the whole width in most.
    spans = pixels[:, 1, SIZE // 2, -1] - pixels[:, 1, SIZE // 2, 0]
    assert (spans.abs() < 240).float().mean() > 0.5
    flipped = (spans < 0).float().mean().item()
    assert flipped == 0 if policy == "crop" else 0.2 < flipped < 0.8


def test_batched_augmentation_repeats_with_a_seed(labelled_pixels) -> None:
    """The feed's seed and the epoch fix the crops; the global generator (which dropout
    draws from, seeded per process) does not enter them."""
    first, labels = _epoch(_feed(labelled_pixels, augment="crop_flip", seed=7), epoch=2, seed=1)
    again, labels_again = _epoch(_feed(labelled_pixels, augment="crop_flip", seed=7), epoch=2,
                                 seed=2)
    assert torch.equal(first, again) and torch.equal(labels, labels_again)
    other, _ = _epoch(_feed(labelled_pixels, augment="crop_flip", seed=7), epoch=3, seed=1)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("size", [40, 37, 26])
def test_processes_share_each_global_batch_with_the_crops_of_one_process(size, tmp_path
                                                                        ) -> None:
    """Two processes with batch 8 see the images, crops included, that one process with
    batch 16 sees, each step's rows split between them; 37 = 2 x 16 + 5 and 26 = 16 + 10
    leave a last step of their own, as one process has."""
    data = _labelled(size, tmp_path)
    one = _epoch(_feed(data, augment="crop_flip", seed=3), epoch=1)
    ranks = [ImageFeed(nn.Identity(), data, torch.device("cpu"), batch_size=8,
                       augment="crop_flip", seed=3, ranks=Distributed(rank, 2))
             for rank in (0, 1)]
    steps = []
    for feed in ranks:  # each process seeds the global RNG alike (as _epoch does), then draws
        torch.manual_seed(0)
        steps.append(list(feed.batches("train", train=True, epoch=1)))
    assert len(steps[0]) == len(steps[1]) == -(-size // 16)
    together = [torch.cat([x0, x1]) for (x0, _), (x1, _) in zip(*steps, strict=True)]
    assert torch.equal(torch.cat(together), one[0])


@pytest.mark.parametrize("world", [2, 3, 5, 16])
def test_no_process_gets_an_empty_share_and_the_epoch_is_covered_once(world) -> None:
    """Every split size from ``world`` to 5 global batches, batch 4: whatever the last
    global batch leaves, every process gets a share of every step, all steps have the
    same count on every process, and the shares cover the epoch exactly once."""
    batch = 4
    for size in range(world, 5 * batch * world + 1):
        samplers = [GlobalBatches(lambda epoch, n=size: list(range(n)), size, batch,
                                  Distributed(rank, world)) for rank in range(world)]
        shares = [list(sampler) for sampler in samplers]
        assert len({len(steps) for steps in shares}) == 1, size
        assert all(steps and all(steps) for steps in shares), size
        assert sorted(i for steps in shares for share in steps for i in share) == list(
            range(size)), size
        assert all(len(share) <= batch + 1 for steps in shares for share in steps), size


def test_a_split_smaller_than_the_processes_is_refused() -> None:
    with pytest.raises(ThawError, match="2 images, fewer than the 3 training processes"):
        GlobalBatches(lambda epoch: [0, 1], 2, 4, Distributed(0, 3))


def _crop_share(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(width, height) of each crop as a share of the image, read off ramp images."""
    width = (images[:, 0, 32, -1].float() - images[:, 0, 32, 0].float()) / 255
    height = (images[:, 1, -1, 32].float() - images[:, 1, 0, 32].float()) / 255
    return width, height


def test_crops_are_drawn_like_the_per_image_transform_they_replace() -> None:
    """The same distribution of crop sizes as torchvision's RandomResizedCrop, which thaw
    applied to one image at a time on the CPU before."""
    ramp = torch.linspace(0, 255, 64)
    image = torch.stack([ramp.expand(64, 64), ramp[:, None].expand(64, 64),
                         torch.zeros(64, 64)]).round().to(torch.uint8)
    torch.manual_seed(0)
    per_image = v2.RandomResizedCrop([64, 64], scale=(0.6, 1.0), antialias=True)
    before = _crop_share(torch.stack([per_image(image) for _ in range(600)]))
    batched = augmentation("crop", [64, 64])(image.expand(600, -1, -1, -1).contiguous())
    assert batched.dtype == torch.uint8 and batched.shape == (600, 3, 64, 64)
    after = _crop_share(batched)
    for old, new in zip(before, after, strict=True):
        assert abs(old.mean() - new.mean()) < 0.02 and abs(old.std() - new.std()) < 0.02
        assert new.min() > 0.6 ** 0.5 * (3 / 4) ** 0.5 - 0.02 and new.max() <= 1.0 + 1e-3
    area = after[0] * after[1]
    assert area.min() > 0.6 - 0.03 and area.max() < 1.0 + 0.03


def test_the_fallback_is_torchvisions_central_crop_within_the_ratio() -> None:
    """A 1:4 image, for which no crop of the allowed ratios fits: the largest 3:4 crop."""
    augment = BatchAugment([40, 10], flip=False)
    theta = augment.crops(50, torch.Size([40, 10]), torch.device("cpu"))
    assert torch.allclose(theta[:, 0, 0], torch.ones(50))
    assert torch.allclose(theta[:, 1, 1], torch.full((50,), (10 / 0.75) / 40))
    assert torch.allclose(theta[:, :, 2], torch.zeros(50, 2), atol=1e-6)  # centred


# -- DataLoader workers ------------------------------------------------------------------

def test_workers_change_nothing_but_speed(labelled_pixels) -> None:
    """Two persistent workers give the same batches as reading in the training process,
    epoch after epoch, and each epoch's order is fixed by (seed, epoch) alone, so a run
    resumed at epoch 2 sees what an uninterrupted one does."""
    inline = _feed(labelled_pixels, augment="crop", seed=3)
    workers = _feed(labelled_pixels, augment="crop", seed=3, num_workers=2)
    for epoch in (0, 1, 2):
        x, y = _epoch(workers, epoch)
        x0, y0 = _epoch(inline, epoch)
        assert torch.equal(y, y0) and torch.equal(x, x0)
    loader = workers._loader("train", True)
    assert loader.persistent_workers and loader._iterator is not None  # workers kept
    resumed_x, resumed_y = _epoch(_feed(labelled_pixels, augment="crop", seed=3), 2)
    assert torch.equal(resumed_y, y) and torch.equal(resumed_x, x)
    assert not torch.equal(_epoch(inline, 1)[1], y), "each epoch its own order"


# -- the training step: metrics and divergence on the device, timer with data loading ----

class ListFeed:
    """Given (x, y) batches as the train split, optionally slow to deliver each."""

    ranks = SINGLE

    def __init__(self, batches, delay: float = 0.0) -> None:
        self.net = nn.Linear(4, 3)
        self.device = torch.device("cpu")
        self.items, self.delay = batches, delay

    def batches(self, split, *, train, epoch=0):
        for x, y in self.items:
            time.sleep(self.delay)
            yield x, y


def _batches(n: int, poison: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for step in range(1, n + 1):
        x = torch.randn(8, 4, generator=generator)
        if step == poison:
            x[0, 0] = math.inf
        out.append((x, torch.randint(0, 3, (8,), generator=generator)))
    return out


def _optimizer(net: nn.Linear, steps: int):
    """The loop's optimizer and schedule for a bare linear layer (all of it the head)."""
    cfg = stage_config("probe", epochs=1, lr=0.1, solver="adamw")
    optimizer = build_optimizer(net, SimpleNamespace(head=["weight", "bias"], backbone=[]), cfg)
    return optimizer, build_scheduler(optimizer, cfg, steps)


def _epoch_of(feed: ListFeed, steps: int | None = None):
    """One epoch of the loop over ``feed``; ``steps`` sets the schedule's length."""
    steps = steps or len(feed.items)
    optimizer, scheduler = _optimizer(feed.net, steps)
    return _train_epoch(feed.net, feed, optimizer, scheduler, nn.CrossEntropyLoss(), 0, steps,
                        False)


def test_an_infinite_loss_skips_the_update_on_the_device_and_is_reported() -> None:
    """Step 3 of 6 gets an infinite input: the weights end as they were after step 2 (no
    update from step 3 on), and the epoch ends with the step named."""
    torch.manual_seed(0)
    healthy = ListFeed(_batches(2))
    _epoch_of(healthy, steps=6)
    torch.manual_seed(0)
    poisoned = ListFeed(_batches(6, poison=3))
    with pytest.raises(Diverged, match=r"^training loss became (inf|nan) at epoch 1 step 3$"):
        _epoch_of(poisoned)
    for name, value in healthy.net.state_dict().items():
        assert torch.equal(poisoned.net.state_dict()[name], value), name


def test_epoch_metrics_match_the_per_step_values() -> None:
    """Accumulated on the device, read once: the same mean loss and accuracy as summing
    each step's values on the host."""
    torch.manual_seed(0)
    feed = ListFeed(_batches(5))
    reference = ListFeed(_batches(5))
    reference.net.load_state_dict(feed.net.state_dict())
    result = _epoch_of(feed)
    losses, correct = [], 0
    optimizer, scheduler = _optimizer(reference.net, 5)
    for step, (x, y) in enumerate(reference.items, start=1):
        logits = reference.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step_update(step)
        losses.append(loss.item() * len(y))
        correct += (logits.argmax(1) == y).sum().item()
    assert result["train_images"] == 40
    assert result["train_loss"] == pytest.approx(sum(losses) / 40, rel=1e-6)
    assert result["train_accuracy"] == correct / 40


def test_the_timer_includes_waiting_for_data() -> None:
    """A feed that takes 50 ms per batch: 8 batches take at least 0.4 s of train time,
    so images/s shows a device waiting for data."""
    result = _epoch_of(ListFeed(_batches(8), delay=0.05))
    assert result["train_seconds"] >= 0.4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_training_epoch_does_not_wait_for_the_gpu_at_each_step() -> None:
    """CUDA's sync debug mode warns on every host sync: an epoch of 30 steps has as many as
    one of 10 (the reads at its end and the optimizer's first-step set-up), not 20 more."""
    import warnings

    device = torch.device("cuda")

    def syncs(steps: int) -> int:
        feed = ListFeed([(x.to(device), y.to(device)) for x, y in _batches(steps)])
        feed.net.to(device)
        feed.device = device
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _epoch_of(feed)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    short, long = syncs(10), syncs(30)
    assert long == short <= 4


# -- torch.compile and the runtime settings ----------------------------------------------

def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("train_seconds", "epoch_seconds")}
            for r in history]


@pytest.mark.slow
def test_compile_trains_the_same_and_runtime_settings_do_not_block_resume(prepared_sample,
                                                                          tmp_path) -> None:
    from thaw.stages import run_stage

    def probe(out: str, **settings):
        seen: list[int] = []
        result = run_stage(prepared_sample, stage_config("probe", epochs=2, **settings),
                           tmp_path / out, arch="efficientnet_lite0", weights="packaged",
                           on_epoch_end=lambda r: seen.append(r["epoch"]))
        return result, seen

    from torch._dynamo.utils import counters

    plain, _ = probe("plain")
    graphs = counters["stats"]["unique_graphs"]
    compiled, _ = probe("compiled", compile=True)
    assert counters["stats"]["unique_graphs"] > graphs, "torch.compile traced the network"
    for a, b in zip(plain.history, compiled.history, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert b["val_accuracy"] == a["val_accuracy"]
    again, seen = probe("plain", compile=True, num_workers=1)
    assert seen == [] and _untimed(again.history) == _untimed(plain.history)


# -- the pipeline sets the worker counts --------------------------------------------------

def test_the_pipeline_passes_worker_counts_to_preprocess_and_every_training_step(
        tmp_path: Path) -> None:
    from pipelines.thaw_pipeline import compile_pipeline

    spec = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text())
    pipeline = next(spec)
    inputs = pipeline["root"]["inputDefinitions"]["parameters"]
    assert inputs["num_workers"]["defaultValue"] == PIPELINE_DEFAULTS.num_workers
    assert inputs["preprocess_workers"]["defaultValue"] == PIPELINE_DEFAULTS.preprocess_workers
    tasks = pipeline["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    for name in ("train", "train-2", "train-3"):
        channel = tasks[name]["inputs"]["parameters"]["num_workers"]
        assert channel["componentInputParameter"] == "pipelinechannel--num_workers"
    channel = tasks["preprocess"]["inputs"]["parameters"]["preprocess_workers"]
    assert channel["componentInputParameter"] == "pipelinechannel--preprocess_workers"
