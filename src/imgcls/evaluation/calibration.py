"""Calibrated confidence: expected calibration error, reliability bins and temperature scaling.

A classifier's top probability is *calibrated* when, among the images it
gives 0.9, about 90 % are right.  Networks trained with cross-entropy are
often over-confident; temperature scaling (Guo et al., 2017) divides the
logits by one scalar ``T > 0`` fitted on held-out data (the val split) to
minimise the negative log-likelihood of ``softmax(logits / T)``.  It changes
no argmax, so accuracy and the confusion matrix stay as they are.

* :func:`reliability` / :func:`ece`: 15 equal-width bins of the top-1
  confidence; per bin the mean confidence, the accuracy and the count; the
  ECE is the count-weighted mean of ``|accuracy - confidence|``.
* :func:`fit_temperature`: SciPy's bounded scalar minimiser on ``log T``.
* :func:`calibrate`: the fit and its before/after figures (``calibration.json``).
* :func:`run_temperature`: the stored temperature of a run (its calibration.json).

Where the temperature travels: ``calibration.json`` in the run, the
``temperature`` key of the ``model.safetensors`` imgcls metadata and the ONNX
``imgcls.temperature`` metadata (:data:`imgcls.prediction.engines.META_TEMPERATURE`);
:class:`imgcls.prediction.predict.Predictor` applies it wherever logits become
probabilities.  NumPy at import (prediction imports this module), SciPy inside
the fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import rundir
from ..errors import UserError
from ..softmax import cross_entropy, softmax

BINS = 15
# below this many val images, or without a single mistake (or a single right answer), the likelihood
# does not pin T down: with no mistake it falls all the way as T -> 0
MIN_IMAGES = 10
LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))
SINGLE_LABEL_TASKS = (None, "multiclass")  # a softmax over the classes (imgcls.tasks); sigmoid tasks are not scaled


def single_label(task) -> bool:
    """Whether a model's task (its metadata's ``task``, None when it has none) is a softmax over classes."""
    return task in SINGLE_LABEL_TASKS


def check_temperature(value, where: str, fix: str = "train the run again or delete the value") -> float:
    """A stored temperature as a float; a UserError naming ``where`` when it is not a positive number."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if isinstance(value, bool) or not (math.isfinite(t) and t > 0):
        raise UserError(f"{where}: the temperature must be a positive number, not {value!r}; {fix}")
    return t


def scaled_probs(logits, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / T)`` along the last axis, float64."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature)


