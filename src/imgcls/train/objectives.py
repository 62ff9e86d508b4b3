"""The torch half of the task table (:mod:`imgcls.tasks`): each task's training loss and how a
training batch counts its hits (``train_accuracy`` in metrics.csv).

``multiclass`` keeps the cross-entropy with class weights and label smoothing.
``binary-sigmoid`` and ``multilabel`` use ``BCEWithLogitsLoss``, the negative
log of the Bernoulli likelihood of :mod:`imgcls.softmax`; with balanced class
weights each label's positives are weighted by ``negatives / positives``
(``pos_weight``), so a rare label counts as much as its absence.  Label
smoothing moves the 0/1 targets to ``eps/2`` and ``1 - eps/2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..tasks import TASKS
from .head import class_weights


class _Bce(nn.Module):
    """Binary cross-entropy on logits for (N,) 0/1 targets (one logit) or (N, K) indicator targets."""

    def __init__(self, pos_weight: torch.Tensor | None, smoothing: float):
        super().__init__()
        self.loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype).reshape(logits.shape)
        if self.smoothing:
            targets = targets * (1 - self.smoothing) + self.smoothing / 2
        return self.loss(logits, targets)


def _indicator(targets) -> np.ndarray:
    """(N, K) 0/1 matrix of a label-set dataset's targets, or (N, 1) of a binary one's class indices."""
    array = np.asarray(targets, dtype=np.float64)
    return array.reshape(len(array), -1)


def _pos_weight(targets, mode: str) -> torch.Tensor | None:
    if mode == "none":
        return None
    y = _indicator(targets)
    positives = y.sum(0)
    return torch.tensor((len(y) - positives) / np.maximum(positives, 1), dtype=torch.float32)


def _cross_entropy(targets, n_classes: int, mode: str, smoothing: float) -> nn.Module:
    weight = class_weights(targets, n_classes, mode)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)


@dataclass(frozen=True)
class Objective:
    criterion: Callable[[list, int, str, float], nn.Module]   # (train targets, K, class-weight mode, smoothing)
    hits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> right answers in the batch


OBJECTIVES = {
    "multiclass": Objective(_cross_entropy, lambda z, y: (z.argmax(1) == y).sum()),
    "binary-sigmoid": Objective(lambda y, k, mode, eps: _Bce(_pos_weight(y, mode), eps),
                                lambda z, y: ((z[:, 0] > 0).long() == y).sum()),
    "multilabel": Objective(lambda y, k, mode, eps: _Bce(_pos_weight(y, mode), eps),
                            lambda z, y: ((z > 0) == (y > 0.5)).all(1).sum()),
}
assert set(OBJECTIVES) == set(TASKS)


def objective(task_name: str) -> Objective:
    return OBJECTIVES[task_name]
