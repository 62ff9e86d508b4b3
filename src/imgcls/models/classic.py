"""Architectures (and variants) that neither torchvision nor timm provide.

* :class:`CifarNet`: the small CIFAR-10 CNN of the PyTorch tutorial.
* :class:`SoftmaxRegression`: the linear softmax classifier on raw pixels.
* :class:`AirbenchNet`: the compact VGG-like CNN of the fastest CIFAR-10 recipes.
* VGG configurations A-LRN and C (Simonyan & Zisserman, 2015, Table 1), built
  with torchvision's own :class:`torchvision.models.VGG` so the layout and the
  state-dict names are exactly those of torchvision's VGGs.
* Squeeze-and-excitation variants of torchvision's ResNet blocks and of VGG.
* The small-image stems for ResNet and AlexNet.

Everything torchvision has (VGG A/B/D/E, AlexNet, ResNet) is built by
torchvision; this module only changes what the options ask for.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import VGG
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vgg import cfgs as _TV_VGG_CFGS

from .blocks import make_norm, squeeze_excite

SMALL_INPUT = 64
"""Inputs below this many pixels get the small-image stems below."""


class CifarNet(nn.Module):
    """The small CIFAR-10 CNN of the PyTorch tutorial and the lecture.

    conv 6@5x5 -> ReLU -> max-pool 2 -> conv 16@5x5 -> ReLU -> max-pool 2 ->
    fc 120 -> fc 84 -> fc classes.  An adaptive max-pool to 5x5 lets it take
    inputs other than 32 px; at 32 px it is the identity, so the network is
    exactly the published one there.

    ``norm`` (one of :data:`imgcls.models.blocks.NORM_KINDS`) inserts a
    normalization layer right after each conv, before its ReLU (the
    published net has none); ``norm=None`` is the published net.
    """

    def __init__(self, num_classes: int = 10, norm: str | None = None):
        super().__init__()

        def conv(cin, cout):
            layers = [nn.Conv2d(cin, cout, 5)]
            if norm is not None:
                layers.append(make_norm(norm, cout))
            return layers + [nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]

        self.features = nn.Sequential(*conv(3, 6), *conv(6, 16), nn.AdaptiveMaxPool2d((5, 5)))
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SoftmaxRegression(nn.Module):
    """The linear softmax classifier: flatten the pixels, one Linear layer.

    ``logits = W x + b`` with ``x`` the ``3 * S * S`` (normalized) pixel values
    of an ``S`` x ``S`` image; the softmax itself lives in the loss
    (cross-entropy) and in prediction, so the module returns logits like every
    other model.  The weight matrix has one row per class, so it is tied to
    the input size it was built for.
    """

    def __init__(self, num_classes: int, input_size: int = 32):
        super().__init__()
        self.input_size = input_size
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(3 * input_size * input_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(x))


WHITEN_BIAS_EPOCHS = 3  # airbench94's whiten_bias_epochs


class AirbenchNet(nn.Module):
    """The compact CNN of the fastest CIFAR-10 training recipes: Jordan's airbench94 (2024), a
    descendant of Page's DAWNBench ResNet-9 (2018).

    stem: conv 2x2 (24 channels, no padding), BatchNorm, GELU; then three groups of
    conv 3x3, max-pool 2, BatchNorm, GELU, conv 3x3, BatchNorm, GELU (``widths``, 64/256/256 as
    airbench94); a global max-pool and one linear layer.  Convs carry no bias (BatchNorm's does
    that job).  Both recipes scale the logits down (airbench by 1/9, ResNet-9 by 1/8) so that the
    high learning rates they train with do not make the head jump; here the pooled features are
    scaled by ``feature_scale`` before the linear layer, which gives its weights the same logits and
    the same updates and keeps ``fc`` the layer that produces the logits.
    A global max-pool instead of airbench's fixed 3x3 one lets it take other input sizes (at 32 px
    the two agree).

    ``whiten=False`` (``airbench``): the stem is an ordinary learned conv followed by BatchNorm, so
    the net needs no data.  ``whiten=True`` (``airbench94``, the published net): the stem is a
    :class:`WhiteningConv` set from the training images (:meth:`init_from_data`) and a GELU; every
    BatchNorm keeps its scale at 1 and trains only its shift (:class:`ShiftOnlyBatchNorm`, eps
    1e-12, momentum 0.4); the 3x3 convs start as identities on their first channels (Dirac), and
    the head has no bias, its input scaled by 1/9.  The stem's bias trains in the first three epochs
    only (:meth:`start_epoch`).
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256), stem: int = 24,
                 feature_scale: float = 0.125, whiten: bool = False):
        super().__init__()
        self.feature_scale = feature_scale
        self.whiten = whiten
        norm = ShiftOnlyBatchNorm if whiten else nn.BatchNorm2d

        def bn_gelu(c):
            return [norm(c), nn.GELU()]

        def group(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), *bn_gelu(cout),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False), *bn_gelu(cout))

        if whiten:
            self.stem = nn.Sequential(WhiteningConv(3, 2), nn.GELU())
            stem = self.stem[0].out_channels
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, stem, 2, bias=False), *bn_gelu(stem))
        channels = (stem, *widths)
        self.layers = nn.Sequential(*(group(a, b) for a, b in zip(channels, channels[1:])))
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(widths[-1], num_classes, bias=not whiten)
        for m in self.layers.modules():
            if not isinstance(m, nn.Conv2d):
                continue
            if whiten:  # default init plus an identity on the first channels: an implicit residual
                nn.init.dirac_(m.weight.data[:m.in_channels])
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if not whiten:
            nn.init.kaiming_normal_(self.stem[0].weight, mode="fan_out", nonlinearity="relu")

    def init_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialization (the training loop calls it once, from scratch, with a few
        thousand normalized training images): the whitening stem's filters."""
        if self.whiten:
            self.stem[0].init_from_data(images)

    def start_epoch(self, epoch: int) -> None:
        """Called by the training loop before each (0-based) epoch, after it has set which parameters
        train: the whitening stem's bias trains in the first ``WHITEN_BIAS_EPOCHS`` only, as airbench94
        does, and after them the first group's input gradient is no longer computed.  It only ever
        freezes, so a frozen backbone stays frozen."""
        if self.whiten and epoch >= WHITEN_BIAS_EPOCHS:
            self.stem[0].bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))) * self.feature_scale)


