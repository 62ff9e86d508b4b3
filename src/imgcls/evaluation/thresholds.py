"""A review budget: per-class probability thresholds chosen on labelled data, and what they cost.

The camera-trap question is "how many empties can I set aside unseen, and how
many frames does a person still look at?".  For a class ``c`` (``empty``)
and a target recall ``r`` of the *other* classes, :func:`choose_threshold`
returns the lowest threshold ``t`` such that, on labelled validation data, at
most ``1 - r`` of the images that are not ``c`` land in the automatic ``c``
pile (predicted ``c`` with ``P(c) >= t``).  Everything outside the pile is
reviewed, so the lowest such ``t`` is the smallest review load that keeps
the promise.

Thresholds are stored in the run (``thresholds.json``, one place:
:func:`save_thresholds` / :func:`load_thresholds`); prediction then writes a
``decision`` column: the label when its probability reaches the label's
threshold, else ``uncertain``.  Validation figures promise nothing on data
that differs from it; the report says on how many images each figure rests.

NumPy only at import (prediction runs without torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import rundir
from ..errors import UserError

FILE = rundir.THRESHOLDS
UNCERTAIN = "uncertain"
REPORT_RECALLS = (0.95, 0.99, 0.995)


@dataclass
class Choice:
    """One threshold for a class and its cost on the labelled data."""

    label: str
    target_recall: float          # of the other classes: kept out of this class's pile
    threshold: float
    pile: int                     # images set aside as the class (predicted it, prob >= threshold)
    pile_precision: float         # share of the pile that is the class
    other_recall: float           # share of the other classes' images kept out of the pile
    review: int                   # images a person still looks at (all but the pile)
    n: int

    @property
    def review_share(self) -> float:
        return self.review / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        return {**self.__dict__, "review_share": round(self.review_share, 4)}


def _pile_scores(probs: np.ndarray, truth: np.ndarray, c: int):
    """Sorted candidate thresholds and, per candidate, (pile size, class images in it, others in it)."""
    top = probs.argmax(1) == c
    score = np.where(top, probs[:, c], -1.0)  # only images predicted c can enter its pile
    order = np.argsort(-score, kind="stable")
    s, is_c = score[order], truth[order] == c
    pile = np.arange(1, len(s) + 1)
    hits = np.cumsum(is_c)
    # a threshold at s[k] takes every image scoring >= s[k]: the last of a run of ties
    last = np.r_[s[1:] != s[:-1], True] & (s >= 0)
    return s[last], pile[last], hits[last], (pile - hits)[last]


def choose_threshold(probs: np.ndarray, truth: np.ndarray, c: int, target_recall: float,
                     label: str = "") -> Choice:
    """The lowest threshold on ``P(c)`` keeping at least ``target_recall`` of the images of other
    classes out of class ``c``'s automatic pile (module docstring).  ``probs`` (n, K), ``truth`` (n,)."""
    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(truth)
    n = len(truth)
    others = int(np.sum(truth != c))
    allowed = np.floor((1.0 - target_recall) * others + 1e-9)  # other-class images the pile may take
    thresholds, pile, hits, wrong = _pile_scores(probs, truth, c)
    ok = wrong <= allowed
    if not ok.any():  # even the most confident prediction of c is wrong too often: nothing is set aside
        return Choice(label, target_recall, 1.0, 0, 1.0, 1.0, n, n)
    k = int(np.flatnonzero(ok).max())  # the most images set aside within the budget (thresholds fall with k)
    taken_wrong = int(wrong[k])
    return Choice(label, target_recall, float(thresholds[k]), int(pile[k]), float(hits[k] / pile[k]),
                  1.0 - taken_wrong / others if others else 1.0, n - int(pile[k]), n)


