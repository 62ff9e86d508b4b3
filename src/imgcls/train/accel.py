"""Speed options of the epoch loop: memory format, ``torch.compile`` and the EMA of the weights.

Each is resolved once per run from the config (``--channels-last``, ``--compile``, ``--ema``) and
handed to :func:`.loop.train_one_epoch`; nothing here changes what a step computes, only how
fast it runs (the EMA adds a second set of weights that validation and saving read).
"""

from __future__ import annotations

import logging

import torch
from timm.utils import ModelEmaV3
from torch import nn

log = logging.getLogger("imgcls")

# --channels-last auto on a CPU, by model family: where training steps were measured faster
# with it (docs/decisions.md); families not listed keep the default layout there.
CPU_CHANNELS_LAST = {"cnn": True, "resnet": True}
# on GPUs channels-last is what cuDNN's tensor-core convolutions want
GPU_CHANNELS_LAST = True


def training_layout(setting: str, device: torch.device, family: str) -> torch.memory_format:
    """The layout of the training model and its input batches for ``--channels-last SETTING``."""
    on = {"on": True, "off": False}.get(setting)
    if on is None:  # auto
        on = GPU_CHANNELS_LAST if device.type == "cuda" else CPU_CHANNELS_LAST.get(family, False)
    return torch.channels_last if on else torch.contiguous_format


def training_model(model: nn.Module, compile: bool) -> nn.Module:
    """The module the training steps call: ``model`` itself, or compiled (sharing its parameters,
    so the optimizer, the EMA and the checkpoints keep working on ``model``)."""
    if not compile:
        return model
    log.info("torch.compile: the first steps compile the model")
    return torch.compile(model)


class WeightEma:
    """An exponential moving average of a model's weights and BatchNorm statistics (timm's
    ``ModelEmaV3``), updated after each optimizer step.  Its decay warms up over the first steps
    (``1 - (1 + step) ** -0.75``, capped at ``decay``), so a short run's average is not stuck near
    the random initialization."""

    def __init__(self, model: nn.Module, decay: float):
        self.source = model
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=0.75)
        self.steps = 0

    @property
    def model(self) -> nn.Module:
        """The averaged copy of the model (same class), in eval mode."""
        return self.ema.module

    def update(self) -> None:
        self.steps += 1
        self.ema.update(self.source, step=self.steps)

    def state_dict(self) -> dict:
        return {"state": self.ema.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.ema.module.load_state_dict(state["state"])
        self.steps = int(state["steps"])


def make_ema(model: nn.Module, decay: float | None) -> WeightEma | None:
    return None if decay is None else WeightEma(model, decay)
