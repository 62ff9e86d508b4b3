"""Evaluation metrics from logits and labels (scikit-learn does the counting).

:func:`compute_metrics` takes arrays; :func:`metrics_of_stream` takes the
``(record, logits or None, error)`` stream of :func:`imgcls.prediction.engines.stream_logits`
(or ``Predictor.iter_logits``), so evaluation and the int8 gate score logits
one way.  :func:`event_metrics` scores capture events: each event's frames
aggregated into one row (:func:`imgcls.evaluation.aggregate.aggregate_probs`), then the
same :func:`compute_metrics`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ..errors import UserError, listing
from ..rundir import atomic_write, metrics_files, write_json
from ..softmax import log_softmax, softmax
from .aggregate import aggregate_probs, event_label
from .plots import plot_confusion

if TYPE_CHECKING:
    from ..data.records import Record


@dataclass
class Metrics:
    accuracy: float
    balanced_accuracy: float
    top5_accuracy: float | None
    loss: float
    per_class: list[dict]            # label, precision, recall, f1, support
    confusion: np.ndarray            # rows = true class, columns = predicted
    labels: list[str]
    n: int
    events: EventMetrics | None = None   # the same figures per capture event (``imgcls eval --events``)

    def to_dict(self) -> dict:
        data = {"accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy, "loss": self.loss,
                "n": self.n, "per_class": self.per_class, "confusion_matrix": self.confusion.tolist(),
                "labels": self.labels}
        if self.top5_accuracy is not None:
            data["top5_accuracy"] = self.top5_accuracy
        if self.events is not None:
            data["events"] = self.events.to_dict()
        return data

    def confusion_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["true \\ predicted", *self.labels])
        for label, row in zip(self.labels, self.confusion.tolist()):
            writer.writerow([label, *row])
        return out.getvalue()

    def to_text(self) -> str:
        lines = [f"accuracy           {self.accuracy:.4f}  (n={self.n})",
                 f"balanced accuracy  {self.balanced_accuracy:.4f}"]
        if self.top5_accuracy is not None:
            lines.append(f"top-5 accuracy     {self.top5_accuracy:.4f}")
        lines.append(f"loss (NLL)         {self.loss:.4f}")
        width = max(8, *(len(label) for label in self.labels))
        lines.append("")
        lines.append(f"{'class':<{width}}  precision  recall     f1  support")
        for row in self.per_class:
            lines.append(f"{row['label']:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}")
        if self.events is not None:
            lines += ["", self.events.to_text()]
        return "\n".join(lines)


EVENT_SOURCES = {"data": "given by the data (an event/group column, COCO sequences)",
                 "exif": "frames within the event gap per camera, by EXIF time"}


@dataclass
class EventMetrics:
    """Metrics of capture events: one row per event, its frames' probabilities aggregated."""

    metrics: Metrics       # n = the number of events
    aggregate: str         # how the frames were combined (imgcls.evaluation.aggregate.AGGREGATES)
    source: str            # where the events came from (EVENT_SOURCES)
    frames: int            # scored frames in those events
    max_frames: int

    @property
    def mean_frames(self) -> float:
        return self.frames / self.metrics.n if self.metrics.n else 0.0

    def to_dict(self) -> dict:
        return {**self.metrics.to_dict(), "events": self.metrics.n, "frames": self.frames,
                "frames_per_event": round(self.mean_frames, 3), "max_frames_per_event": self.max_frames,
                "aggregate": self.aggregate, "source": self.source}

    def to_text(self) -> str:
        head = (f"events: {self.metrics.n}, {EVENT_SOURCES.get(self.source, self.source)}\n"
                f"{self.mean_frames:.1f} frames per event on average, {self.max_frames} at most; each event scored"
                f" by the {self.aggregate} of its frames' probabilities")
        return head + "\n" + self.metrics.to_text()