class WhiteningConv(nn.Conv2d):
    """A ``k`` x ``k`` conv whose filters are fixed by the data: the eigenvectors of the training
    patches' covariance, each scaled by 1 / sqrt(eigenvalue + ``eps``), and their negatives (so a
    GELU after it keeps both signs), 2 x C x k x k filters in all.  Its output is decorrelated and of
    unit variance from the first step.  The filters are a buffer (saved, never trained); the bias
    trains.  Until :meth:`init_from_data` runs they are random (the network still runs)."""

    def __init__(self, in_channels: int = 3, kernel_size: int = 2, eps: float = 5e-4):
        super().__init__(in_channels, 2 * in_channels * kernel_size ** 2, kernel_size, bias=True)
        weight = self.weight.detach().clone()
        del self.weight
        self.register_buffer("weight", weight)
        nn.init.zeros_(self.bias)
        self.eps = eps

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """``images``: normalized training images (N, C, H, W), a few thousand."""
        c, (h, w) = images.shape[1], self.kernel_size
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
        covariance = patches.T @ patches / len(patches)
        values, vectors = torch.linalg.eigh(covariance)
        filters = (vectors.T / torch.sqrt(values + self.eps)[:, None]).flip(0).reshape(-1, c, h, w)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))


class ShiftOnlyBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1 (a buffer) and whose shift (bias) trains: airbench94's norm layer."""

    def __init__(self, num_features: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(num_features, eps=eps, momentum=momentum)
        del self.weight
        self.register_buffer("weight", torch.ones(num_features))


# --- VGG -----------------------------------------------------------------

# Simonyan & Zisserman, Table 1.  An int is a 3x3 conv (pad 1) with that many
# output channels, ``(C, 1)`` a 1x1 conv (pad 0), "M" a 2x2 max-pool.
# A, B, D, E are torchvision's (``torchvision.models.vgg.cfgs``); C is the one
# torchvision lacks: D with the third conv of blocks 3-5 a 1x1 conv.
VGG_CFGS: dict[str, list] = {
    **_TV_VGG_CFGS,
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M",
          512, 512, (512, 1), "M", 512, 512, (512, 1), "M"],
}


def lrn() -> nn.LocalResponseNorm:
    """AlexNet's local response normalization (size 5, alpha 1e-4, beta 0.75, k 2),
    as used by VGG A-LRN.  PyTorch (like Caffe) divides alpha by ``size``."""
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)


