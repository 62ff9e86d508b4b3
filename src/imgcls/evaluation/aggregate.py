"""Event-level probabilities: the frames of one capture event -> one row.

Prediction (``--aggregate``) and evaluation (``--events``) both call
:func:`aggregate_probs`, so an event is scored the way it is written out.
NumPy only: the prediction runtime uses it without torch.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError


def _mean(probs: np.ndarray) -> np.ndarray:
    return probs.mean(axis=0)


def _max(probs: np.ndarray) -> np.ndarray:
    # a species seen clearly in one frame of a burst is not averaged away by the frames around it;
    # renormalized so the row still reads as a distribution
    peak = probs.max(axis=0)
    return peak / peak.sum()


AGGREGATES = {"mean": _mean, "max": _max}


def check_aggregate(how: str) -> None:
    if how not in AGGREGATES:
        raise UserError(f"unknown aggregate {how!r}; use {' or '.join(AGGREGATES)}")


def aggregate_probs(probs: np.ndarray, how: str = "mean") -> np.ndarray:
    """``(frames, K)`` probabilities of one event -> ``(K,)``: ``mean`` averages the frames, ``max`` takes
    each class's highest probability over the frames and renormalizes."""
    check_aggregate(how)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"expected (frames, classes) probabilities with at least one frame, got {probs.shape}")
    return AGGREGATES[how](probs)


def event_label(labels: list[str]) -> str:
    """The true label of an event from its frames' labels: the most frequent one, ties to the first seen
    (a burst is one trigger, so its frames almost always agree)."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return max(counts, key=lambda label: counts[label])  # dicts keep insertion order: ties go to the first
