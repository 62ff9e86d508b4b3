"""Registry entries: every architecture imgcls knows by name."""

from __future__ import annotations

import torchvision
from torch import nn

from ..data.preprocess import Preprocess
from .classic import CifarNet
from .registry import ModelSpec, register

_SMALL = Preprocess(input_size=32, resize="squash", crop_pct=1.0)


def _resnet18(num_classes, input_size, norm, se):
    net = torchvision.models.resnet18(num_classes=num_classes)
    if input_size < 64:
        # small-image stem (as in the CIFAR ResNets): 3x3 stride-1 conv, no max-pool,
        # so a 32 px input still reaches the last stage at 4x4 instead of 1x1
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net


register(ModelSpec("cifarnet", "cnn", lambda n, s, norm, se: CifarNet(n), preprocess=_SMALL,
                   min_input_size=32, max_input_size=384,
                   description="the small CIFAR CNN: conv 6@5x5, pool, conv 16@5x5, pool, fc 120, 84"))
register(ModelSpec("resnet18", "resnet", _resnet18, description="torchvision ResNet-18"))
