"""Evaluation metrics from logits and labels (scikit-learn does the counting).

:func:`compute_metrics` takes arrays; :func:`metrics_of_stream` takes the
``(record, logits or None, error)`` stream of :func:`imgcls.engines.stream_logits`
(or ``Predictor.iter_logits``), so evaluation and the int8 gate score logits
one way.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from .errors import UserError
from .report import plot_confusion
from .rundir import atomic_write, metrics_files, write_json
from .softmax import log_softmax

if TYPE_CHECKING:
    from .data.records import Record


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

    def to_dict(self) -> dict:
        data = {"accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy, "loss": self.loss,
                "n": self.n, "per_class": self.per_class, "confusion_matrix": self.confusion.tolist(),
                "labels": self.labels}
        if self.top5_accuracy is not None:
            data["top5_accuracy"] = self.top5_accuracy
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
        return "\n".join(lines)


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
                            f" ({', '.join(labels)})")
        rows.append(logits)
        targets.append(index[record.label])
    if not rows:
        return None, failures
    return compute_metrics(np.stack(rows), np.array(targets), labels), failures


def write_metrics(metrics: Metrics, out_dir: str | Path, prefix: str = "eval") -> dict[str, Path]:
    """eval.json, confusion_matrix.csv and .png in ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in metrics_files(prefix).items()}
    write_json(paths["json"], metrics.to_dict())
    atomic_write(paths["confusion_csv"], metrics.confusion_csv())
    plot_confusion(metrics.confusion, metrics.labels, paths["confusion_png"])
    return paths
