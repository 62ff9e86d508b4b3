"""Progressive resizing (``--progressive MIN_PX SHARE``): the first epochs train on smaller inputs.

A convolution's cost grows with the pixels, and early epochs learn coarse features that do not need
the full resolution (fast.ai's and FFCV's progressive resizing).  The input side grows linearly from
``MIN_PX`` at the first epoch to the full size at ``SHARE`` of the epochs (rounded to an epoch), in
steps of an eighth of the full size (4 px at 32, 28 px at 224), and stays there; validation,
calibration and export always see the full size.  Batches are shrunk on the training device after
augmentation, by an antialiased bilinear resize, so both data paths (the array cache and per-image
decoding) get it alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError

STEPS = 8  # the side grows in steps of full // STEPS pixels


def epoch_size(full: int, progressive, epoch: int, epochs: int) -> int:
    """The input side of 0-based ``epoch`` of ``epochs`` (``full`` without ``progressive``)."""
    if not progressive:
        return full
    low, share = int(progressive[0]), float(progressive[1])
    ramp = max(1, math.floor(share * epochs + 0.5))  # the first epoch at the full size
    if epoch >= ramp:
        return full
    step = max(1, full // STEPS)
    grown = low + (full - low) * epoch / ramp
    return max(low, math.floor(grown / step) * step)  # grown < full before the ramp's end


def check(progressive, full: int, smallest: int, model: str) -> None:
    """A UserError unless ``MIN_PX`` lies between the model's smallest input and the full size, and the
    share of the epochs is in (0, 1]."""
    if not progressive:
        return
    low, share = progressive
    if low != int(low) or not smallest <= low < full:
        raise UserError(f"--progressive {low:g} {share:g}: the first side must be a whole number of pixels from"
                        f" {smallest} ({model}'s smallest input) up to below the input size, {full}")
    if not 0 < share <= 1:
        raise UserError(f"--progressive {low:g} {share:g}: the share of the epochs that grow the side must be"
                        " in (0, 1]")


def shrink(images: torch.Tensor, size: int) -> torch.Tensor:
    """An (N, C, S, S) batch (uint8, or float in [0, 255]) at ``size`` x ``size``, as float; unchanged at S."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = images if images.is_floating_point() else images.float()
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
