"""Recipes: named bundles of proven training settings, as data (``--recipe NAME``).

A recipe is a table row of :class:`~.config.TrainConfig` option values.  It
fills in the options the user did not give; every flag given on the command
line (or keyword given to :func:`imgcls.train`) wins over it.  The recipe's
name stays in ``config.yaml`` beside the values it resolved to.

``augment`` is merged rather than replaced: a recipe names only the
augmentation settings it changes, and an augmentation flag (``--no-flip``)
changes only its own setting.

Torch-free: the command line lists the recipes (``imgcls recipes``,
``imgcls train --recipe list``) without the training stack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..data.preprocess import Augment
from ..errors import UserError

log = logging.getLogger("imgcls")

LIST = "list"  # --recipe list: print the table instead of training


@dataclass(frozen=True)
class Recipe:
    description: str
    options: dict          # TrainConfig field -> value (augment: only the settings it changes)
    source: str = ""       # where the settings come from


# airbench94's training settings (the peak of its triangle at 23% of the steps: warmup_epochs = 0.23 x epochs).
# Its decoupled lr 11.5 and wd 0.0153 per 1024 images, for a mean (not summed) loss:
# lr = 11.5 / (1 + 1 / (1 - 0.85)), weight decay = 0.0153 / 11.5
_AIRBENCH = {"input_size": 32, "optimizer": "sgd", "lr": 1.5, "weight_decay": 1.33e-3, "momentum": 0.85,
             "norm_lr_mult": 64.0, "batch_size": 1024, "schedule": "airbench", "label_smoothing": 0.2,
             "lookahead": True, "channels_last": "on",
             "augment": {"crop_padding": 2, "pad_mode": "reflect", "color_jitter": 0.0, "alternate_flip": True}}

RECIPES = {
    "scratch-small": Recipe(
        "from scratch on small images (up to about 64 px): the compact airbench net with BatchNorm, SGD with"
        " Nesterov momentum, a linear warm-up and cosine decay, label smoothing, random crops of the image"
        " padded by 4 px and flips, and an EMA of the weights",
        {"model": "airbench", "optimizer": "sgd", "lr": 0.2, "weight_decay": 5e-4, "momentum": 0.9,
         "norm_weight_decay": False, "batch_size": 128, "epochs": 30, "schedule": "cosine", "warmup_epochs": 2.0,
         "label_smoothing": 0.1, "ema": 0.999,
         "augment": {"crop_padding": 4, "pad_mode": "reflect", "color_jitter": 0.0}},
        "the common CIFAR-from-scratch settings (He et al. 2016; timm's train.py) on a small net"),
    "cifar10-speed": Recipe(
        "CIFAR-10 in few FLOPs: airbench94 as published. The airbench94 net (a whitening stem set from the"
        " training images, shift-only BatchNorm), batch 1024, SGD Nesterov (momentum 0.85), BatchNorm shifts"
        " at 64x the learning rate, label smoothing 0.2, airbench's triangular LR (peak at 23% of the steps),"
        " lookahead, alternating flips and random crops of the image padded by 2 px; 10 epochs at 32 px;"
        " score it with `imgcls eval --tta flip-shift`",
        {**_AIRBENCH, "model": "airbench94", "epochs": 10, "warmup_epochs": 2.3},
        "Jordan, 94% on CIFAR-10 in 3.29 seconds on a single GPU (airbench94, 2024); Page, How to train your"
        " ResNet (2018)"),
    "cifar10-quick": Recipe(
        "CIFAR-10 in 0.15 PFLOP: airbench94_muon's training on the narrower airbench93 net (groups of"
        " 64/128/128, under half the FLOPs per image) for 13 epochs, the first ones on smaller images"
        " (progressive resizing from 24 px, 32 px from epoch 10). Muon for the 3x3 filters (lr 0.24,"
        " momentum 0.6), SGD Nesterov (momentum 0.85) for the head and the shifts, batch 2000, a linear"
        " decay to 0 without warm-up or lookahead, label smoothing 0.2, alternating flips and crops of the"
        " image padded by 2 px; score it with `imgcls eval --tta flip-shift`",
        # airbench94_muon's head lr 0.67 and bias lr 0.053 (summed loss, logits / width, head weights of std 1),
        # weight decay 2e-6 x batch / lr, for imgcls's mean loss and airbench's 1/9 feature scale:
        # lr = 0.67 x 2000 x (9 / 128)^2, weight decay = 0.004 / lr, norm lr = 0.053 x 2000
        {**_AIRBENCH, "model": "airbench93", "epochs": 13, "batch_size": 2000, "lr": 6.62, "weight_decay": 6.04e-4,
         "norm_lr_mult": 16.0, "schedule": "triangle", "warmup_epochs": 0.0, "lookahead": False,
         "muon": [0.24, 0.6], "progressive": [24, 0.7]},
        "Jordan, airbench94_muon (cifar10-airbench, 2024); Jordan et al., Muon (2024)"),
}


def recipe(name: str) -> Recipe:
    if name == LIST:
        raise UserError("--recipe list prints the recipes (imgcls recipes); give a recipe's name to train with it")
    try:
        return RECIPES[name]
    except KeyError:
        raise UserError(f"unknown --recipe {name!r}; use one of {', '.join(RECIPES)} (imgcls recipes)") from None


def with_recipe(options: dict) -> dict:
    """``options`` + the values of ``options["recipe"]`` for the options not given there.

    Without a recipe: unchanged."""
    name = options.get("recipe")
    if name is None:
        return dict(options)
    chosen = recipe(name)
    merged = {**chosen.options, **options}
    if "augment" in chosen.options:
        merged["augment"] = Augment.merged(chosen.options["augment"], options.get("augment"))
    overridden = sorted(k for k in chosen.options if k in options and k != "augment")
    log.info("recipe %s%s", name, f" (given flags override: {', '.join(overridden)})" if overridden else "")
    return merged


def format_recipes() -> str:
    """The recipe table for ``imgcls recipes``: name, what it is for, and its settings as flags."""
    lines = []
    for name, entry in RECIPES.items():
        lines.append(f"{name}\n  {entry.description}")
        flags = []
        for key, value in entry.options.items():
            if key == "augment":
                flags += [f"augment.{k}={_text(v)}" for k, v in value.items()]
            elif value is True:
                flags.append(f"--{key.replace('_', '-')}")
            elif value is False:
                flags.append(f"--no-{key.replace('_', '-')}")
            else:
                flags.append(f"--{key.replace('_', '-')} {_text(value)}")
        lines.append("  " + " ".join(flags))
        if entry.source:
            lines.append(f"  after: {entry.source}")
    lines.append("\nimgcls train DATA --out RUN --recipe NAME [flags that override the recipe]")
    return "\n".join(lines)


def _text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
