"""The softmax classifier, written out: logits -> probabilities -> likelihood -> loss.

This module is the theory in executable form, small enough to read and check
against torch.  Training does not use it (it uses torch's fused losses, which
compute the same numbers faster); the tests pin both to the same values.

From logits to a loss
---------------------
A classifier outputs one unnormalized score per class, the *logits*
``z = (z_1, ..., z_K)``.  The *softmax* turns them into a categorical
distribution over the K classes::

    softmax(z)_k = exp(z_k) / sum_j exp(z_j)

Every entry is in (0, 1) and a row sums to 1, so ``p = softmax(z)`` reads as
``P(Y = k | x)``.  Adding a constant to all logits changes nothing, which is
how it is computed safely: subtract ``max(z)`` first, so the largest exponent
is ``exp(0) = 1`` and nothing overflows even for logits like ``[1000, 0]``.

The *likelihood* of a labelled sample is the probability the model gives to
what was observed.  With the label one-hot encoded, ``y in {0, 1}^K``::

    L(x, y) = prod_j p_j ** y_j        (= p of the true class)

and for N independent samples it is the product over samples.  A product of
many numbers below 1 quickly becomes tiny (five samples give 0.36, the same
five copied ten times give 4e-5), so one maximizes its logarithm instead and,
to get something to minimize, takes the negative: the *negative
log-likelihood*::

    NLL = -log prod_i prod_j p_ij ** y_ij = -sum_i sum_j y_ij * log p_ij

Read as information theory, ``-sum_j y_j log p_j`` is the *cross-entropy*
between the true distribution y and the predicted p: the same formula, so
minimizing cross-entropy *is* maximum likelihood.  It also works when y is
not one-hot (soft targets, label smoothing).  Computed from logits it is
``-sum_j y_j * log_softmax(z)_j`` with the stable ``log_softmax``.  Losses are
averaged over samples by default (``reduction="mean"``, as in torch), which
keeps their scale independent of the batch size.

Multi-class, binary, multi-label
--------------------------------
* Multi-class (exactly one of K classes): softmax over the K logits,
  categorical likelihood, :func:`cross_entropy`.
* Binary (one yes/no label): one logit per sample, ``p = sigmoid(z) =
  1 / (1 + exp(-z))`` is ``P(y = 1)``.  The likelihood is Bernoulli,
  ``p ** y * (1 - p) ** (1 - y)``, and its negative log is the *binary*
  cross-entropy, :func:`binary_cross_entropy` (softmax over two logits
  ``[0, z]`` gives the same model).
* Multi-label (any subset of K labels): K independent binary problems, one
  sigmoid per label instead of a softmax across them (the labels do not
  compete, so the probabilities need not sum to 1), with the binary
  cross-entropy averaged over all N x K entries.

Inputs may be torch tensors, NumPy arrays or (nested) lists; plain Python
numbers become float64 and integer tensors float64.  Every function returns a
tensor.  Malformed inputs (mismatched shapes, probabilities outside [0, 1],
class indices out of range) raise :class:`ValueError`.
"""

from __future__ import annotations

import torch

__all__ = [
    "softmax",
    "log_softmax",
    "sigmoid",
    "likelihood",
    "negative_log_likelihood",
    "cross_entropy",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
]

_REDUCTIONS = ("mean", "sum", "none")


