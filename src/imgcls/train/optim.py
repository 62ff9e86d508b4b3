"""Optimizers and learning-rate schedules, as tables keyed by name.

Torch-free: the option declarations take their choices from here; the epoch
loop builds the torch optimizer from an entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerSpec:
    """A torch.optim class by name, with the learning rate and weight decay it trains well with."""

    torch_class: str
    lr: float
    weight_decay: float
    momentum: bool = False  # takes cfg.momentum (and Nesterov when it is > 0)


OPTIMIZERS = {
    "sgd": OptimizerSpec("SGD", lr=0.05, weight_decay=5e-4, momentum=True),
    "adamw": OptimizerSpec("AdamW", lr=1e-3, weight_decay=0.05),
}


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def _cosine(s, total, warm, per_epoch, cfg):
    if s < warm:
        return _warmup(s, warm)
    return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))


def _step(s, total, warm, per_epoch, cfg):
    return _warmup(s, warm) * cfg.gamma ** (s // (cfg.step_size * per_epoch))


def _constant(s, total, warm, per_epoch, cfg):
    return _warmup(s, warm)


def _triangle(s, total, warm, per_epoch, cfg):
    # the one-cycle of fast CIFAR recipes: linear up over the warm-up, then linear down to 0 at the last step
    if s < warm:
        return _warmup(s, warm)
    return max(0.0, (total - s) / max(1, total - warm))


def _airbench(s, total, warm, per_epoch, cfg, start=0.2, end=0.07):
    # airbench94's triangle: from 0.2 of the peak at step 0, up to it at the warm-up's end, down to 0.07
    if s < warm:
        return start + (1 - start) * s / warm
    return end + (1 - end) * max(0.0, (total - s) / max(1, total - warm))


# name -> learning-rate multiplier(step, total steps, warmup steps, steps per epoch, cfg)
SCHEDULES = {"cosine": _cosine, "step": _step, "constant": _constant, "triangle": _triangle, "airbench": _airbench}
