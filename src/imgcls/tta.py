"""Test-time augmentation: an engine that scores each batch on several views and averages their logits.

``TTA`` maps a name to the extra views of a batch (the images themselves are always scored).
The wrapper is an engine like any other (uint8 NCHW batch -> logits), so it works the same over
ONNX Runtime and torch, and ``stream_logits``, metrics and reports do not know it is there.
Logits are averaged, as the fast CIFAR-10 recipes do; for a softmax this is the normalized
geometric mean of the views' probabilities.  NumPy only.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import UserError


def _hflip(batch: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(batch[..., ::-1])  # NCHW: mirror the width axis


# name -> the extra views of a batch, each a function of the (N, 3, S, S) batch
TTA: dict[str, tuple[Callable[[np.ndarray], np.ndarray], ...]] = {
    "none": (),
    "flip": (_hflip,),
}


class TTAEngine:
    """``engine`` scored on a batch and on each view of it; the mean of the logits."""

    def __init__(self, engine, name: str):
        self.engine = engine
        self.name = name
        self.views = TTA[name]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.asarray(batch)
        total = np.asarray(self.engine(x), dtype=np.float64)
        for view in self.views:
            total = total + np.asarray(self.engine(view(x)), dtype=np.float64)
        return (total / (1 + len(self.views))).astype(np.float32)

    def __repr__(self) -> str:
        return f"TTAEngine({self.engine!r}, {self.name})"


def with_tta(engine, name: str):
    """``engine`` itself for ``none``, else wrapped in :class:`TTAEngine`."""
    if name not in TTA:
        raise UserError(f"unknown --tta {name!r}; use one of {', '.join(TTA)}")
    return engine if not TTA[name] else TTAEngine(engine, name)
