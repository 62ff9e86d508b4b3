"""Speed options of the epoch loop: memory format, ``torch.compile``, the EMA of the weights and lookahead.

Each is resolved once per run from the config (``--channels-last``, ``--compile``, ``--ema``,
``--lookahead``) and handed to :func:`.loop.train_one_epoch`.  The first two change only how fast
a step runs; the EMA adds a second set of weights that validation and saving read; lookahead
pulls the weights themselves towards a slow average of them.
"""

from __future__ import annotations

import logging

import torch
from timm.utils import ModelEmaV3
from torch import nn

log = logging.getLogger("imgcls")

# --channels-last auto on a CPU, by model family: where training steps were measured faster
# with it (docs/decisions.md); families not listed keep the default layout there.
CPU_CHANNELS_LAST = {"cnn": True, "resnet": True, "efficientnet": True}
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


class Lookahead:
    """airbench94's lookahead (Zhang et al. 2019, with an EMA as the slow weights): from ``START`` of the
    run's steps on, every ``EVERY`` steps the slow weights (and BatchNorm statistics) move towards the
    model's, ``slow <- decay * slow + (1 - decay) * fast``, and the model is set to them.  ``decay`` =
    ``BASE ** EVERY * (step / total) ** POWER`` grows from about 0 to 0.77: the model moves fast early and
    is averaged strongly at the end.  :meth:`end_epoch` sets the model to the slow weights, so every
    epoch is validated and saved on them."""

    START, EVERY, BASE, POWER = 0.3, 5, 0.95, 3.0

    def __init__(self, model: nn.Module, total_steps: int):
        self.source = model
        self.total = max(1, total_steps)
        self.steps = 0
        self.slow: dict[str, torch.Tensor] | None = None

    def update(self) -> None:
        """After each optimizer step."""
        self.steps += 1
        if self.steps < self.START * self.total or self.steps % self.EVERY:
            return
        if self.slow is None:
            self.slow = {k: v.detach().clone() for k, v in self.source.state_dict().items() if v.is_floating_point()}
            return
        self._pull(self.BASE ** self.EVERY * (self.steps / self.total) ** self.POWER)

    def end_epoch(self) -> None:
        if self.slow is not None:
            self._pull(1.0)

    @torch.no_grad()
    def _pull(self, decay: float) -> None:
        state = self.source.state_dict()  # tensors that share the parameters' storage
        for name, slow in self.slow.items():
            slow.lerp_(state[name], 1 - decay)
            state[name].copy_(slow)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "slow": self.slow}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.slow = state["slow"]


def make_lookahead(model: nn.Module, on: bool, total_steps: int) -> Lookahead | None:
    return Lookahead(model, total_steps) if on else None
