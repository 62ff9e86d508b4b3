"""The features strategy's head for every task (:mod:`imgcls.tasks`), from the one softmax solver.

A softmax over two logits ``(w0 f + b0, w1 f + b1)`` is a sigmoid of their
difference ``(w1 - w0) f + (b1 - b0)``, so a binary logistic regression is
the two-class head of :func:`.head.fit_head` folded into one row, with the
same source-head prior, penalty path and cross-validation.  ``binary-sigmoid``
is one such row; ``multilabel`` is one per label (one-vs-rest: label ``j``
present or not), each with its own cross-validated penalty and, under
balanced class weights, its own balance of present and absent.
``multioutput`` is one softmax head per output column, each fitted on the
images that have a value in that column, stacked into one Linear (the
heads' logits side by side).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.records import heads_of
from .head import HeadFit, class_weights, fit_head


def _as_sigmoid_row(fit: HeadFit) -> tuple[torch.Tensor, torch.Tensor]:
    return (fit.weight[1] - fit.weight[0])[None], (fit.bias[1] - fit.bias[0])[None]


def _binary(feats, y, prior, seed, mode, progress, standardize, cv_mode="none", labels=None) -> HeadFit:
    y = np.asarray(y, dtype=np.int64)
    fit = fit_head(feats, y, 2, prior, seed, weight=class_weights(y, 2, mode), progress=progress,
                   standardize=standardize, cv_weight=class_weights(y, 2, cv_mode))
    fit.weight, fit.bias = _as_sigmoid_row(fit)
    return fit


def _multiclass(feats, y, k, prior, seed, mode, progress, standardize, cv_mode="none", labels=None) -> HeadFit:
    return fit_head(feats, y, k, prior, seed, weight=class_weights(y, k, mode), progress=progress,
                    standardize=standardize, cv_weight=class_weights(y, k, cv_mode))


def _one_vs_rest(feats, y, k, prior, seed, mode, progress, standardize, cv_mode="none", labels=None) -> HeadFit:
    y = np.asarray(y).reshape(len(y), k)
    fits = [_binary(feats, y[:, j], prior, seed, mode, progress, standardize, cv_mode) for j in range(k)]
    alphas = [f.alpha for f in fits if f.alpha is not None]
    return HeadFit(torch.cat([f.weight for f in fits]), torch.cat([f.bias for f in fits]),
                   lam=float(np.median([f.lam for f in fits])), alpha=float(np.mean(alphas)) if alphas else None,
                   folds=min(f.folds for f in fits),
                   cv=[{"label": j, **row} for j, f in enumerate(fits) for row in f.cv],
                   prior_offered=prior is not None)


def _stack(fits: list[HeadFit], cv: list[dict]) -> HeadFit:
    alphas = [f.alpha for f in fits if f.alpha is not None]
    return HeadFit(torch.cat([f.weight for f in fits]), torch.cat([f.bias for f in fits]),
                   lam=float(np.median([f.lam for f in fits])), alpha=float(np.mean(alphas)) if alphas else None,
                   folds=min(f.folds for f in fits), cv=cv, prior_offered=any(f.prior_offered for f in fits))


def _per_output(feats, y, k, prior, seed, mode, progress, standardize, cv_mode="none", labels=None) -> HeadFit:
    """One softmax head per output column on the images with a value there (``y``: (n, heads), -1 empty)."""
    y = np.asarray(y, dtype=np.int64).reshape(len(y), -1)
    fits, cv = [], []
    for h, (name, names, _) in enumerate(heads_of(labels)):
        present = y[:, h] >= 0
        fit = _multiclass(feats[present], y[present, h], len(names), prior, seed, mode, progress, standardize,
                          cv_mode)
        fits.append(fit)
        cv += [{"output": name, **row} for row in fit.cv]
    return _stack(fits, cv)


HEADS = {
    "multiclass": _multiclass,
    "binary-sigmoid": lambda feats, y, k, *rest, **kw: _binary(feats, y, *rest),
    "multilabel": _one_vs_rest,
    "multioutput": _per_output,
}


def fit_task_head(task: str, feats: np.ndarray, y: np.ndarray, k: int, prior=None, seed: int = 0,
                  mode: str = "none", progress: bool = False, standardize: bool = False,
                  cv_mode: str = "none", labels: list[str] | None = None) -> HeadFit:
    """The head of ``task`` on ``feats`` (n, views, D): ``(outputs, D)`` weights.  ``y``: class indices
    (n,), for multilabel the 0/1 matrix (n, k), for multioutput the class per head (n, heads; -1 empty,
    ``labels`` the flat labels).  ``mode``: the class weights of the fit, ``cv_mode`` those of the
    cross-validated loss that picks the penalty (none | balanced; train.balance)."""
    return HEADS[task](feats, y, k, prior, seed, mode, progress, standardize, cv_mode, labels=labels)
