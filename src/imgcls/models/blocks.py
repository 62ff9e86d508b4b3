"""Building blocks shared by the architectures: normalization layers by name,
the generic BatchNorm swap, and squeeze-and-excitation.

Normalization kinds (``--norm``), each made by :func:`make_norm` for ``C``
channels:

``batch``
    ``BatchNorm2d(C)``: statistics over (N, H, W) per channel.
``group``
    ``GroupNorm(G, C)`` with ``G`` the largest divisor of ``C`` that is at most
    32 (Wu & He's G=32 where the channel count allows it; 64 channels give 32
    groups of 2, 6 channels give 6 groups of 1).
``layer``
    ``GroupNorm(1, C)``: the usual "layer norm" for conv nets, statistics over
    (C, H, W) of each sample, with a per-channel affine.  Note this is *not*
    ConvNeXt's ``LayerNorm2d``, which normalizes over C alone at each pixel.
``instance``
    ``InstanceNorm2d(C, affine=True)``: statistics over (H, W) per sample and
    channel (needs more than one pixel per channel while training).

Squeeze-and-excitation (Hu et al., 2018) comes from torchvision
(:class:`torchvision.ops.SqueezeExcitation`: global average pool, FC to
``C // r``, ReLU, FC back to ``C``, sigmoid, channel-wise scale; its FCs are
1x1 convolutions on the pooled 1x1 map, which is the same thing as Linear
layers); :func:`squeeze_excite` only fixes the reduction ratio r = 16.
"""

from __future__ import annotations

from torch import nn
from torchvision.ops import SqueezeExcitation

NORM_KINDS: tuple[str, ...] = ("batch", "group", "layer", "instance")
SE_REDUCTION = 16
MAX_GROUPS = 32


def group_count(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """The largest divisor of ``channels`` that is at most ``max_groups``."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def make_norm(kind: str, channels: int) -> nn.Module:
    """A 2-d normalization layer of the given kind (see the module docstring)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"unknown norm kind {kind!r}; use one of {', '.join(NORM_KINDS)}")


def swap_norm(module: nn.Module, kind: str) -> nn.Module:
    """Replace every ``BatchNorm2d`` inside ``module`` by ``make_norm(kind, C)``.

    The replacement takes the same attribute name / Sequential index, so the
    state-dict keys of the surrounding layers do not move (the new layers have
    ``weight``/``bias`` like BatchNorm, but no running statistics).  New layers
    start at weight 1, bias 0, as BatchNorm does.  ``kind="batch"`` leaves the
    model as it is.  Works in place and returns ``module``.
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; use one of {', '.join(NORM_KINDS)}")
    if kind == "batch":
        return module
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, child_name, make_norm(kind, child.num_features))
    return module


def squeeze_excite(channels: int, reduction: int = SE_REDUCTION) -> SqueezeExcitation:
    """A squeeze-and-excitation block for ``channels`` channels (r = 16).

    ``y = x * sigmoid(W2 relu(W1 avgpool(x) + b1) + b2)`` with ``W1``:
    C -> max(1, C // r) and ``W2``: back to C.
    """
    return SqueezeExcitation(channels, max(1, channels // reduction))
