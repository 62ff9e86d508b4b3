"""The features strategy's head for every task (:mod:`imgcls.tasks`), from the one softmax solver.

A softmax over two logits ``(w0 f + b0, w1 f + b1)`` is a sigmoid of their
difference ``(w1 - w0) f + (b1 - b0)``, so a binary logistic regression is
the two-class head of :func:`.head.fit_head` folded into one row, with the
same source-head prior, penalty path and cross-validation.  ``binary-sigmoid``
is one such row; ``multilabel`` is one per label (one-vs-rest: label ``j``
present or not), each with its own cross-validated penalty and, under
balanced class weights, its own balance of present and absent.
"""

from __future__ import annotations

import numpy as np
import torch

from .head import HeadFit, class_weights, fit_head


def _as_sigmoid_row(fit: HeadFit) -> tuple[torch.Tensor, torch.Tensor]:
    return (fit.weight[1] - fit.weight[0])[None], (fit.bias[1] - fit.bias[0])[None]


def _binary(feats, y, prior, seed, mode, progress, standardize, cv_mode="none") -> HeadFit:
    y = np.asarray(y, dtype=np.int64)
    fit = fit_head(feats, y, 2, prior, seed, weight=class_weights(y, 2, mode), progress=progress,
                   standardize=standardize, cv_weight=class_weights(y, 2, cv_mode))
    fit.weight, fit.bias = _as_sigmoid_row(fit)
    return fit


def _multiclass(feats, y, k, prior, seed, mode, progress, standardize, cv_mode="none") -> HeadFit:
    return fit_head(feats, y, k, prior, seed, weight=class_weights(y, k, mode), progress=progress,
                    standardize=standardize, cv_weight=class_weights(y, k, cv_mode))


def _one_vs_rest(feats, y, k, prior, seed, mode, progress, standardize, cv_mode="none") -> HeadFit:
    y = np.asarray(y).reshape(len(y), k)
    fits = [_binary(feats, y[:, j], prior, seed, mode, progress, standardize, cv_mode) for j in range(k)]
    alphas = [f.alpha for f in fits if f.alpha is not None]
    return HeadFit(torch.cat([f.weight for f in fits]), torch.cat([f.bias for f in fits]),
                   lam=float(np.median([f.lam for f in fits])), alpha=float(np.mean(alphas)) if alphas else None,
                   folds=min(f.folds for f in fits),
                   cv=[{"label": j, **row} for j, f in enumerate(fits) for row in f.cv],
                   prior_offered=prior is not None)


HEADS = {
    "multiclass": _multiclass,
    "binary-sigmoid": lambda feats, y, k, *rest: _binary(feats, y, *rest),
    "multilabel": _one_vs_rest,
}


def fit_task_head(task: str, feats: np.ndarray, y: np.ndarray, k: int, prior=None, seed: int = 0,
                  mode: str = "none", progress: bool = False, standardize: bool = False,
                  cv_mode: str = "none") -> HeadFit:
    """The head of ``task`` on ``feats`` (n, views, D): ``(outputs, D)`` weights.  ``y``: class indices
    (n,), or for multilabel the 0/1 matrix (n, k).  ``mode``: the class weights of the fit, ``cv_mode``
    those of the cross-validated loss that picks the penalty (none | balanced; train.balance)."""
    return HEADS[task](feats, y, k, prior, seed, mode, progress, standardize, cv_mode)
