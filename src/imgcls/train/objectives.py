"""The torch half of the task table (:mod:`imgcls.tasks`): each task's training loss and how a
training batch counts its hits (``train_accuracy`` in metrics.csv).

``multiclass`` keeps the cross-entropy with class weights and label smoothing.
``binary-sigmoid`` and ``multilabel`` use ``BCEWithLogitsLoss``, the negative
log of the Bernoulli likelihood of :mod:`imgcls.softmax`; with balanced class
weights each label's positives are weighted by ``negatives / positives``
(``pos_weight``), so a rare label counts as much as its absence.  Label
smoothing moves the 0/1 targets to ``eps/2`` and ``1 - eps/2``.
``multioutput`` is one cross-entropy per head (with its own class weights)
on the images whose column has a value, times the head's weight, summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..data.records import heads_of
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


def _cross_entropy(targets, n_classes: int, mode: str, smoothing: float, meta=None) -> nn.Module:
    weight = class_weights(targets, n_classes, mode)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)


class PerOutputLoss(nn.Module):
    """The multi-output loss: ``sum_h weight_h * CE_h`` with ``CE_h`` the mean cross-entropy of head ``h``'s
    logits over the batch's images that have a class for it (target >= 0); a head no image of the batch has
    adds nothing.  ``heads``: ``(first logit, classes)`` per head; ``losses``: one CrossEntropyLoss each."""

    def __init__(self, heads: list[tuple[int, int]], weights: list[float], losses: list[nn.Module]):
        super().__init__()
        self.heads, self.weights = heads, [float(w) for w in weights]
        self.losses = nn.ModuleList(losses)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        for h, ((start, k), loss) in enumerate(zip(self.heads, self.losses)):
            present = targets[:, h] >= 0
            if self.weights[h] and bool(present.any()):
                total = total + self.weights[h] * loss(logits[present, start:start + k], targets[present, h])
        return total

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Images whose every labelled head is right."""
        right = torch.ones(len(targets), dtype=torch.bool, device=logits.device)
        for h, (start, k) in enumerate(self.heads):
            present = targets[:, h] >= 0
            right &= ~present | (logits[:, start:start + k].argmax(1) == targets[:, h])
        return right.sum()


def _per_output(targets, n_classes: int, mode: str, smoothing: float, meta=None) -> PerOutputLoss:
    """``meta``: the model metadata, whose ``labels`` and ``outputs`` (weights) give the heads."""
    y = np.asarray(targets, dtype=np.int64).reshape(len(targets), -1)
    heads = heads_of(meta["labels"])
    losses = []
    for h, (_, names, _) in enumerate(heads):
        present = y[:, h][y[:, h] >= 0]
        losses.append(nn.CrossEntropyLoss(weight=class_weights(list(present), len(names), mode),
                                          label_smoothing=smoothing))
    weights = [float(o.get("weight", 1.0)) for o in meta["outputs"]]
    return PerOutputLoss([(start, len(names)) for _, names, start in heads], weights, losses)


@dataclass(frozen=True)
class Objective:
    # (train targets, K, class-weight mode, smoothing, model metadata) -> the loss
    criterion: Callable[..., nn.Module]
    # (logits, targets) -> right answers in the batch; None: the criterion's own ``hits``
    hits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


OBJECTIVES = {
    "multiclass": Objective(_cross_entropy, lambda z, y: (z.argmax(1) == y).sum()),
    "binary-sigmoid": Objective(lambda y, k, mode, eps, meta=None: _Bce(_pos_weight(y, mode), eps),
                                lambda z, y: ((z[:, 0] > 0).long() == y).sum()),
    "multilabel": Objective(lambda y, k, mode, eps, meta=None: _Bce(_pos_weight(y, mode), eps),
                            lambda z, y: ((z > 0) == (y > 0.5)).all(1).sum()),
    "multioutput": Objective(_per_output, None),
}
assert set(OBJECTIVES) == set(TASKS)


def objective(task_name: str) -> Objective:
    return OBJECTIVES[task_name]