def nll(logits, targets, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits / T)``."""
    return float(cross_entropy(np.asarray(logits, dtype=np.float64) / temperature, np.asarray(targets)))


@dataclass
class Reliability:
    """Per confidence bin (``BINS`` equal-width bins of [0, 1]): mean confidence, accuracy, count."""

    confidence: list[float | None]
    accuracy: list[float | None]
    count: list[int]
    ece: float
    bins: int = BINS

    def to_dict(self) -> dict:
        return {"bins": self.bins, "ece": self.ece, "confidence": self.confidence, "accuracy": self.accuracy,
                "count": self.count}

    @classmethod
    def from_dict(cls, data: dict) -> Reliability:
        return cls(list(data["confidence"]), list(data["accuracy"]), [int(c) for c in data["count"]],
                   float(data["ece"]), int(data.get("bins", BINS)))


def reliability(probs, targets, bins: int = BINS) -> Reliability:
    """Reliability bins of probabilities ``(N, K)`` against class indices ``(N,)``.

    Bin ``b`` holds the top-1 confidences in ``(b/bins, (b+1)/bins]`` (the first bin includes 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    confidence = probs.max(1)
    correct = probs.argmax(1) == targets
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    right = np.bincount(index, weights=correct.astype(np.float64), minlength=bins)
    n = max(len(targets), 1)
    ece = float(np.abs(right - conf_sum).sum() / n)  # sum over bins of |B|/n * |acc(B) - conf(B)|
    mean = lambda total: [float(t / c) if c else None for t, c in zip(total, count)]  # noqa: E731
    return Reliability(mean(conf_sum), mean(right), count.astype(int).tolist(), ece, bins)


def ece(probs, targets, bins: int = BINS) -> float:
    """Expected calibration error of the top-1 confidence (``bins`` equal-width bins)."""
    return reliability(probs, targets, bins).ece


def fit_temperature(logits, targets) -> float:
    """The ``T > 0`` that minimises the NLL of ``softmax(logits / T)`` (searched on log T, bounded)."""
    from scipy.optimize import minimize_scalar  # only the fit needs SciPy

    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    result = minimize_scalar(lambda log_t: nll(logits, targets, math.exp(log_t)), bounds=LOG_T_BOUNDS,
                             method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


@dataclass
class Calibration:
    """A fitted (or deliberately not fitted) temperature and what it does on the data it was fitted on."""

    temperature: float
    fitted: bool
    reason: str                  # why it was not fitted ("" when it was)
    n: int
    split: str
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    before: Reliability
    after: Reliability
    held_out: dict = field(default_factory=dict)   # split -> the same figures with this T (e.g. test)

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "fitted": self.fitted, "reason": self.reason,
                "fitted_on": self.split, "n": self.n, "bins": BINS,
                "ece_before": self.ece_before, "ece_after": self.ece_after,
                "nll_before": self.nll_before, "nll_after": self.nll_after,
                "reliability_before": self.before.to_dict(), "reliability_after": self.after.to_dict(),
                "held_out": self.held_out}

    def summary(self) -> dict:
        """What summary.json keeps."""
        return {"temperature": round(self.temperature, 4), "val_ece_before": round(self.ece_before, 4),
                "val_ece_after": round(self.ece_after, 4)}


def figures(logits, targets, temperature: float) -> dict:
    """ECE and NLL of ``logits`` before and after dividing them by ``temperature``, with the reliability bins."""
    before = reliability(scaled_probs(logits), targets)
    after = reliability(scaled_probs(logits, temperature), targets)
    return {"n": int(len(targets)), "ece_before": before.ece, "ece_after": after.ece,
            "nll_before": nll(logits, targets), "nll_after": nll(logits, targets, temperature),
            "reliability_before": before.to_dict(), "reliability_after": after.to_dict()}


def calibrate(logits, targets, fit: bool = True, split: str = "val") -> Calibration:
    """Fit the temperature on ``logits`` (N, K) and class indices ``targets`` (N,); ``fit=False`` (or data
    that cannot pin it down, see :data:`MIN_IMAGES`) keeps T = 1 and says why."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    right = int((logits.argmax(1) == targets).sum()) if len(targets) else 0
    reason = ("turned off (--no-calibrate)" if not fit
              else f"only {len(targets)} {split} images (at least {MIN_IMAGES} needed)" if len(targets) < MIN_IMAGES
              else f"no mistake on {split}: the likelihood has no minimum" if right == len(targets)
              else f"no right answer on {split}" if right == 0 else "")
    temperature = 1.0 if reason else fit_temperature(logits, targets)
    f = figures(logits, targets, temperature)
    return Calibration(temperature, not reason, reason, f["n"], split, f["ece_before"], f["ece_after"],
                       f["nll_before"], f["nll_after"], Reliability.from_dict(f["reliability_before"]),
                       Reliability.from_dict(f["reliability_after"]))


def write_calibration(run_dir: str | Path, calibration: Calibration) -> Path:
    path = Path(run_dir) / rundir.CALIBRATION
    rundir.write_json(path, calibration.to_dict())
    return path


def read_calibration(run_dir: str | Path) -> dict | None:
    """The run's calibration.json, None when it has none."""
    path = Path(run_dir) / rundir.CALIBRATION
    if not path.is_file():
        return None
    data = rundir.read_json(path, "delete it (prediction then uses the model file's temperature) or train again")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; delete it or train the run again")
    check_temperature(data.get("temperature"), str(path))
    return data


def run_temperature(path: str | Path, default: float = 1.0) -> float:
    """The temperature stored in run directory ``path`` (calibration.json), else ``default`` (the model
    file's own, or 1)."""
    path = Path(path)
    data = read_calibration(path) if path.is_dir() else None
    return float(data["temperature"]) if data is not None else default
