"""The model wrapper every imgcls run trains, saves and exports.

``Classifier`` = input scaling/normalization + a backbone network ``net``.  It
takes uint8 (or float in [0, 255]) NCHW batches, so decoded images stay uint8
(4x less memory and copying) until they reach the model, and an exported ONNX
file needs no normalization code on the client side.  The normalization is one
fused multiply-add: ``(x / 255 - mean) / std == x * scale + shift``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.preprocess import Preprocess


class Classifier(nn.Module):
    def __init__(self, net: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.net = net
        self.preprocess = preprocess
        mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
        # not saved with the weights: they are derived from preprocess.json
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            x = x.to(self.scale.dtype)
        return x * self.scale + self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
