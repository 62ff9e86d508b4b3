"""The head solver: a linear classifier on frozen features, with the source classifier as a prior.

A pure function of arrays (:func:`fit_head`); the features strategy
(:mod:`.features`) calls it.  The model it fits, for features ``f``:

* ``z = W_src f + b_src`` are the source weights' own logits (ImageNet: 1000);
* ``A[c] = mean softmax(z)`` over the center crops of class ``c``'s training
  images: which source classes class ``c`` looks like;
* ``logits = a * (A z) + V f + c`` with the residual ``V`` L2-penalized
  (``lam * E|f|^2 * |V|^2``, invariant to the feature scale); ``a`` and the
  bias are free.  All of it is linear in ``f``, so it folds into one
  ``nn.Linear`` (weight ``a A W_src + V``, bias ``a A b_src + c``) and the
  saved model is the ordinary network.

Features of several layers are standardized first (``standardize``), and the
scaling is folded back into the returned head.

Whether to use the prior at all, and ``lam``, are chosen by stratified
K-fold cross-validation on the training images (all views of an image in the
same fold, held-out loss on center views, with every class weighing alike when
the run selects by balanced accuracy), never on val: the family (with or without the
prior) with the lower best held-out loss, then within it the one-standard-error
rule (the strongest penalty whose loss is within one standard error of the
best).  When that loss is class-weighted (imbalanced classes), the family with
the higher best held-out accuracy comes first, the loss breaking ties: a class of
2 images weighs up to a hundred times a large class's images there, which makes
the weighted loss too noisy to choose between the families by.  Without a prior
this is an L2 logistic regression.  Why the prior, and what was measured with and
without it: docs/decisions.md.

The penalty grid is per image (``lam = p / n``), each family's path stops once
the held-out loss rises, and the cross-validation fits use the first
``CV_VIEWS`` views (3 folds past ``LARGE`` images): the choice costs a fraction
of the final fit on every view (figures: docs/decisions.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..progress import bar as progress_bar

# L2 strengths of the residual head weights times the number of training images, strongest first: the
# best penalty falls as images are added (like 1/C in scikit-learn), so the grid moves with them
PENALTIES = (10.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4)
FALLBACK_PENALTY = 1e-1     # when a class has too few images for cross-validation
CV_FOLDS = 5
CV_FOLDS_LARGE = 3          # past LARGE images: the held-out loss is precise enough with fewer folds
LARGE = 500
CV_VIEWS = 2                # views per training image in the cross-validation fits (every view in the final fit)
LBFGS_ITERATIONS = 150


def class_weights(targets, num_classes: int, mode: str) -> torch.Tensor | None:
    """Loss weights per class: None for ``none``; ``n / (K n_c)`` for ``balanced``.

    Balanced weights make every class weigh as much in the loss as if the
    classes were equally frequent (scikit-learn's ``class_weight="balanced"``),
    so a rare class is not traded away for a common one.  With every class
    present (training requires it) they average 1 over the training images,
    so the loss keeps its scale.
    """
    if mode == "none":
        return None
    if mode != "balanced":  # "auto" is resolved from the counts first (train.balance)
        raise ValueError(f"class weights must be 'none' or 'balanced', not {mode!r}")
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return torch.tensor(counts.sum() / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


@dataclass
class HeadFit:
    """A fitted linear head and how it was chosen."""

    weight: torch.Tensor          # (K, D)
    bias: torch.Tensor            # (K,)
    lam: float
    alpha: float | None           # weight of the source-head prior (None: no prior)
    folds: int
    cv: list[dict] = field(default_factory=list)  # per (prior, lambda): held-out loss, standard error, accuracy
    prior_offered: bool = False   # a prior was given (cross-validation may still have chosen none)


def _prior_map(X: torch.Tensor, Y: torch.Tensor, K: int, Wp: torch.Tensor, bp: torch.Tensor):
    """``A Wp, A bp`` with ``A[c]`` = mean source-class probabilities of class ``c``'s rows."""
    probs = torch.cat([torch.softmax(X[i:i + 4096] @ Wp.T + bp, 1) for i in range(0, len(X), 4096)])
    overall = probs.mean(0)
    A = torch.stack([probs[Y == c].mean(0) if bool((Y == c).any()) else overall for c in range(K)])
    return A @ Wp, A @ bp


class _Solver:
    """L-BFGS on ``CE(a P + X V^T + c) + lam E|x|^2 |V|^2``, warm-started across calls."""

    def __init__(self, X, Y, K, prior_map, weight=None):
        self.X, self.Y, self.weight = X, Y, weight
        self.scale = float((X * X).sum(1).mean()) or 1.0
        D = X.shape[1]
        self.V = torch.zeros(K, D, requires_grad=True)
        self.c = torch.zeros(K, requires_grad=True)
        # one prior weight for all classes: per-class weights cross-validated worse (docs/decisions.md)
        self.a = torch.ones(1, requires_grad=True)
        if prior_map is not None:
            self.Wa, self.ba = Wa, ba = prior_map
            with torch.no_grad():
                self.P = X @ Wa.T + ba
        else:
            self.Wa = self.ba = self.P = None

    def params(self):
        return [self.V, self.c] + ([self.a] if self.P is not None else [])

    def logits(self, X, P=None):
        out = X @ self.V.T + self.c
        if self.Wa is not None:
            out = out + self.a * (X @ self.Wa.T + self.ba if P is None else P)
        return out

    def fit(self, lam: float) -> float:
        opt = torch.optim.LBFGS(self.params(), lr=1, max_iter=LBFGS_ITERATIONS, history_size=10,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-10)
        penalty = lam * self.scale

        def closure():
            opt.zero_grad()
            loss = (F.cross_entropy(self.logits(self.X, self.P), self.Y, weight=self.weight)
                    + penalty * (self.V * self.V).sum())
            loss.backward()
            return loss

        return float(opt.step(closure).detach())

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        with torch.no_grad():
            if self.Wa is None:
                return self.V.detach().clone(), self.c.detach().clone(), None
            a = float(self.a)
            return self.V + a * self.Wa, self.c + a * self.ba, a


def _folds(y: np.ndarray, K: int, seed: int) -> tuple[np.ndarray, int]:
    """Stratified folds: each class's images dealt round the folds from a random start, so a class
    with fewer images than folds still lands in as many folds as it has images."""
    counts = np.bincount(y, minlength=K)
    k = int(min(CV_FOLDS if len(y) <= LARGE else CV_FOLDS_LARGE, len(y) // 2))
    if k < 2 or counts.min() < 2:  # a class held out whole would have no training image in its fold
        return np.zeros(len(y), int), 0
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), int)
    for c in range(K):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + rng.integers(k)) % k
    return fold, k