def softmax(logits, dim: int = -1) -> torch.Tensor:
    """``exp(z_k - max z) / sum_j exp(z_j - max z)`` along ``dim``; each slice sums to 1."""
    z = _floats(logits, "logits")
    e = torch.exp(z - z.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax(logits, dim: int = -1) -> torch.Tensor:
    """``log softmax(z)_k = (z_k - m) - log sum_j exp(z_j - m)`` with ``m = max z`` along ``dim``.

    Finite for any finite logits: ``log_softmax([1000, 0]) == [0, -1000]``.
    """
    z = _floats(logits, "logits")
    shifted = z - z.amax(dim=dim, keepdim=True)
    return shifted - torch.log(torch.exp(shifted).sum(dim=dim, keepdim=True))


def sigmoid(logits) -> torch.Tensor:
    """``1 / (1 + exp(-z))``, elementwise: P(y = 1) for a binary or multi-label logit."""
    return torch.sigmoid(_floats(logits, "logits"))


def likelihood(pred, y) -> torch.Tensor:
    """Probability of the observed labels ``y`` under the predictions ``pred`` (a 0-d tensor).

    The shape of ``pred`` picks the model:

    * ``pred`` of shape (N,): Bernoulli, ``pred[i] = P(y_i = 1)`` and ``y`` of
      shape (N,) with values in [0, 1] (normally 0 or 1)::

          L = prod_i p_i ** y_i * (1 - p_i) ** (1 - y_i)

    * ``pred`` of shape (N, K): categorical, one row of class probabilities
      per sample, and ``y`` either class indices of shape (N,) or one-hot
      (or soft) targets of shape (N, K)::

          L = prod_i prod_j p_ij ** y_ij   (= prod_i p_i[y_i] for indices)

    The product of N numbers below 1 shrinks fast with N; use
    :func:`negative_log_likelihood` (``= -log L`` with ``reduction="sum"``)
    for anything but small examples.
    """
    p, t = _pred_and_targets(pred, y)
    if p.ndim == 1:
        return (p**t * (1 - p) ** (1 - t)).prod()
    return (p**t).prod()


def negative_log_likelihood(pred, y, reduction: str = "mean") -> torch.Tensor:
    """``-log likelihood(pred, y)``, per sample, summed or averaged over samples.

    Same inputs as :func:`likelihood` (probabilities, not logits)::

        Bernoulli,   pred (N,):    l_i = -(y_i log p_i + (1 - y_i) log(1 - p_i))
        categorical, pred (N, K):  l_i = -sum_j y_ij log p_ij   (= -log p_i[y_i])

    ``reduction``: ``"mean"`` (default, as in torch) averages ``l_i`` over the
    N samples, ``"sum"`` adds them (then the result is exactly
    ``-log likelihood``), ``"none"`` returns the (N,) vector.  A label with
    probability 0 gives ``inf`` (torch clamps the log at -100 instead).
    Unlike ``torch.nn.functional.nll_loss``, this takes probabilities, not
    log-probabilities: ``F.nll_loss(p.log(), y)`` is the same number.
    """
    p, t = _pred_and_targets(pred, y)
    if p.ndim == 1:
        per_sample = -(torch.xlogy(t, p) + torch.xlogy(1 - t, 1 - p))
    else:
        per_sample = -torch.xlogy(t, p).sum(dim=1)
    return _reduce(per_sample, reduction)


def cross_entropy(logits, targets, label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the targets against ``softmax(logits)``, as ``F.cross_entropy``.

    ``logits`` has shape (N, K); ``targets`` are class indices (N,) or a target
    distribution per sample (N, K), one-hot or soft.  Per sample::

        q_i = (1 - eps) * y_i + eps / K             (label smoothing, eps in [0, 1])
        l_i = -sum_j q_ij * log_softmax(z_i)_j

    For one-hot targets and ``eps = 0`` this is the negative log-likelihood of
    ``softmax(logits)``.  ``reduction`` as in :func:`negative_log_likelihood`
    (``"mean"`` divides by N).
    """
    z = _floats(logits, "logits")
    if z.ndim != 2:
        raise ValueError(f"cross_entropy expects logits of shape (N, K), got {tuple(z.shape)}")
    z, q = _pred_and_targets(z, targets, probabilities=False)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if label_smoothing:
        q = (1 - label_smoothing) * q + label_smoothing / z.shape[1]
    logp = log_softmax(z, dim=1)
    per_sample = -torch.where(q == 0, 0.0, q * logp).sum(dim=1)  # 0 * log 0 counts as 0
    return _reduce(per_sample, reduction)


def binary_cross_entropy(probs, y, reduction: str = "mean") -> torch.Tensor:
    """Elementwise ``-(y log p + (1 - y) log(1 - p))``, as ``F.binary_cross_entropy``.

    ``probs`` and ``y`` have the same (any) shape, values in [0, 1]: (N,) for a
    binary task, (N, K) for K independent labels (multi-label).  ``"mean"``
    averages over all elements.  ``p = 0`` for ``y = 1`` gives ``inf`` (torch
    clamps the log at -100).
    """
    p, t = _floats(probs, "probs"), _floats(y, "y")
    _same_shape(p, t, "probs", "y")
    _in_unit_interval(p, "probs")
    _in_unit_interval(t, "y")
    t = t.to(p.dtype)
    return _reduce(-(torch.xlogy(t, p) + torch.xlogy(1 - t, 1 - p)), reduction)


def binary_cross_entropy_with_logits(logits, y, reduction: str = "mean") -> torch.Tensor:
    """``binary_cross_entropy(sigmoid(z), y)`` computed stably from the logits ``z``.

    Uses ``-log sigmoid(z) = log(1 + exp(-z))``, which for any z is written
    without overflow as::

        l = max(z, 0) - z * y + log(1 + exp(-|z|))
    """
    z, t = _floats(logits, "logits"), _floats(y, "y")
    _same_shape(z, t, "logits", "y")
    _in_unit_interval(t, "y")
    t = t.to(z.dtype)
    return _reduce(z.clamp(min=0) - z * t + torch.log1p(torch.exp(-z.abs())), reduction)


# -- input handling -----------------------------------------------------------


def _floats(x, name: str) -> torch.Tensor:
    """A floating tensor: tensors/arrays keep a float dtype, numbers and integers become float64."""
    t = torch.as_tensor(x) if hasattr(x, "dtype") else torch.as_tensor(x, dtype=torch.float64)
    if not t.is_floating_point():
        if t.is_complex():
            raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
        t = t.to(torch.float64)
    return t


def _pred_and_targets(pred, y, probabilities: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``pred`` (N,) or (N, K) and return the targets as a float tensor shaped like it.

    Index targets (N,) for a (N, K) ``pred`` are turned into one-hot rows.
    """
    name = "probs" if probabilities else "logits"
    p = _floats(pred, name)
    if p.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (N,) or (N, K), got {tuple(p.shape)}")
    if probabilities:
        _in_unit_interval(p, name)
    t = torch.as_tensor(y)
    if p.ndim == 2 and t.ndim == 1:  # class indices
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"class-index targets must be integers, got dtype {t.dtype}")
        if t.shape[0] != p.shape[0]:
            raise ValueError(f"{t.shape[0]} targets for {p.shape[0]} samples")
        k = p.shape[1]
        if t.numel() and (t.min() < 0 or t.max() >= k):
            raise ValueError(f"class indices must be in [0, {k - 1}], got {t.min().item()}..{t.max().item()}")
        return p, torch.nn.functional.one_hot(t.long(), k).to(p.dtype)
    t = _floats(y, "targets").to(p.dtype)
    if p.ndim == 2:
        _same_shape(p, t, name, "targets", hint="; targets must be class indices (N,) or one-hot/soft (N, K)")
    else:
        _same_shape(p, t, name, "y", hint="; a (N,) prediction is Bernoulli and needs (N,) labels")
    _in_unit_interval(t, "targets" if p.ndim == 2 else "y")
    return p, t


def _same_shape(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str, hint: str = "") -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a_name} {tuple(a.shape)} vs {b_name} {tuple(b.shape)}{hint}")


def _in_unit_interval(t: torch.Tensor, name: str) -> None:
    bad = ~((t >= 0) & (t <= 1))  # NaN fails both comparisons
    if bad.any():
        raise ValueError(f"{name} must be in [0, 1]; got {t[bad].flatten()[0].item()!r}")


def _reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
