"""The LoRA stage: probe -> lora on a tiny random-init ViT at 32 px (CPU, about 10 s idle).

Which layers peft adapts follows ``check_target_module_exists`` in
peft/tuners/tuners_utils.py (peft 0.22.0): full module names passed as ``target_modules``.
"""

import shutil

import pytest
import torch

from thaw.backbones import data_config
from thaw.checkpoint import CheckpointMirror, load_checkpoint, model_from_checkpoint
from thaw.config import stage_config
from thaw.errors import ThawError
from thaw.params import check_pipeline_parameters
from thaw.stages import run_stage, score_checkpoint
from thaw.training.lora import adapted_layers, add_adapters, merge_best

ARCH = "vit_tiny_patch16_224"
SIZE = 32
RANK = 4
WIDTH = 192  # vit_tiny's embedding width


@pytest.fixture(scope="module")
def prepared_vit(sample_dir, tmp_path_factory):
    from thaw.data.prepare import prepare_dataset
    from thaw.data.prepared import open_prepared

    out = tmp_path_factory.mktemp("prepared") / "vit32"
    prepare_dataset(str(sample_dir), out, data_config=data_config(ARCH, SIZE))
    return open_prepared(out)


@pytest.fixture(scope="module")
def staged(prepared_vit, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    probe = run_stage(prepared_vit, stage_config("probe", epochs=1), root / "probe",
                      arch=ARCH, weights="none")
    cfg = stage_config("lora", epochs=1, lr=3e-3, lora_rank=RANK, batch_size=32, seed=1)
    lora = run_stage(prepared_vit, cfg, root / "lora", arch=ARCH,
                     init_checkpoint=root / "probe" / "best.pt")
    return root, probe, lora, cfg


def test_only_adapters_and_head_train(staged):
    root, _, lora, _ = staged
    probe_state = load_checkpoint(root / "probe" / "best.pt")["model"]
    merged = load_checkpoint(root / "lora" / "best.pt")["model"]
    # 12 blocks x (qkv 192->576, proj 192->192, fc1 192->768, fc2 768->192), each r*(in+out)
    adapters = 12 * RANK * ((WIDTH + 3 * WIDTH) + 2 * WIDTH + 2 * (WIDTH + 4 * WIDTH))
    head = probe_state["head.weight"].numel() + probe_state["head.bias"].numel()
    assert lora.trainable_params == adapters + head
    assert lora.best_epoch == 1, "one epoch should improve on the probe (0.19 -> 0.43)"
    # best.pt holds a plain timm model: the adapters folded into the weights
    assert set(merged) == set(probe_state)
    adapted = {f"{name}.weight" for name in adapted_layers(model_from_checkpoint(
        load_checkpoint(root / "probe" / "best.pt")))}
    assert len(adapted) == 48
    for name, tensor in probe_state.items():
        if name in adapted:
            delta = (merged[name] - tensor).double()
            rank = torch.linalg.matrix_rank(delta, rtol=1e-4).item()
            assert 1 <= rank <= RANK, (name, rank)  # changed, by a rank-RANK update only
        elif name.startswith("head."):
            assert not torch.equal(merged[name], tensor), name
        else:  # norms, embeddings, biases of adapted layers: frozen
            assert torch.equal(merged[name], tensor), name


def test_merged_checkpoint_serves_what_the_adapters_computed(staged, prepared_vit, tmp_path):
    """last.pt keeps the adapters (for resuming); merged, they give the same outputs."""
    root, _, _, cfg = staged
    raw = load_checkpoint(root / "lora" / "last.pt")
    assert any(".lora_B." in k and raw["model"][k].abs().sum() > 0 for k in raw["model"])
    copy = shutil.copyfile(root / "lora" / "last.pt", tmp_path / "best.pt")
    base = model_from_checkpoint(load_checkpoint(root / "probe" / "best.pt"))
    adapted = add_adapters(base, cfg)
    base.load_state_dict(raw["model"])
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = base.eval()(x)
        merge_best(adapted, copy, CheckpointMirror(None, tmp_path))
        served = model_from_checkpoint(load_checkpoint(copy)).eval()(x)
    assert torch.allclose(served, expected, atol=1e-5, rtol=0)
    score = score_checkpoint(root / "lora" / "best.pt", prepared_vit, "val")
    assert score["images"] == len(prepared_vit.labels("val")) and not score["as_served"]


def test_a_backbone_without_attention_or_mlp_layers_is_refused(prepared_vit, tmp_path):
    with pytest.raises(ThawError, match="lora .*resnet18.*no attention or MLP linear layers"):
        check_pipeline_parameters({"backbone": "resnet18", "image_size": 64, "lora": True})
    check_pipeline_parameters({"backbone": "resnet18", "image_size": 64, "lora": False})
    check_pipeline_parameters({"backbone": ARCH, "image_size": SIZE, "lora": True})
    with pytest.raises(ThawError, match="ResNet has no attention or MLP linear layers"):
        run_stage(prepared_vit, stage_config("lora", epochs=1), tmp_path / "lora",
                  arch="resnet18", weights="none")
    assert not (tmp_path / "lora" / "last.pt").exists()


def test_a_stage_left_off_is_no_candidate(tmp_path):
    """With lora=false the pipeline's lora task only leaves this marker (components/train.py);
    evaluate and register then see the recipe's three stages."""
    from thaw.steps import stage_off_step, trained_stages

    dirs = {stage: tmp_path / stage for stage in ("probe", "partial", "full", "lora")}
    stage_off_step(dirs["lora"], "lora")
    assert trained_stages(dirs) == {s: dirs[s] for s in ("probe", "partial", "full")}
