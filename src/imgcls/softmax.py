"""The softmax classifier, written out: logits -> probabilities -> likelihood -> loss.

This module is the theory in executable form, small enough to read and check
against torch, and the implementation that runs: prediction turns logits into
probabilities with :func:`softmax` and evaluation scores them with
:func:`log_softmax`, in NumPy, so neither needs torch.  Training uses torch's
fused losses, which compute the same numbers on the training device; the tests
pin both to the same values.

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
numbers become float64, integer and boolean arrays or tensors float64, and
floating ones keep their dtype (float32 stays float32).  Every function
returns a NumPy array, the reductions a 0-d NumPy scalar.  Malformed inputs
(mismatched shapes, probabilities outside [0, 1], class indices out of range)
raise :class:`ValueError`.
"""

from __future__ import annotations

import numpy as np

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


def softmax(logits, dim: int = -1) -> np.ndarray:
    """``exp(z_k - max z) / sum_j exp(z_j - max z)`` along ``dim``; each slice sums to 1."""
    z = _floats(logits, "logits")
    e = np.exp(z - z.max(axis=dim, keepdims=True))
    return e / e.sum(axis=dim, keepdims=True)


def log_softmax(logits, dim: int = -1) -> np.ndarray:
    """``log softmax(z)_k = (z_k - m) - log sum_j exp(z_j - m)`` with ``m = max z`` along ``dim``.

    Finite for any finite logits: ``log_softmax([1000, 0]) == [0, -1000]``.
    """
    z = _floats(logits, "logits")
    shifted = z - z.max(axis=dim, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=dim, keepdims=True))


def sigmoid(logits) -> np.ndarray:
    """``1 / (1 + exp(-z))``, elementwise: P(y = 1) for a binary or multi-label logit."""
    z = _floats(logits, "logits")
    e = np.exp(-np.abs(z))  # exp of a non-positive number: no overflow for large |z|
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def likelihood(pred, y) -> np.ndarray:
    """Probability of the observed labels ``y`` under the predictions ``pred`` (a 0-d scalar).

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


def negative_log_likelihood(pred, y, reduction: str = "mean") -> np.ndarray:
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
        per_sample = -(_xlogy(t, p) + _xlogy(1 - t, 1 - p))
    else:
        per_sample = -_xlogy(t, p).sum(axis=1)
    return _reduce(per_sample, reduction)


def cross_entropy(logits, targets, label_smoothing: float = 0.0, reduction: str = "mean") -> np.ndarray:
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
        q = ((1 - label_smoothing) * q + label_smoothing / z.shape[1]).astype(z.dtype, copy=False)
    logp = log_softmax(z, dim=1)
    per_sample = -np.where(q == 0, z.dtype.type(0), q * logp).sum(axis=1)  # 0 * log 0 counts as 0
    return _reduce(per_sample, reduction)


def binary_cross_entropy(probs, y, reduction: str = "mean") -> np.ndarray:
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
    t = t.astype(p.dtype, copy=False)
    return _reduce(-(_xlogy(t, p) + _xlogy(1 - t, 1 - p)), reduction)


def binary_cross_entropy_with_logits(logits, y, reduction: str = "mean") -> np.ndarray:
    """``binary_cross_entropy(sigmoid(z), y)`` computed stably from the logits ``z``.

    Uses ``-log sigmoid(z) = log(1 + exp(-z))``, which for any z is written
    without overflow as::

        l = max(z, 0) - z * y + log(1 + exp(-|z|))
    """
    z, t = _floats(logits, "logits"), _floats(y, "y")
    _same_shape(z, t, "logits", "y")
    _in_unit_interval(t, "y")
    t = t.astype(z.dtype, copy=False)
    return _reduce(np.maximum(z, z.dtype.type(0)) - z * t + np.log1p(np.exp(-np.abs(z))), reduction)


# -- input handling -----------------------------------------------------------


def _array(x) -> np.ndarray:
    """``x`` as a NumPy array; a torch tensor (anything with ``.detach``) without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; float32 holds every value exactly
            x = x.float()
    return np.asarray(x)


def _floats(x, name: str) -> np.ndarray:
    """A floating array: arrays/tensors keep a float dtype, numbers, booleans and integers become float64."""
    a = _array(x) if hasattr(x, "dtype") else np.asarray(x, dtype=np.float64)
    if not np.issubdtype(a.dtype, np.floating):
        if np.issubdtype(a.dtype, np.complexfloating):
            raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
        a = a.astype(np.float64)
    return a


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x * log(y)``, 0 where ``x == 0`` (also for ``y == 0``), as ``torch.xlogy``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = x * np.log(y)
    return np.where((x == 0) & ~np.isnan(y), out.dtype.type(0), out)


def _pred_and_targets(pred, y, probabilities: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``pred`` (N,) or (N, K) and return the targets as a float array shaped like it.

    Index targets (N,) for a (N, K) ``pred`` are turned into one-hot rows.
    """
    name = "probs" if probabilities else "logits"
    p = _floats(pred, name)
    if p.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (N,) or (N, K), got {tuple(p.shape)}")
    if probabilities:
        _in_unit_interval(p, name)
    t = _array(y)
    if p.ndim == 2 and t.ndim == 1:  # class indices
        if not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"class-index targets must be integers, got dtype {t.dtype}")
        if t.shape[0] != p.shape[0]:
            raise ValueError(f"{t.shape[0]} targets for {p.shape[0]} samples")
        k = p.shape[1]
        if t.size and (t.min() < 0 or t.max() >= k):
            raise ValueError(f"class indices must be in [0, {k - 1}], got {t.min().item()}..{t.max().item()}")
        return p, np.eye(k, dtype=p.dtype)[t]
    t = _floats(y, "targets").astype(p.dtype, copy=False)
    if p.ndim == 2:
        _same_shape(p, t, name, "targets", hint="; targets must be class indices (N,) or one-hot/soft (N, K)")
    else:
        _same_shape(p, t, name, "y", hint="; a (N,) prediction is Bernoulli and needs (N,) labels")
    _in_unit_interval(t, "targets" if p.ndim == 2 else "y")
    return p, t


def _same_shape(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str, hint: str = "") -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a_name} {tuple(a.shape)} vs {b_name} {tuple(b.shape)}{hint}")


def _in_unit_interval(a: np.ndarray, name: str) -> None:
    bad = ~((a >= 0) & (a <= 1))  # NaN fails both comparisons
    if bad.any():
        raise ValueError(f"{name} must be in [0, 1]; got {a[bad].ravel()[0].item()!r}")


def _reduce(per_item: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
