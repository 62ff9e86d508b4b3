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


# airbench94_muon's training (Jordan, cifar10-airbench): Muon on the 3x3 filters, SGD Nesterov 0.85 on the head
# and the shifts, batch 2000, a linear decay to 0 without warm-up or lookahead, label smoothing 0.2. Its head lr 0.67
# and bias lr 0.053 are for a summed loss, logits / width and head weights of std 1; for imgcls's mean loss and
# airbench's 1/9 feature scale (torch's default init): lr = 0.67 x 2000 x (9 / width)^2, weight decay = 0.004 / lr,
# norm lr = 0.053 x 2000 (the recipes' lr, weight_decay and norm_lr_mult)
_AIRBENCH_MUON = {"input_size": 32, "optimizer": "sgd", "momentum": 0.85, "muon": [0.24, 0.6], "batch_size": 2000,
                  "schedule": "triangle", "warmup_epochs": 0.0, "lookahead": False, "label_smoothing": 0.2,
                  "channels_last": "on",
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
        "CIFAR-10 in few FLOPs: airbench94_muon's training. The airbench94 net (a whitening stem set from"
        " the training images, shift-only BatchNorm), Muon for the 3x3 filters (lr 0.24, momentum 0.6), SGD"
        " Nesterov (momentum 0.85) for the head and the shifts, batch 2000, a linear decay to 0 without"
        " warm-up, label smoothing 0.2, alternating flips and random crops of the image padded by 2 px;"
        " 8 epochs at 32 px; score it with `imgcls eval --tta flip-shift`",
        {**_AIRBENCH_MUON, "model": "airbench94", "epochs": 8, "lr": 1.656, "weight_decay": 2.415e-3,
         "norm_lr_mult": 64.0},
        "Jordan, airbench94_muon (cifar10-airbench, 2024): 94.01% in 2.59 s on an A100; airbench94 (3.29 s);"
        " Page, How to train your ResNet (2018)"),
    "cifar10-quick": Recipe(
        "CIFAR-10 in 0.15 PFLOP: airbench94_muon's training on the narrower airbench93 net (groups of"
        " 64/128/128, under half the FLOPs per image) for 13 epochs, the first ones on smaller images"
        " (progressive resizing from 24 px, 32 px from epoch 10). Muon for the 3x3 filters (lr 0.24,"
        " momentum 0.6), SGD Nesterov (momentum 0.85) for the head and the shifts, batch 2000, a linear"
        " decay to 0 without warm-up or lookahead, label smoothing 0.2, alternating flips and crops of the"
        " image padded by 2 px; score it with `imgcls eval --tta flip-shift`",
        {**_AIRBENCH_MUON, "model": "airbench93", "epochs": 13, "lr": 6.62, "weight_decay": 6.04e-4,
         "norm_lr_mult": 16.0, "progressive": [24, 0.7]},
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