def _rows(feats: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    f = feats[mask]
    return torch.from_numpy(f.reshape(-1, f.shape[-1])), torch.from_numpy(np.repeat(y[mask], f.shape[1]))


def _solver(feats: np.ndarray, y: np.ndarray, mask: np.ndarray, K: int, prior, weight=None) -> _Solver:
    """A solver on all views of the ``mask`` images; the prior's class map from their center views
    (what the class looks like at prediction time: a random crop may miss the object)."""
    X, Y = _rows(feats, y, mask)
    prior_map = None
    if prior is not None:
        prior_map = _prior_map(torch.from_numpy(feats[mask, 0]), torch.from_numpy(y[mask]), K, *prior)
    return _Solver(X, Y, K, prior_map, weight)


def _cross_validate(feats, y, K, prior, fold, k, lambdas, weight, sample_weight, bar=None):
    """Held-out losses and hits ``(m, n)`` down the path of penalties, one warm-started solver per
    fold; the path stops at the first penalty whose mean held-out loss is above the best so far
    (the loss is unimodal along the path, and the weak end costs the most iterations)."""
    solvers = [_solver(feats, y, fold != f, K, prior, weight) for f in range(k)]
    held = [(torch.from_numpy(feats[fold == f, 0]), torch.from_numpy(y[fold == f])) for f in range(k)]
    losses, correct = [], []
    for lam in lambdas:
        loss, hit = np.zeros(len(y)), np.zeros(len(y))
        for f, (solver, (Xt, Yt)) in enumerate(zip(solvers, held)):
            solver.fit(lam)
            with torch.no_grad():
                out = solver.logits(Xt)
                loss[fold == f] = F.cross_entropy(out, Yt, reduction="none").numpy() * sample_weight[fold == f]
                hit[fold == f] = (out.argmax(1) == Yt).numpy()
        losses.append(loss)
        correct.append(hit)
        if bar is not None:
            bar.update()
        if len(losses) > 1 and loss.mean() > min(v.mean() for v in losses[:-1]):
            break
    return np.array(losses), np.array(correct)


def standardizer(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation over every row (image x view) of ``feats``."""
    rows = feats.reshape(-1, feats.shape[-1])
    mean = rows.mean(0, dtype=np.float64)
    var = np.maximum((rows * rows).mean(0, dtype=np.float64) - mean * mean, 0.0)
    return mean.astype(np.float32), (np.sqrt(var) + 1e-6).astype(np.float32)


def fit_head(feats: np.ndarray, y: np.ndarray, K: int, prior=None, seed: int = 0,
             penalties=PENALTIES, weight: torch.Tensor | None = None, progress: bool = False,
             standardize: bool = False, cv_weight: torch.Tensor | None | str = "weight") -> HeadFit:
    """Fit the linear head on ``feats`` (n, views, D; view 0 = center crop) and targets ``y``.

    ``prior``: the source classifier ``(W (M, D), b (M,))`` or None; cross-validation
    decides whether it is used, and the penalty (module docstring).  ``penalties``: the
    grid, times the number of images.  ``weight``: per-class loss weights (K,) of the fit.
    ``cv_weight``: per-class weights (K,) of the cross-validated held-out loss that chooses
    (``"weight"``: the same as ``weight``; None: every image alike; balanced weights: every
    class alike, as balanced accuracy counts them).  ``standardize``: solve on z-scored
    features (features of several layers differ in scale, and the penalty is isotropic);
    the returned head still reads the raw features (the scaling is folded into it)."""
    y = np.asarray(y, dtype=np.int64)
    if standardize:
        mean, std = standardizer(feats)
        feats = (feats - mean) / std
        if prior is not None:  # the same source logits from z-scored features
            Wp, bp = prior
            prior = (Wp * torch.from_numpy(std), bp + Wp @ torch.from_numpy(mean))
    cv_weight = weight if isinstance(cv_weight, str) and cv_weight == "weight" else cv_weight
    fit = _fit(np.ascontiguousarray(feats, dtype=np.float32), y, K, prior, seed, penalties, weight, cv_weight,
               progress)
    if standardize:
        with torch.no_grad():
            fit.weight = fit.weight / torch.from_numpy(std)
            fit.bias = fit.bias - fit.weight @ torch.from_numpy(mean)
    return fit


def family_rank(losses: np.ndarray, accuracies: np.ndarray, weighted: bool) -> tuple[float, ...]:
    """How a family's cross-validation ranks (lower first), from its held-out loss and accuracy per penalty:
    its best loss; when the loss is class-weighted, its best accuracy first."""
    best_loss = float(np.min(losses))
    return (-float(np.max(accuracies)), best_loss) if weighted else (best_loss,)


def _fit(feats, y, K, prior, seed, penalties, weight, cv_weight, progress) -> HeadFit:
    lambdas = [p / len(y) for p in penalties]
    # each image's weight in the cross-validated loss, scaled to average 1
    sample_weight = np.ones(len(y)) if cv_weight is None else cv_weight.numpy()[y].astype(np.float64)
    sample_weight = sample_weight / sample_weight.mean()
    fold, k = _folds(y, K, seed)
    families = [prior, None] if prior is not None else [None]
    cv = []
    chosen_prior, chosen = prior, None
    if k:
        best_rank = (math.inf,)
        bar = progress_bar(total=len(lambdas) * len(families), desc=f"head cross-validation ({k} folds)",
                   unit="penalty", leave=False, disable=not progress)
        cv_feats = feats[:, :CV_VIEWS]  # a view: each fold's rows are copied out of it anyway
        for family in families:
            losses, correct = _cross_validate(cv_feats, y, K, family, fold, k, lambdas, weight,
                                              sample_weight, bar)
            bar.total -= len(lambdas) - len(losses)  # the penalties the early stop skipped
            bar.refresh()
            mean = losses.mean(1)
            se = losses.std(1, ddof=1) / math.sqrt(len(y))
            best = int(np.argmin(mean))
            cv += [{"prior": family is not None, "lambda": lambdas[j], "loss": round(float(mean[j]), 5),
                    "se": round(float(se[j]), 5), "accuracy": round(float(correct[j].mean()), 4)}
                   for j in range(len(mean))]
            rank = family_rank(mean, correct.mean(1), weighted=cv_weight is not None)
            if rank < best_rank:  # the family that predicts held-out images better
                best_rank = rank
                chosen_prior = family
                chosen = next(j for j in range(len(mean)) if mean[j] <= mean[best] + se[best])  # one-SE rule
        bar.close()
    else:
        chosen = min(range(len(lambdas)), key=lambda j: abs(math.log(penalties[j] / FALLBACK_PENALTY)))
    solver = _solver(feats, y, np.ones(len(y), bool), K, chosen_prior, weight)
    for lam in lambdas[:chosen + 1]:  # down the path to the chosen penalty, warm-started
        solver.fit(lam)
    weight, bias, alpha = solver.folded()
    return HeadFit(weight, bias, lambdas[chosen], alpha, k, cv, prior_offered=prior is not None)
