"""What a model predicts: the task table.

``multiclass`` (the default)
    exactly one of K classes: K logits, softmax, cross-entropy.
``binary-sigmoid``
    two classes as one logit ``z``: ``P(second label) = sigmoid(z)``, binary
    cross-entropy.  A softmax over ``[0, z]`` is the same model, so its
    probabilities, metrics and prediction rows are the multiclass ones of
    those two logits.
``multilabel``
    any subset of K labels (several species in one frame): K logits, a sigmoid
    per label, binary cross-entropy.  A label is predicted when its probability
    reaches its threshold, tuned on val for the highest F1 and stored in the
    run's ``thresholds.json`` (0.5 when none is stored); the best epoch is the
    one with the highest mAP.

Each task is one row of :data:`TASKS` (outputs, probabilities, metrics,
prediction rows); the torch half (loss, training hits) is
:mod:`imgcls.train.objectives`, keyed by the same names.  The task travels
with the weights: ``task`` / ``label_sep`` in the ``model.safetensors``
metadata (:func:`meta`) and ``imgcls.task`` / ``imgcls.label_sep`` in the ONNX
metadata (:func:`onnx_props`), so a model file alone predicts with the right
probabilities and ``imgcls eval`` scores it with the right metrics.

Multi-label data is a CSV whose label column joins the labels of a row with
``--label-sep`` (``deer;fox``); :func:`parse_label_sets` fills
``Record.labels``.  NumPy only at import: prediction uses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .errors import UserError
from .metrics import compute_label_set_metrics, compute_metrics, metrics_of_stream
from .softmax import sigmoid, softmax

DEFAULT = "multiclass"
DEFAULT_SEP = ";"
NAMES = ("multiclass", "binary-sigmoid", "multilabel")


# --------------------------------------------------------------------------- the pieces of each task


def _two_logits(z: np.ndarray) -> np.ndarray:
    """One binary logit per row (N, 1) -> the equivalent softmax logits ``[0, z]`` (N, 2)."""
    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)[:, :1]
    return np.concatenate([np.zeros_like(z), z], axis=1)


def class_summary(split: str, metrics) -> dict:
    """What summary.json keeps of a split's final metrics: accuracy next to balanced accuracy and
    per-class recall (a rare class's misses do not show in accuracy)."""
    return {f"{split}_accuracy": metrics.accuracy, f"{split}_balanced_accuracy": metrics.balanced_accuracy,
            f"{split}_recall": {row["label"]: round(row["recall"], 4) for row in metrics.per_class}}


def _label_set_summary(split: str, metrics) -> dict:
    return {f"{split}_subset_accuracy": metrics.accuracy, f"{split}_mAP": metrics.mean_average_precision,
            f"{split}_macro_f1": metrics.macro_f1,
            f"{split}_f1": {row["label"]: round(row["f1"], 4) for row in metrics.per_label}}


def _describe_classes(metrics) -> str:
    return (f"accuracy {metrics.accuracy:.4f}, balanced accuracy {metrics.balanced_accuracy:.4f}; recall per class: "
            + ", ".join(f"{row['label']} {row['recall']:.2f}" for row in metrics.per_class))


def _describe_label_sets(metrics) -> str:
    return (f"mAP {metrics.mean_average_precision:.4f}, subset accuracy {metrics.accuracy:.4f}, macro F1"
            f" {metrics.macro_f1:.4f}; F1 per label: "
            + ", ".join(f"{row['label']} {row['f1']:.2f}" for row in metrics.per_label))


def _label_set_stream_metrics(stream, labels: list[str], thresholds=None):
    """(LabelSetMetrics of the rows that have logits, [(record, error)] of those that have none)."""
    index = {label: i for i, label in enumerate(labels)}
    rows, truth, failures = [], [], []
    for record, logits, error in stream:
        if logits is None:
            failures.append((record, error))
            continue
        rows.append(logits)
        truth.append(multi_hot(record, index))
    if not rows:
        return None, failures
    return compute_label_set_metrics(np.stack(rows), np.stack(truth), labels, threshold_list(thresholds, labels)), \
        failures


def _binary_stream_metrics(stream, labels, thresholds=None):
    return metrics_of_stream(((r, None if z is None else _two_logits(np.asarray(z)[None])[0], e)
                              for r, z, e in stream), labels)


@dataclass(frozen=True)
class Task:
    name: str
    outputs: Callable[[int], int]                          # number of labels -> logits per image
    probs: Callable[[np.ndarray], np.ndarray]              # logits (N, outputs) -> probabilities (N, K)
    metrics: Callable                                      # (logits, targets, labels, thresholds) -> metrics
    stream_metrics: Callable                               # (stream, labels, thresholds) -> (metrics, failures)
    epoch_columns: Callable[[object], dict]                # val metrics -> metrics.csv columns
    summary: Callable[[str, object], dict]                 # (split, metrics) -> summary.json entries
    describe: Callable[[object], str]                      # metrics -> one log line
    selection: str | None = None                           # metric picking the best epoch (None: the balance's)
    label_sets: bool = False                               # targets, rows and thresholds are per label

    def probabilities(self, logits) -> np.ndarray:
        return self.probs(np.asarray(logits, dtype=np.float64))


TASKS: dict[str, Task] = {
    "multiclass": Task(
        "multiclass", outputs=lambda k: k, probs=softmax,
        metrics=lambda z, y, labels, thresholds=None: compute_metrics(z, y, labels),
        stream_metrics=lambda stream, labels, thresholds=None: metrics_of_stream(stream, labels),
        epoch_columns=lambda m: {"val_loss": m.loss, "val_accuracy": m.accuracy,
                                 "val_balanced_accuracy": m.balanced_accuracy},
        summary=class_summary, describe=_describe_classes),
    "binary-sigmoid": Task(
        "binary-sigmoid", outputs=lambda k: 1, probs=lambda z: softmax(_two_logits(z)),
        metrics=lambda z, y, labels, thresholds=None: compute_metrics(_two_logits(z), y, labels),
        stream_metrics=_binary_stream_metrics,
        epoch_columns=lambda m: {"val_loss": m.loss, "val_accuracy": m.accuracy,
                                 "val_balanced_accuracy": m.balanced_accuracy},
        summary=class_summary, describe=_describe_classes),
    "multilabel": Task(
        "multilabel", outputs=lambda k: k, probs=sigmoid,
        metrics=lambda z, y, labels, thresholds=None: compute_label_set_metrics(z, y, labels, thresholds),
        stream_metrics=_label_set_stream_metrics,
        epoch_columns=lambda m: {"val_loss": m.loss, "val_accuracy": m.accuracy, "val_map": m.mean_average_precision},
        summary=_label_set_summary, describe=_describe_label_sets, selection="mean_average_precision",
        label_sets=True),
}
assert tuple(TASKS) == NAMES


# --------------------------------------------------------------------------- the task of a run and of a model file


def _parsed(record, sep: str):
    """The record with ``labels`` parsed from its label text, which becomes those labels joined by ``sep``
    (``"deer; fox;"`` -> ``"deer;fox"``, a lone label its own name)."""
    labels = tuple(dict.fromkeys(p.strip() for p in (record.label or "").split(sep) if p.strip()))
    return replace(record, label=sep.join(labels), labels=labels)


def parse_label_sets(splits: dict[str, list], sep: str | None, source) -> dict[str, list]:
    """Records with ``labels`` parsed from their label text split at ``sep`` (None: unchanged)."""
    if sep is None:
        return splits
    if not sep:
        raise UserError("--label-sep must be at least one character (e.g. ';')")
    if Path(source).is_dir():
        raise UserError(f"--label-sep needs a CSV with the labels of each image joined in one column; {source} is"
                        " a folder of class folders (one label per image)")
    out = {}
    for name, records in splits.items():
        parsed = []
        for r in records:
            parsed.append(_parsed(r, sep))
            if not parsed[-1].labels:
                raise UserError(f"{source}: {r.path} has no label between the separators ({r.label!r});"
                                " give each row at least one label")
        out[name] = parsed
    return out


def resolve(name: str, sep: str | None, records: Iterable, n_classes: int) -> str:
    """``--task`` resolved: ``auto`` is multilabel when ``--label-sep`` is given and some record has
    several labels, else multiclass; the choice is checked against the data."""
    several = any(len(r.label_set) > 1 for r in records)
    if name == "auto":
        return "multilabel" if sep is not None and several else DEFAULT
    if name not in TASKS:
        raise UserError(f"unknown --task {name!r}; use auto, {', '.join(TASKS)}")
    if several and name != "multilabel":
        raise UserError(f"--task {name}: some images have several labels (--label-sep {sep!r}); use --task"
                        " multilabel (or auto)")
    if name == "binary-sigmoid" and n_classes != 2:
        raise UserError(f"--task binary-sigmoid needs exactly two classes, the data has {n_classes};"
                        " use --task multiclass")
    return name


def meta(name: str, sep: str | None = None) -> dict:
    """The task's entries of the model metadata (``model.safetensors``; ONNX through :func:`onnx_props`)."""
    return {"task": name, **({"label_sep": sep or DEFAULT_SEP} if TASKS[name].label_sets else {})}


def of(metadata: dict | None) -> Task:
    """The task a model's metadata names (files without one are multiclass); a UserError for unknown ones."""
    name = (metadata or {}).get("task") or DEFAULT
    if name not in TASKS:
        raise UserError(f"the model's metadata names task {name!r}, which this imgcls does not know"
                        f" ({', '.join(TASKS)}); update imgcls")
    return TASKS[name]


def sep_of(metadata: dict | None) -> str:
    return (metadata or {}).get("label_sep") or DEFAULT_SEP


META_TASK = "imgcls.task"
META_LABEL_SEP = "imgcls.label_sep"
META_THRESHOLDS = "imgcls.thresholds"


def onnx_props(metadata: dict | None) -> dict[str, str]:
    """``imgcls.task`` (and ``imgcls.label_sep``, ``imgcls.thresholds`` when stored) for an ONNX file's
    metadata_props."""
    task = of(metadata)
    thresholds = thresholds_of(metadata)
    return {META_TASK: task.name, **({META_LABEL_SEP: sep_of(metadata)} if task.label_sets else {}),
            **(thresholds_props(thresholds) if thresholds else {})}


def from_onnx_props(props: dict[str, str]) -> dict:
    """The inverse of :func:`onnx_props` and :func:`thresholds_props`: ``{task, label_sep, thresholds}``
    (older files: multiclass, no thresholds)."""
    try:
        thresholds = json.loads(props[META_THRESHOLDS]) if META_THRESHOLDS in props else None
    except json.JSONDecodeError:
        raise UserError(f"the {META_THRESHOLDS} metadata is not valid JSON; export the model again") from None
    return {"task": props.get(META_TASK) or DEFAULT, "label_sep": props.get(META_LABEL_SEP), "thresholds": thresholds}


def thresholds_props(thresholds: dict[str, float]) -> dict[str, str]:
    """A label-set model's tuned thresholds as ONNX metadata, so the file alone predicts label sets."""
    return {META_THRESHOLDS: json.dumps({k: float(v) for k, v in thresholds.items()}, ensure_ascii=False)}


def thresholds_of(metadata: dict | None) -> dict[str, float]:
    """The thresholds a model file carries (label sets, tuned in training); {} when none."""
    stored = (metadata or {}).get("thresholds") or {}
    if not isinstance(stored, dict):
        raise UserError("the model's thresholds metadata is not a mapping of label -> threshold; export it again")
    return {str(k): float(v) for k, v in stored.items()}


def output_count(metadata: dict | None, n_labels: int) -> int:
    """Logits per image of a model with this metadata and ``n_labels`` labels."""
    return of(metadata).outputs(n_labels)


# --------------------------------------------------------------------------- targets


def multi_hot(record, index: dict[str, int]) -> np.ndarray:
    """The 0/1 vector of a record's labels; a UserError naming a label the model does not have."""
    out = np.zeros(len(index), np.float32)
    for label in record.label_set:
        if label not in index:
            raise UserError(f"{record.path}: label {label!r} is not among the model's labels ({', '.join(index)})")
        out[index[label]] = 1.0
    return out


def training_index(task: Task, records: Iterable, classes: list[str]) -> dict:
    """What ``ImageDataset`` maps a record's ``label`` text to: the class index, or for label sets the
    multi-hot vector of that text's labels."""
    index = {c: i for i, c in enumerate(classes)}
    if not task.label_sets:
        return index
    return {r.label: multi_hot(r, index) for r in records}


def with_label_sets(records: list, metadata: dict | None) -> list:
    """Labelled records read without a separator (``imgcls eval``) parsed with the model's own."""
    if not of(metadata).label_sets:
        return records
    sep = sep_of(metadata)
    return [r if r.labels is not None else _parsed(r, sep) for r in records]


def threshold_list(thresholds: dict | None, labels: list[str], default: float = 0.5) -> list[float]:
    return [float((thresholds or {}).get(label, default)) for label in labels]


def settle_thresholds(task: Task, metrics, run_dir: str | Path):
    """After the val metrics of training: a label-set task tunes each label's threshold for the highest
    F1 on val, stores them in ``thresholds.json`` and returns the metrics at them and the thresholds;
    other tasks return the metrics as they are and no thresholds."""
    if not task.label_sets or metrics is None:
        return metrics, None
    from .thresholds import best_f1_threshold, store_thresholds

    probs = sigmoid(metrics.scores)
    chosen = {label: best_f1_threshold(probs[:, j], metrics.truth[:, j]) for j, label in enumerate(metrics.labels)}
    for _, detail in chosen.values():
        detail["tuned_on"] = "val"
    store_thresholds(run_dir, chosen, metrics.labels)
    thresholds = {label: t for label, (t, _) in chosen.items()}
    return metrics.at(threshold_list(thresholds, metrics.labels)), thresholds


# --------------------------------------------------------------------------- prediction rows (label sets)


def label_set_columns(labels: list[str]) -> list[str]:
    return ["path", *(f"prob_{label}" for label in labels), "labels", "error"]


def is_label_set_header(fields: list[str]) -> bool:
    return (len(fields) >= 4 and fields[0] == "path" and fields[-2:] == ["labels", "error"]
            and all(f.startswith("prob_") for f in fields[1:-2]))


def label_set_row(record, probs: np.ndarray | None, error: str, labels: list[str], thresholds: dict | None,
                  sep: str) -> dict:
    """A prediction row: each label's probability and the labels that reach their thresholds (unrounded)."""
    row = {"path": str(record.path)}
    limits = threshold_list(thresholds, labels)
    for j, label in enumerate(labels):
        row[f"prob_{label}"] = "" if probs is None else round(float(probs[j]), 6)
    row["labels"] = "" if probs is None else sep.join(
        label for j, label in enumerate(labels) if probs[j] >= limits[j])
    row["error"] = error
    return row