def compute_metrics(logits: np.ndarray, targets: np.ndarray, labels: list[str]) -> Metrics:
    # scikit-learn is a [train] dependency, and slow to import: loaded when metrics are computed
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    k = len(labels)
    classes = np.arange(k)
    pred = logits.argmax(1)
    log_probs = log_softmax(logits, dim=1)
    loss = float(-log_probs[np.arange(len(targets)), targets].mean()) if len(targets) else float("nan")
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, pred, labels=classes, zero_division=0)
    per_class = [{"label": labels[i], "precision": float(precision[i]), "recall": float(recall[i]),
                  "f1": float(f1[i]), "support": int(support[i])} for i in range(k)]
    top5 = float((np.argsort(-logits, 1, kind="stable")[:, :5] == targets[:, None]).any(1).mean()) if k >= 5 else None
    return Metrics(
        accuracy=float((pred == targets).mean()),
        balanced_accuracy=float(balanced_accuracy_score(targets, pred)) if len(set(targets.tolist())) > 1 else float((pred == targets).mean()),
        top5_accuracy=top5, loss=loss, per_class=per_class,
        confusion=confusion_matrix(targets, pred, labels=classes), labels=list(labels), n=int(len(targets)))


def metrics_of_stream(stream: Iterable[tuple[Record, np.ndarray | None, str]],
                      labels: list[str]) -> tuple[Metrics | None, list[tuple[Record, str]]]:
    """(Metrics of the rows that have logits, [(record, error)] of those that have none).

    ``stream`` yields ``(record, logits (K,) or None, error)`` with
    ``record.label`` one of ``labels`` (the model's classes, in output order).
    The Metrics are None when no record has logits (nothing could be read).
    """
    index = {label: i for i, label in enumerate(labels)}
    rows, targets, failures = [], [], []
    for record, logits, error in stream:
        if logits is None:
            failures.append((record, error))
            continue
        if record.label not in index:
            raise UserError(f"{record.path}: class {record.label!r} is not among the model's classes"
                            f" ({listing(labels)})")
        rows.append(logits)
        targets.append(index[record.label])
    if not rows:
        return None, failures
    return compute_metrics(np.stack(rows), np.array(targets), labels), failures


def event_metrics(scored: Iterable[tuple[Record, np.ndarray]], labels: list[str], how: str = "mean",
                  source: str = "data") -> EventMetrics | None:
    """Metrics of the events of ``scored`` ``(record, logits (K,))`` frames, an event being the frames that
    share ``record.group`` (a frame without one is an event of its own).  Each event's probabilities are
    aggregated by ``how``; its true label is the most frequent of its frames'.  None when nothing is scored."""
    index = {label: i for i, label in enumerate(labels)}
    events: dict[str, list[tuple[Record, np.ndarray]]] = {}
    for k, (record, logits) in enumerate(scored):
        key = record.group if record.group is not None else f"\0{k}"
        events.setdefault(key, []).append((record, logits))
    if not events:
        return None
    rows, targets = [], []
    for frames in events.values():
        probs = softmax(np.stack([logits for _, logits in frames]).astype(np.float64), dim=1)
        # log-probabilities as logits: softmax maps them back to the aggregated distribution
        rows.append(np.log(np.maximum(aggregate_probs(probs, how), np.finfo(np.float64).tiny)))
        targets.append(index[event_label([record.label for record, _ in frames])])
    sizes = [len(frames) for frames in events.values()]
    return EventMetrics(compute_metrics(np.stack(rows), np.array(targets), labels), how, source,
                        frames=sum(sizes), max_frames=max(sizes))


def write_metrics(metrics: Metrics, out_dir: str | Path, prefix: str = "eval") -> dict[str, Path]:
    """eval.json, confusion_matrix.csv and .png in ``out_dir``."""
    if isinstance(metrics, LabelSetMetrics):  # multi-label: no K x K confusion matrix
        return write_label_set_metrics(metrics, out_dir, prefix)
    if isinstance(metrics, OutputMetrics):  # multi-output: one matrix per head
        return write_output_metrics(metrics, out_dir, prefix)
    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in metrics_files(prefix).items()}
    write_json(paths["json"], metrics.to_dict())
    atomic_write(paths["confusion_csv"], metrics.confusion_csv())
    plot_confusion(metrics.confusion, metrics.labels, paths["confusion_png"])
    return paths


# --------------------------------------------------------------------------- multi-label (label sets)


