"""Architectures that neither torchvision nor timm provide."""

from __future__ import annotations

import torch
from torch import nn


class CifarNet(nn.Module):
    """The small CIFAR-10 CNN of the PyTorch tutorial and the lecture.

    conv 6@5x5 -> ReLU -> max-pool 2 -> conv 16@5x5 -> ReLU -> max-pool 2 ->
    fc 120 -> fc 84 -> fc classes.  An adaptive pool to 5x5 lets it take inputs
    other than 32 px; at 32 px it is the identity, so the network is exactly the
    published one there.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.AdaptiveMaxPool2d((5, 5)),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
