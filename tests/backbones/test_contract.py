"""The backbone contract over the timm zoo: every family below goes through parameter
checking, probe -> partial -> full (one optimizer step each, thaw's own freeze, optimizer
and feed code) and the served model, with random weights and tiny images.

Modelled on timm's own zoo test (huggingface/pytorch-image-models ``tests/test_models.py``,
timm 1.0.31: one small input per model, forward + backward, checks of ``reset_classifier``,
``feature_info`` and ``group_matcher``), with thaw's contract on top: the head is replaced
(distilled models: both heads), the last stage holds a real share of the backbone, the
discriminative LR groups cover every trainable parameter exactly once, and the served model
(``thaw.serving.ImageClassifier``) preprocesses like training and predicts what the trained
model predicts.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from thaw.backbone_contract import MIN_LAST_STAGE_SHARE, classifier_modules
from thaw.backbones import create_backbone, data_config, stage_groups
from thaw.checkpoint import save_checkpoint
from thaw.config import stage_config
from thaw.params import check_pipeline_parameters
from thaw.serving import ImageClassifier
from thaw.training.feeds import ImageFeed
from thaw.training.freeze import apply_trainable, set_train_mode
from thaw.training.optim import build_optimizer, build_scheduler

CLASSES = 10  # the sample's Fashion-MNIST classes
BATCH = 4
# family: (tiny timm model, input size it is tested at: 32 px unless it needs more)
FAMILIES = {
    "resnet": ("resnet18", 32),
    "efficientnet": ("efficientnet_lite0", 32),
    "mobilenetv3": ("mobilenetv3_small_050", 32),
    "mobilenetv4": ("mobilenetv4_conv_small", 32),
    "convnext": ("convnext_atto", 32),
    "convnextv2": ("convnextv2_atto", 32),
    "regnet": ("regnetx_002", 32),
    "mobilevit": ("mobilevit_xxs", 32),
    "efficientvit_mit": ("efficientvit_b0", 32),
    "efficientvit_msra": ("efficientvit_m0", 64),  # img_size; 16x16 patches x stride 4
    "ghostnet": ("ghostnet_050", 32),
    # fastvit_t8 is left out: its backward on channels_last CPU tensors (what ImageFeed
    # gives) aborts the process with heap corruption in torch 2.15 (32-64 px, checked).
    "rexnet": ("rexnet_100", 32),
    "hgnetv2": ("hgnetv2_b0", 32),
    "dla": ("dla34", 32),  # a 1x1 conv classifier
    "lcnet": ("lcnet_050", 32),
    "starnet": ("starnet_s050", 32),
    "repvit": ("repvit_m0_9", 32),
    "edgenext": ("edgenext_xx_small", 32),
    "pvt_v2": ("pvt_v2_b0", 32),
    "densenet": ("densenet121", 32),
    "vit": ("vit_tiny_patch16_224", 32),  # BatchNorm-free, img_size resamples pos_embed
    "xcit": ("xcit_nano_12_p16_224", 32),
    "eva02": ("eva02_tiny_patch14_224", 56),  # patch 14: 56, not 64
    "swin": ("swin_tiny_patch4_window7_224", 32),
    "maxvit": ("maxvit_nano_rw_256", 64),  # img_size sets the attention window
    "deit_distilled": ("deit_tiny_distilled_patch16_224", 32),  # two heads
    "levit_distilled": ("levit_128s", 64),  # two heads, attention biases at img_size
    "efficientformerv2": ("efficientformerv2_s0", 64),  # two heads
    "metaformer": ("caformer_s18", 32),  # no group_matcher, BatchNorm-free
    "pit": ("pit_ti_224", 32),  # no group_matcher
}
SIZES = sorted({size for _, size in FAMILIES.values()})
# Where the last stage must start: the families whose last stage is not obvious.
LAST_STAGE_STARTS = {
    "densenet121": "features.denseblock4.",  # not norm5 alone (0 % of the parameters)
    "caformer_s18": "stages.3.",
    "pit_ti_224": "transformers.2.",
    "resnet18": "layer4.",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning threads make these tiny
    steps several times slower, never faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, sample_dir: Path):
    """The sample prepared once per tested input size (ImageNet mean/std, like most
    families' configs; checkpoints carry the data's config, as training writes it)."""
    from thaw.data.prepare import prepare_dataset
    from thaw.data.prepared import open_prepared

    datasets = {}
    for size in SIZES:
        out = tmp_path_factory.mktemp(f"zoo{size}") / "data"
        prepare_dataset(str(sample_dir), out, data_config=data_config("resnet18", size))
        datasets[size] = open_prepared(out)
    return datasets


@pytest.fixture(scope="module", params=FAMILIES.values(), ids=FAMILIES.keys())
def backbone(request):
    """(arch, size, model with a fresh head): built once per family."""
    arch, size = request.param
    torch.manual_seed(0)
    return arch, size, create_backbone(arch, CLASSES, "none", image_size=size)


def test_parameter_checking_accepts_the_family_at_its_size(backbone):
    arch, size, _ = backbone
    check_pipeline_parameters({"backbone": arch, "image_size": size})


def test_every_head_is_replaced(backbone):
    _, size, model = backbone
    heads = classifier_modules(model)
    assert heads and all(_outputs(head) == CLASSES for _, head in heads)
    assert model.eval()(torch.zeros(2, 3, size, size)).shape == (2, CLASSES)


def test_last_stage_holds_a_real_share_of_the_backbone(backbone):
    arch, _, model = backbone
    groups = stage_groups(model)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    backbone_total = sum(sizes[n] for names in groups.backbone for n in names)
    share = sum(sizes[n] for n in groups.backbone[-1]) / backbone_total
    assert MIN_LAST_STAGE_SHARE <= share < 0.95
    assert len(groups.backbone) >= 2
    if arch in LAST_STAGE_STARTS:
        assert groups.backbone[-1][0].startswith(LAST_STAGE_STARTS[arch])


def test_lr_groups_cover_every_parameter_exactly_once(backbone):
    _, _, model = backbone
    groups = stage_groups(model)
    names = [n for names in [groups.head, *groups.backbone] for n in names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    apply_trainable(model, groups.trainable("all"))
    optimizer = build_optimizer(model, groups, stage_config("full"))
    in_optimizer = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(in_optimizer) == sorted(id(p) for p in model.parameters())


def test_probe_partial_full_one_step_each_then_served(backbone, prepared, tmp_path):
    arch, size, model = backbone
    data = prepared[size]
    groups = stage_groups(model)
    for stage in ("probe", "partial", "full"):
        cfg = stage_config(stage, batch_size=BATCH, augment="crop")
        trainable = groups.trainable(cfg.trainable)
        apply_trainable(model, trainable)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _one_step(model, groups, cfg, data)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed <= trainable, f"{stage} moved frozen parameters"
        assert changed & set(groups.head), f"{stage} did not train the head"
        if stage != "probe":
            assert changed & set(groups.backbone[-1]), f"{stage} did not train the last stage"
    _assert_served_like_trained(model, data, tmp_path / "best.pt")


def _one_step(model: nn.Module, groups, cfg, data) -> None:
    """One optimizer step of the training loop's own parts, on a real augmented batch."""
    optimizer = build_optimizer(model, groups, cfg)
    build_scheduler(optimizer, cfg, steps_per_epoch=1)
    set_train_mode(model, cfg.update_bn_stats)
    feed = ImageFeed(model, data, torch.device("cpu"), batch_size=BATCH, augment=cfg.augment)
    x, y = next(iter(feed.batches("train", train=True)))
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _assert_served_like_trained(model: nn.Module, data, path: Path) -> None:
    """The served model, rebuilt from a checkpoint as registration does, keeps training's
    data config and gives the trained model's probabilities on evaluation's batches."""
    save_checkpoint(path, model, {"classes": data.manifest.classes,
                                  "data_config": data.manifest.data_config()})
    served = ImageClassifier()
    served.load_context(SimpleNamespace(artifacts={"checkpoint": str(path)}))
    assert served.data_config == data.manifest.data_config()
    feed = ImageFeed(model, data, torch.device("cpu"), batch_size=BATCH)
    x, _ = next(iter(feed.batches("test", train=False)))
    with torch.no_grad():
        expected = model.eval()(x).softmax(1).numpy()
    got = served.predict(None, np.asarray(data.images("test")[:BATCH]))["probabilities"]
    np.testing.assert_allclose(np.stack(got), expected, atol=1e-4)


def _outputs(head: nn.Module) -> int:
    """Classes a classifier module outputs (a Linear, a 1x1 conv, or a head block)."""
    if isinstance(head, nn.Linear):
        return head.out_features
    if isinstance(head, nn.Conv2d):
        return head.out_channels
    last = [m for m in head.modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]
    return _outputs(last)