@dataclass
class LabelSetMetrics:
    """Metrics of a multi-label model: a sigmoid per label, a label predicted when its probability
    reaches its threshold.

    ``mean_average_precision`` (mAP) is threshold-free: the mean over labels with a positive of
    scikit-learn's ``average_precision_score``.  Precision, recall, F1 and the subset accuracy (the
    share of images whose predicted set is exactly the true set) are taken at ``thresholds``.
    ``scores`` / ``truth`` keep the arrays, so thresholds can be tuned and the metrics redone
    (:meth:`at`)."""

    accuracy: float                  # subset accuracy (exact set match)
    mean_average_precision: float
    macro_f1: float
    micro_f1: float
    loss: float                      # binary cross-entropy, mean over N x K
    per_label: list[dict]            # label, average_precision, precision, recall, f1, support, threshold
    counts: np.ndarray               # (K, 4): tn, fp, fn, tp per label
    labels: list[str]
    thresholds: list[float]
    n: int
    scores: np.ndarray | None = None  # (N, K) logits
    truth: np.ndarray | None = None   # (N, K) 0/1

    @property
    def per_class(self) -> list[dict]:
        return self.per_label

    def at(self, thresholds) -> "LabelSetMetrics":
        """The same predictions scored at other thresholds (a sequence in label order)."""
        return compute_label_set_metrics(self.scores, self.truth, self.labels, thresholds)

    def to_dict(self) -> dict:
        return {"task": "multilabel", "subset_accuracy": self.accuracy, "mAP": self.mean_average_precision,
                "macro_f1": self.macro_f1, "micro_f1": self.micro_f1, "loss": self.loss, "n": self.n,
                "per_label": self.per_label, "labels": self.labels}

    def counts_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["label", "tn", "fp", "fn", "tp", "threshold"])
        for label, row, t in zip(self.labels, self.counts.tolist(), self.thresholds):
            writer.writerow([label, *row, f"{t:.6g}"])
        return out.getvalue()

    def to_text(self) -> str:
        lines = [f"subset accuracy    {self.accuracy:.4f}  (n={self.n}; the whole label set right)",
                 f"mAP                {self.mean_average_precision:.4f}",
                 f"macro / micro F1   {self.macro_f1:.4f} / {self.micro_f1:.4f}",
                 f"loss (BCE)         {self.loss:.4f}", ""]
        width = max(8, *(len(label) for label in self.labels))
        lines.append(f"{'label':<{width}}  AP      precision  recall     f1  support  threshold")
        for row in self.per_label:
            ap = "   -  " if row["average_precision"] is None else f"{row['average_precision']:.3f} "
            lines.append(f"{row['label']:<{width}}  {ap}  {row['precision']:9.3f}  {row['recall']:6.3f}"
                         f"  {row['f1']:5.3f}  {row['support']:7d}  {row['threshold']:9.4f}")
        return "\n".join(lines)


