"""Test-time augmentation: an engine that scores each batch on several views and averages their logits.

``TTA`` maps a name to the views of a batch and their weights.
The wrapper is an engine like any other (uint8 NCHW batch -> logits), so it works the same over
ONNX Runtime and torch, and ``stream_logits``, metrics and reports do not know it is there.
Logits are averaged, as the fast CIFAR-10 recipes do; for a softmax this is the normalized
geometric mean of the views' probabilities.  NumPy only.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import UserError


def _same(batch: np.ndarray) -> np.ndarray:
    return batch


def _hflip(batch: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(batch[..., ::-1])  # NCHW: mirror the width axis


def _shift(dy: int, dx: int) -> Callable[[np.ndarray], np.ndarray]:
    """The batch moved by (dy, dx) pixels, the border filled by reflection (airbench94's translated views)."""
    def view(batch: np.ndarray) -> np.ndarray:
        h, w = batch.shape[-2:]
        padded = np.pad(batch, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
        return np.ascontiguousarray(padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w])
    return view


def _flipped(view: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda batch: _hflip(view(batch))


# name -> (view, weight) pairs, each view a function of the (N, 3, S, S) batch; weights sum to 1.
# flip-shift is airbench94's level 2: half on the image and its mirror, half on both moved one pixel
# up-left and down-right
TTA: dict[str, tuple[tuple[Callable[[np.ndarray], np.ndarray], float], ...]] = {
    "none": ((_same, 1.0),),
    "flip": ((_same, 0.5), (_hflip, 0.5)),
    "flip-shift": ((_same, 0.25), (_hflip, 0.25),
                   (_shift(-1, -1), 0.125), (_flipped(_shift(-1, -1)), 0.125),
                   (_shift(1, 1), 0.125), (_flipped(_shift(1, 1)), 0.125)),
}


class TTAEngine:
    """``engine`` scored on a batch and on each view of it; the mean of the logits."""

    def __init__(self, engine, name: str):
        self.engine = engine
        self.name = name
        self.views = TTA[name]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.asarray(batch)
        total = sum(weight * np.asarray(self.engine(view(x)), dtype=np.float64) for view, weight in self.views)
        return total.astype(np.float32)

    def __repr__(self) -> str:
        return f"TTAEngine({self.engine!r}, {self.name})"


def with_tta(engine, name: str):
    """``engine`` itself for ``none``, else wrapped in :class:`TTAEngine`."""
    if name not in TTA:
        raise UserError(f"unknown --tta {name!r}; use one of {', '.join(TTA)}")
    return engine if name == "none" else TTAEngine(engine, name)