def vgg_features(cfg: list, norm: str | None = None, lrn_after_first: bool = False) -> nn.Sequential:
    """VGG convolutional layers in torchvision's ``make_layers`` layout.

    Each conv is followed by ``make_norm(norm, C)`` when ``norm`` is given
    (``norm="batch"`` gives exactly torchvision's ``_bn`` layout) and a ReLU;
    ``lrn_after_first`` puts one LocalResponseNorm right after the first
    conv's ReLU (configuration A-LRN).
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels, kernel = item if isinstance(item, tuple) else (item, 3)
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=kernel // 2))
        if norm is not None:
            layers.append(make_norm(norm, out_channels))
        layers.append(nn.ReLU(inplace=True))
        if lrn_after_first and in_channels == 3:
            layers.append(lrn())
        in_channels = out_channels
    return nn.Sequential(*layers)


def vgg(cfg: str, num_classes: int, norm: str | None = None, lrn_after_first: bool = False) -> VGG:
    """A VGG of configuration ``cfg`` ("A".."E") as a torchvision ``VGG``:
    same features / avgpool (adaptive 7x7) / classifier modules and the same
    weight initialization as torchvision's own VGGs."""
    return VGG(vgg_features(VGG_CFGS[cfg], norm, lrn_after_first), num_classes=num_classes, init_weights=True)


def add_se_to_vgg(net: VGG) -> VGG:
    """Insert one squeeze-and-excitation block at the end of each VGG conv
    block (stage), i.e. after the block's last ReLU, right before its
    max-pool: ``features[i] = Sequential(SE(C), MaxPool2d)``.  Wrapping the
    pool in place keeps the indices (and state-dict keys) of every conv and
    norm layer unchanged.  Works in place and returns ``net``."""
    channels = None
    for index, layer in enumerate(net.features):
        if isinstance(layer, nn.Conv2d):
            channels = layer.out_channels
        elif isinstance(layer, nn.MaxPool2d):
            net.features[index] = nn.Sequential(squeeze_excite(channels), layer)
    return net


# --- ResNet ----------------------------------------------------------------

RESNET_LAYERS: dict[int, tuple[type, list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


class SEBasicBlock(BasicBlock):
    """torchvision's BasicBlock with SE on the residual branch, after ``bn2``
    and before the addition (Hu et al., Fig. 3)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.se = squeeze_excite(self.conv2.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class SEBottleneck(Bottleneck):
    """torchvision's Bottleneck with SE on the residual branch, after ``bn3``
    and before the addition (Hu et al., Fig. 3)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.se = squeeze_excite(self.conv3.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


_SE_BLOCKS = {BasicBlock: SEBasicBlock, Bottleneck: SEBottleneck}


def se_resnet(depth: int, num_classes: int) -> ResNet:
    """SE-ResNet-``depth``: torchvision's ``ResNet`` class with SE blocks
    (r = 16) in every residual block.  All non-SE parameters have the same
    names and shapes as in torchvision's ``resnet{depth}``; SE adds
    ``layerX.Y.se.fc1`` / ``fc2``."""
    block, layers = RESNET_LAYERS[depth]
    return ResNet(_SE_BLOCKS[block], layers, num_classes=num_classes)


def small_resnet_stem(net: ResNet) -> ResNet:
    """Small-image stem (CIFAR ResNets): conv1 becomes a 3x3 stride-1 conv
    (64 channels, no bias, He-initialized like torchvision's convs) and the
    max-pool is dropped, so the stem no longer downsamples by 4: a 32 px
    input reaches the last stage at 4x4 instead of 1x1.  conv1's weight shape
    changes (7x7 -> 3x3), so ImageNet weights for conv1 do not fit."""
    net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net


def small_alexnet_stem(net: nn.Module) -> nn.Module:
    """AlexNet below 64 px: the first conv (11x11, pad 2) keeps its weights
    but its stride goes from 4 to 1.  With stride 4 a 32 px input shrinks to
    1x1 before the third max-pool and the net fails; with stride 1 it is
    26 -> 12 -> 5 -> 2 px there, and the adaptive 6x6 average pool feeds the
    classifier as usual.  The weight shape is unchanged, so ImageNet weights
    still load."""
    net.features[0].stride = (1, 1)
    return net