def compute_label_set_metrics(logits: np.ndarray, truth: np.ndarray, labels: list[str],
                              thresholds=None) -> LabelSetMetrics:
    """Multi-label metrics from logits (N, K) and a 0/1 indicator matrix (N, K); ``thresholds``: one
    probability per label (default 0.5 each, i.e. logit 0)."""
    from sklearn.metrics import (accuracy_score, average_precision_score, f1_score,
                                 multilabel_confusion_matrix, precision_recall_fscore_support)

    from ..softmax import binary_cross_entropy_with_logits, sigmoid

    logits = np.asarray(logits, dtype=np.float64).reshape(len(truth), len(labels))
    truth = (np.asarray(truth, dtype=np.float64) > 0.5).astype(np.int64)
    k = len(labels)
    t = np.full(k, 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    probs = sigmoid(logits)
    pred = (probs >= t).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(truth, pred, average=None,
                                                                     labels=list(range(k)), zero_division=0)
    ap = [float(average_precision_score(truth[:, j], probs[:, j])) if truth[:, j].any() else None
          for j in range(k)]
    scored = [a for a in ap if a is not None]
    counts = multilabel_confusion_matrix(truth, pred, labels=list(range(k))).reshape(k, 4)
    per_label = [{"label": labels[j], "average_precision": ap[j], "precision": float(precision[j]),
                  "recall": float(recall[j]), "f1": float(f1[j]), "support": int(support[j]),
                  "threshold": float(t[j])} for j in range(k)]
    n = len(truth)
    return LabelSetMetrics(
        accuracy=float(accuracy_score(truth, pred)) if n else float("nan"),
        mean_average_precision=float(np.mean(scored)) if scored else float("nan"),
        macro_f1=float(f1_score(truth, pred, average="macro", zero_division=0)),
        micro_f1=float(f1_score(truth, pred, average="micro", zero_division=0)),
        loss=float(binary_cross_entropy_with_logits(logits, truth)) if n else float("nan"),
        per_label=per_label, counts=counts, labels=list(labels), thresholds=[float(x) for x in t], n=n,
        scores=logits, truth=truth)


def write_label_set_metrics(metrics: LabelSetMetrics, out_dir: str | Path, prefix: str = "eval") -> dict[str, Path]:
    """``<prefix>.json`` and, in place of a confusion matrix, each label's tn/fp/fn/tp (CSV)."""
    out_dir = Path(out_dir)
    names = metrics_files(prefix)
    paths = {"json": out_dir / names["json"], "confusion_csv": out_dir / names["confusion_csv"],
             "confusion_png": None}
    write_json(paths["json"], metrics.to_dict())
    atomic_write(paths["confusion_csv"], metrics.counts_csv())
    return paths


# --------------------------------------------------------------------------- multi-output (several heads)


@dataclass
class OutputMetrics:
    """Metrics of a multi-output model: each head's own :class:`Metrics` on the images whose column has a
    value (an empty cell leaves the image out of that head only).  The first head is the primary one:
    ``accuracy``, ``balanced_accuracy`` and ``per_class`` are its figures (they pick the best epoch)."""

    outputs: dict[str, Metrics | None]   # column -> its metrics (None: no image has a value there)
    labels: list[str]                    # the flat labels (``column:value``)
    n: int
    loss: float                          # the sum over heads of each head's mean NLL

    @property
    def primary(self) -> Metrics | None:
        return next(iter(self.outputs.values()))

    @property
    def accuracy(self) -> float:
        return self.primary.accuracy if self.primary is not None else float("nan")

    @property
    def balanced_accuracy(self) -> float:
        return self.primary.balanced_accuracy if self.primary is not None else float("nan")

    @property
    def per_class(self) -> list[dict]:
        return self.primary.per_class if self.primary is not None else []

    def to_dict(self) -> dict:
        return {"task": "multioutput", "primary": next(iter(self.outputs)), "accuracy": self.accuracy,
                "balanced_accuracy": self.balanced_accuracy, "loss": self.loss, "n": self.n,
                "outputs": {name: (m.to_dict() if m is not None else {"n": 0}) for name, m in self.outputs.items()}}

    def confusion_csv(self) -> str:
        """Every head's confusion matrix, one block each under a row naming the head."""
        blocks = [f"output,{name}\n" + (m.confusion_csv() if m is not None else "")
                  for name, m in self.outputs.items()]
        return "\n".join(blocks)

    def to_text(self) -> str:
        lines = [f"outputs: {', '.join(self.outputs)} (the first is primary); n={self.n},"
                 f" loss {self.loss:.4f} (the sum of each head's NLL)"]
        for name, m in self.outputs.items():
            lines += ["", f"== {name}" + (" (no labelled image)" if m is None else ""), *([m.to_text()] if m else [])]
        return "\n".join(lines)


def compute_output_metrics(logits: np.ndarray, targets: np.ndarray, labels: list[str]) -> OutputMetrics:
    """Per-head metrics from logits (N, sum of K) and targets (N, heads): each head's class index, -1 where
    the image has no value in that column."""
    from ..data.records import heads_of

    logits = np.asarray(logits, dtype=np.float64)
    heads = heads_of(labels)
    targets = np.asarray(targets, dtype=np.int64).reshape(len(logits), len(heads))
    out: dict[str, Metrics | None] = {}
    for h, (name, names, start) in enumerate(heads):
        present = targets[:, h] >= 0
        out[name] = (compute_metrics(logits[present, start:start + len(names)], targets[present, h], names)
                     if present.any() else None)
    return OutputMetrics(out, list(labels), len(logits), float(sum(m.loss for m in out.values() if m is not None)))


def write_output_metrics(metrics: OutputMetrics, out_dir: str | Path, prefix: str = "eval") -> dict[str, Path]:
    """``<prefix>.json`` (each head under ``outputs``), every head's confusion matrix in the CSV, the
    primary head's drawn in the PNG."""
    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in metrics_files(prefix).items()}
    write_json(paths["json"], metrics.to_dict())
    atomic_write(paths["confusion_csv"], metrics.confusion_csv())
    if metrics.primary is not None:
        plot_confusion(metrics.primary.confusion, metrics.primary.labels, paths["confusion_png"])
    else:
        paths["confusion_png"] = None
    return paths
