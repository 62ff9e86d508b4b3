"""Training augmentation of whole batches on the training device, from the same :class:`Augment`.

The array cache (:mod:`imgcls.data.arraycache`) hands the epoch loop uint8 batches of
equal squares; this module augments them at once instead of image by image:

* ``crop_padding > 0``: pad by that many pixels (reflect or zero) and take a random
  ``input_size`` crop (the CIFAR recipe), one gather for the batch; else a random resized
  crop with ``crop_scale``/``crop_ratio`` (torchvision's sampling of the box), resampled
  by ``torchvision.ops.roi_align``, which averages over each output pixel's area;
* ``hflip``: half of the images mirrored (folded into the crop's gather); with ``alternate_flip``
  a fixed half of the images (by index) in even epochs and the other half in odd ones, as
  airbench94 does, so each image is seen both ways in any two epochs in a row;
* ``color_jitter``: brightness, contrast and saturation factors in [1 - j, 1 + j], a j each;
* ``cutout``: a ``cutout`` x ``cutout`` square (clipped at the border) set to the
  normalization mean, which is 0 after normalization.

Every random number comes from the CPU generator passed in (the epoch's), so an epoch's
augmentation is the same on every device and after ``--resume``.  The output is float32
in [0, 255]; :class:`imgcls.models.classifier.Classifier` scales and normalizes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .preprocess import Augment, Preprocess

_PAD = {"reflect": "reflect", "zero": "constant"}
_GRAY = (0.299, 0.587, 0.114)


def _uniform(n: int, low: float, high: float, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def pad_crop_flip(x: torch.Tensor, size: int, padding: int, mode: str, top: torch.Tensor, left: torch.Tensor,
                  flip: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): image b's crop at (``top[b]``, ``left[b]``) of the image padded by
    ``padding``, mirrored where ``flip[b]``."""
    if padding:
        x = F.pad(x, (padding,) * 4, mode=_PAD[mode])
    steps = torch.arange(size, device=x.device)
    rows = top.to(x.device)[:, None] + steps                                       # (B, size)
    cols = left.to(x.device)[:, None] + torch.where(flip.to(x.device)[:, None], size - 1 - steps, steps)
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def fixed_half(index: torch.Tensor) -> torch.Tensor:
    """A bit per dataset row that does not change between epochs or runs, true for about half of the rows
    in any stretch of them (a multiplicative hash: rows in class order are not split by parity)."""
    return ((index.to(torch.int64) * 2654435761) >> 16) % 2 == 1


def resized_crop_boxes(n: int, height: int, width: int, scale, ratio, generator, tries: int = 10) -> torch.Tensor:
    """(n, 4) boxes x0, y0, x1, y1 sampled as torchvision's ``RandomResizedCrop.get_params``: ``tries`` draws of
    area and log-ratio, the first that fits, else the whole image clamped to the ratio range."""
    area = height * width
    target = area * _uniform(n * tries, scale[0], scale[1], generator).view(n, tries)
    aspect = torch.exp(_uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), generator)).view(n, tries)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1)
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    in_ratio = width / height
    fw, fh = ((width, round(width / min(ratio))) if in_ratio < min(ratio) else
              (round(height * max(ratio)), height) if in_ratio > max(ratio) else (width, height))
    none = ~fits.any(1)
    w, h = torch.where(none, float(fw), w), torch.where(none, float(fh), h)
    x0 = torch.floor(torch.rand(n, generator=generator) * (width - w + 1))
    y0 = torch.floor(torch.rand(n, generator=generator) * (height - h + 1))
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def jitter(x: torch.Tensor, strengths: tuple[float, float, float], generator) -> torch.Tensor:
    """Brightness, contrast, then saturation, each by its own factor per image in [1 - j, 1 + j], j its strength."""
    n = x.shape[0]
    b, c, s = (_uniform(n, max(0.0, 1 - j), 1 + j, generator).to(x.device).view(n, 1, 1, 1) for j in strengths)
    x = (x * b).clamp(0, 255)
    weights = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    gray_mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - gray_mean) * c + gray_mean).clamp(0, 255)
    gray = (x * weights).sum(1, keepdim=True)
    return ((x - gray) * s + gray).clamp(0, 255)


def cutout(x: torch.Tensor, side: int, fill: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """Image b's ``side`` x ``side`` square centred at (``cy[b]``, ``cx[b]``), clipped at the border, set to ``fill``
    (C,)."""
    h, w = x.shape[-2:]
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    y0 = cy.to(x.device)[:, None] - side // 2
    x0 = cx.to(x.device)[:, None] - side // 2
    inside = (((ys >= y0) & (ys < y0 + side))[:, :, None] & ((xs >= x0) & (xs < x0 + side))[:, None, :])
    return torch.where(inside[:, None], fill.to(x.device, x.dtype).view(1, -1, 1, 1), x)


class BatchAugment:
    """``augment(uint8 (B, C, H, W) on any device, generator)`` -> float32 (B, C, S, S) on that device."""

    def __init__(self, spec: Preprocess, augment: Augment):
        self.size = spec.input_size
        self.augment = augment
        self.fill = torch.tensor([255.0 * m for m in spec.mean])

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, index: torch.Tensor | None = None,
                 epoch: int = 0) -> torch.Tensor:
        """``index``: the images' rows in the dataset and ``epoch``: what alternating flips need."""
        a, n, size = self.augment, x.shape[0], self.size
        x = x.float()
        flip = (torch.rand(n, generator=generator) < 0.5) if a.hflip else torch.zeros(n, dtype=torch.bool)
        if a.hflip and a.alternate_flip and index is not None:
            flip = fixed_half(index) ^ bool(epoch % 2)
        if a.crop_padding:
            span = x.shape[-1] + 2 * a.crop_padding - size + 1
            top = torch.randint(0, span, (n,), generator=generator)
            left = torch.randint(0, span, (n,), generator=generator)
            x = pad_crop_flip(x, size, a.crop_padding, a.pad_mode, top, left, flip)
        else:
            boxes = resized_crop_boxes(n, x.shape[-2], x.shape[-1], a.crop_scale, a.crop_ratio, generator)
            # roi_align samples at pixel centres of the box (aligned=True) and averages
            # ceil(box / size) points per output pixel, which antialiases downscaling
            rois = torch.cat([torch.arange(n, dtype=boxes.dtype)[:, None], boxes], 1).to(x.device)
            x = roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            x = torch.where(flip.to(x.device).view(n, 1, 1, 1), x.flip(3), x)
        if any(a.jitter):
            x = jitter(x, a.jitter, generator)
        if a.cutout:
            cy = torch.randint(0, size, (n,), generator=generator)
            cx = torch.randint(0, size, (n,), generator=generator)
            x = cutout(x, a.cutout, self.fill, cy, cx)
        return x.contiguous()  # the gathers leave channels-last strides; the model gets the usual layout


class Cutout:
    """The per-image transform form of :func:`cutout` (uint8 (C, H, W)), for the decode-on-the-fly path."""

    def __init__(self, side: int, mean):
        self.side = side
        self.fill = torch.tensor([round(255 * m) for m in mean], dtype=torch.uint8)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        cy, cx = torch.randint(0, h, (1,)), torch.randint(0, w, (1,))
        return cutout(image[None], self.side, self.fill, cy, cx)[0]