def tradeoff(probs: np.ndarray, truth: np.ndarray, c: int) -> dict[str, np.ndarray]:
    """Every candidate threshold of class ``c`` with its other-class recall and review share (the curve)."""
    thresholds, pile, _, wrong = _pile_scores(np.asarray(probs, np.float64), np.asarray(truth), c)
    others = max(1, int(np.sum(np.asarray(truth) != c)))
    n = len(truth)
    return {"threshold": thresholds, "other_recall": 1.0 - wrong / others, "review_share": 1.0 - pile / n}


def decide(label: str, prob: float, thresholds: dict[str, float]) -> str:
    """The decision for a prediction: its label if ``prob`` reaches the label's threshold, else uncertain."""
    return label if prob >= thresholds.get(label, 0.0) else UNCERTAIN


# --------------------------------------------------------------------------- multi-label: a threshold per label


def best_f1_threshold(probs: np.ndarray, truth: np.ndarray, default: float = 0.5) -> tuple[float, dict]:
    """The threshold on one label's probabilities with the highest F1 on labelled data, and its figures.

    Candidates are the scores themselves (scikit-learn's ``precision_recall_curve``); the threshold
    returned lies halfway between the chosen score and the next lower one, so a probability that
    differs in the last digits (ONNX Runtime vs torch) decides the same way.  Without a positive
    the label keeps ``default``."""
    from sklearn.metrics import precision_recall_curve

    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(truth) > 0.5
    if not truth.any():
        return default, {"rule": "default (no positive to tune on)", "threshold": default, "support": 0,
                         "n": int(len(truth))}
    precision, recall, scores = precision_recall_curve(truth, probs)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    k = int(np.argmax(f1))
    below = probs[probs < scores[k]]
    threshold = float((scores[k] + below.max()) / 2) if len(below) else float(scores[k] / 2)
    return threshold, {"rule": "highest F1", "threshold": threshold, "f1": float(f1[k]),
                       "precision": float(precision[k]), "recall": float(recall[k]),
                       "support": int(truth.sum()), "n": int(len(truth))}


# --------------------------------------------------------------------------- the run's file


def load_thresholds(run_dir: str | Path) -> dict[str, float]:
    """The thresholds stored in a run directory (empty when it has none)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(k): float(v) for k, v in data["thresholds"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path}: not a thresholds file ({err}); run `imgcls thresholds` again or delete it") from None


def save_thresholds(run_dir: str | Path, choices: list[Choice], labels: list[str]) -> Path:
    """Merge ``choices`` into the run's thresholds (other classes keep theirs) and write the file."""
    return store_thresholds(run_dir, {c.label: (c.threshold, c.to_dict()) for c in choices}, labels)


def store_thresholds(run_dir: str | Path, chosen: dict[str, tuple[float, dict]], labels: list[str]) -> Path:
    """Merge ``{label: (threshold, how it was chosen)}`` into the run's ``thresholds.json``."""
    path = Path(run_dir) / FILE
    current = load_thresholds(run_dir)
    details = json.loads(path.read_text()).get("chosen", {}) if path.is_file() else {}
    for label, (threshold, detail) in chosen.items():
        current[label] = float(threshold)
        details[label] = detail
    unknown = sorted(set(current) - set(labels))
    if unknown:
        raise UserError(f"{path}: thresholds for class(es) {', '.join(unknown)} the model does not have")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"thresholds": current, "chosen": details}, indent=2))
    tmp.replace(path)
    return path


def check_threshold(value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise UserError(f"--threshold must lie between 0 and 1, not {value}")


def plot_tradeoff(curve: dict[str, np.ndarray], choices: list[Choice], label: str, path: Path) -> Path:
    """The trade-off as a PNG: share of images still reviewed against the other classes' recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve["other_recall"], curve["review_share"], drawstyle="steps-post")
    for choice in choices:
        ax.plot([choice.other_recall], [choice.review_share], "o")
        ax.annotate(f"t={choice.threshold:.3f}", (choice.other_recall, choice.review_share),
                    textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(f"recall of the other classes (kept out of the '{label}' pile)")
    ax.set_ylabel("share of images a person reviews")
    ax.set_title(f"auto-'{label}' threshold: the review trade-off")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
