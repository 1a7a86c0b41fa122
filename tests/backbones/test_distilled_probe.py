"""The head-only probe of a distilled model (two heads, timm's DeiT and LeViT) fits one head
on cached pooled features; the model saved from it must score what the probe measured.
timm 1.0 ``deit.py`` / ``levit.py`` ``forward_head``: pre-logits are the mean of the class and
distillation tokens (DeiT) or the pooled features both heads see (LeViT), and the logits the
mean of the two heads' outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import SAMPLE_DIR
from thaw.backbones import create_backbone, data_config
from thaw.checkpoint import load_checkpoint, model_from_checkpoint
from thaw.config import stage_config
from thaw.data.prepare import prepare_dataset
from thaw.data.prepared import open_prepared
from thaw.stages import predict_split
from thaw.training import train_stage


@pytest.mark.parametrize(("arch", "size"), [("deit_tiny_distilled_patch16_224", 32),
                                             ("levit_128s", 64)])
def test_a_distilled_models_probe_scores_the_same_once_saved(arch, size, tmp_path: Path):
    prepare_dataset(str(SAMPLE_DIR), tmp_path / "prepared", data_config=data_config(arch, size))
    data = open_prepared(tmp_path / "prepared")
    torch.manual_seed(0)
    model = create_backbone(arch, len(data.manifest.classes), "none", image_size=size)
    result = train_stage(model, data, stage_config("probe", epochs=1), tmp_path / "probe")
    assert result.cached_features
    saved = model_from_checkpoint(load_checkpoint(tmp_path / "probe" / "best.pt"))
    labels, probs = predict_split(saved, data, "val")
    accuracy = float((probs.argmax(1) == torch.as_tensor(labels)).float().mean())
    assert accuracy == pytest.approx(result.best_val["accuracy"], abs=1e-6)
    first, second = (saved.get_submodule(name).state_dict() for name in ("head", "head_dist"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)  # tied by the probe
