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
``multioutput``
    several CSV label columns (``--label-column species,count,behaviour``),
    one softmax head each on one backbone: the logits are the heads' side by
    side (one output, N x the sum of their classes), the labels one flat list
    ``column:value`` in head order (:func:`imgcls.data.records.heads_of`).
    The loss is the sum of each head's cross-entropy times its weight
    (``--output-weights``), an empty cell leaving that head out for that image;
    metrics are per head, the first (primary) head's pick the best epoch.
    The heads (names, labels, weights) travel as ``outputs`` in the model
    metadata and ``imgcls.outputs`` in the ONNX file.

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

from .data.records import OUTPUT_SEP, heads_of, qualified
from .errors import UserError
from .evaluation.metrics import compute_label_set_metrics, compute_metrics, compute_output_metrics, metrics_of_stream
from .softmax import sigmoid, softmax

DEFAULT = "multiclass"
DEFAULT_SEP = ";"
NAMES = ("multiclass", "binary-sigmoid", "multilabel", "multioutput")


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


def _per_head_softmax(z: np.ndarray, labels: list[str]) -> np.ndarray:
    """A multi-output model's probabilities: a softmax over each head's logits, side by side."""
    out = np.empty_like(z)
    for _, names, start in heads_of(labels):
        out[:, start:start + len(names)] = softmax(z[:, start:start + len(names)])
    return out


def _output_stream_metrics(stream, labels: list[str], thresholds=None):
    """(OutputMetrics of the rows that have logits, [(record, error)] of those that have none)."""
    rows, targets, failures = [], [], []
    index = output_index(labels)
    for record, logits, error in stream:
        if logits is None:
            failures.append((record, error))
            continue
        rows.append(logits)
        targets.append(output_targets(record, index))
    if not rows:
        return None, failures
    return compute_output_metrics(np.stack(rows), np.stack(targets), labels), failures


def _output_summary(split: str, metrics) -> dict:
    """The primary head's entries as a multiclass run's, and every head's under ``<split>_outputs``."""
    return {**class_summary(split, metrics), f"{split}_outputs": {
        name: None if m is None else {"accuracy": m.accuracy, "balanced_accuracy": m.balanced_accuracy, "n": m.n,
                                      "recall": {row["label"]: round(row["recall"], 4) for row in m.per_class}}
        for name, m in metrics.outputs.items()}}


def _describe_outputs(metrics) -> str:
    return "; ".join(f"{name}: " + ("no labelled image" if m is None else
                                    f"accuracy {m.accuracy:.4f}, balanced accuracy {m.balanced_accuracy:.4f}")
                     for name, m in metrics.outputs.items())


def _binary_stream_metrics(stream, labels, thresholds=None):
    return metrics_of_stream(((r, None if z is None else _two_logits(np.asarray(z)[None])[0], e)
                              for r, z, e in stream), labels)


@dataclass(frozen=True)
class Task:
    name: str
    outputs: Callable[[int], int]                          # number of labels -> logits per image
    probs: Callable[[np.ndarray, list], np.ndarray]        # (logits (N, outputs), labels) -> probabilities (N, K)
    metrics: Callable                                      # (logits, targets, labels, thresholds) -> metrics
    stream_metrics: Callable                               # (stream, labels, thresholds) -> (metrics, failures)
    epoch_columns: Callable[[object], dict]                # val metrics -> metrics.csv columns
    summary: Callable[[str, object], dict]                 # (split, metrics) -> summary.json entries
    describe: Callable[[object], str]                      # metrics -> one log line
    selection: str | None = None                           # metric picking the best epoch (None: the balance's)
    label_sets: bool = False                               # targets, rows and thresholds are per label
    heads: bool = False                                    # several outputs: targets and rows per head
    # prediction rows of their own (None: the class rows of predict.Predictor._row); csv/jsonl per image only
    row: Callable | None = None                            # (record, probs, error, labels, thresholds, sep) -> row
    columns: Callable[[list], list] | None = None          # labels -> the row's columns

    def probabilities(self, logits, labels: list[str] | None = None) -> np.ndarray:
        return self.probs(np.asarray(logits, dtype=np.float64), labels)


TASKS: dict[str, Task] = {
    "multiclass": Task(
        "multiclass", outputs=lambda k: k, probs=lambda z, labels=None: softmax(z),
        metrics=lambda z, y, labels, thresholds=None: compute_metrics(z, y, labels),
        stream_metrics=lambda stream, labels, thresholds=None: metrics_of_stream(stream, labels),
        epoch_columns=lambda m: {"val_loss": m.loss, "val_accuracy": m.accuracy,
                                 "val_balanced_accuracy": m.balanced_accuracy},
        summary=class_summary, describe=_describe_classes),
    "binary-sigmoid": Task(
        "binary-sigmoid", outputs=lambda k: 1, probs=lambda z, labels=None: softmax(_two_logits(z)),
        metrics=lambda z, y, labels, thresholds=None: compute_metrics(_two_logits(z), y, labels),
        stream_metrics=_binary_stream_metrics,
        epoch_columns=lambda m: {"val_loss": m.loss, "val_accuracy": m.accuracy,
                                 "val_balanced_accuracy": m.balanced_accuracy},
        summary=class_summary, describe=_describe_classes),
    "multilabel": Task(
        "multilabel", outputs=lambda k: k, probs=lambda z, labels=None: sigmoid(z),
        metrics=lambda z, y, labels, thresholds=None: compute_label_set_metrics(z, y, labels, thresholds),
        stream_metrics=_label_set_stream_metrics,
        epoch_columns=lambda m: {"val_loss": m.loss, "val_accuracy": m.accuracy, "val_map": m.mean_average_precision},
        summary=_label_set_summary, describe=_describe_label_sets, selection="mean_average_precision",
        label_sets=True, row=lambda *a: label_set_row(*a), columns=lambda labels: label_set_columns(labels)),
    "multioutput": Task(
        "multioutput", outputs=lambda k: k, probs=_per_head_softmax,
        metrics=lambda z, y, labels, thresholds=None: compute_output_metrics(z, y, labels),
        stream_metrics=_output_stream_metrics,
        epoch_columns=lambda m: {"val_loss": m.loss, "val_accuracy": m.accuracy,
                                 "val_balanced_accuracy": m.balanced_accuracy},
        summary=_output_summary, describe=_describe_outputs, heads=True,
        row=lambda *a: output_row(*a), columns=lambda labels: output_columns(labels)),
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
    """``--task`` resolved: ``auto`` is multioutput when the records have several label columns,
    multilabel when ``--label-sep`` is given and some record has several labels, else multiclass; the
    choice is checked against the data."""
    records = list(records)
    if any(r.outputs is not None for r in records):
        if name not in ("auto", "multioutput"):
            raise UserError(f"--task {name}: several --label-column columns make a multi-output model; use --task"
                            " multioutput (or auto), or name one label column")
        if sep is not None:
            raise UserError("--label-sep with several --label-column columns: each output column holds one class"
                            " per image; leave out --label-sep")
        return "multioutput"
    if name == "multioutput":
        raise UserError("--task multioutput needs several label columns of a CSV: --label-column species,count,...")
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


def meta(name: str, sep: str | None = None, outputs: list[dict] | None = None) -> dict:
    """The task's entries of the model metadata (``model.safetensors``; ONNX through :func:`onnx_props`);
    ``outputs``: a multi-output model's heads (:func:`output_heads`)."""
    return {"task": name, **({"label_sep": sep or DEFAULT_SEP} if TASKS[name].label_sets else {}),
            **({"outputs": outputs} if TASKS[name].heads else {})}


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
META_OUTPUTS = "imgcls.outputs"


def onnx_props(metadata: dict | None) -> dict[str, str]:
    """``imgcls.task`` (and ``imgcls.label_sep``, ``imgcls.thresholds`` when stored) for an ONNX file's
    metadata_props."""
    task = of(metadata)
    thresholds = thresholds_of(metadata)
    outputs = (metadata or {}).get("outputs")
    return {META_TASK: task.name, **({META_LABEL_SEP: sep_of(metadata)} if task.label_sets else {}),
            **(thresholds_props(thresholds) if thresholds else {}),
            **({META_OUTPUTS: json.dumps(outputs, ensure_ascii=False)} if task.heads and outputs else {})}


def from_onnx_props(props: dict[str, str]) -> dict:
    """The inverse of :func:`onnx_props` and :func:`thresholds_props`: ``{task, label_sep, thresholds}``
    (older files: multiclass, no thresholds)."""
    found = {}
    for key in (META_THRESHOLDS, META_OUTPUTS):
        try:
            found[key] = json.loads(props[key]) if key in props else None
        except json.JSONDecodeError:
            raise UserError(f"the {key} metadata is not valid JSON; export the model again") from None
    return {"task": props.get(META_TASK) or DEFAULT, "label_sep": props.get(META_LABEL_SEP),
            "thresholds": found[META_THRESHOLDS], "outputs": found[META_OUTPUTS]}


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


def training_index(task: Task, records: Iterable, classes: list[str]):
    """What ``ImageDataset`` maps a record's ``label`` text to: the class index, or for label sets the
    multi-hot vector of that text's labels; for heads a function of the record (:func:`output_targets`)."""
    if task.heads:
        index = output_index(classes)
        return lambda record: output_targets(record, index)
    index = {c: i for i, c in enumerate(classes)}
    if not task.label_sets:
        return index
    return {r.label: multi_hot(r, index) for r in records}


# --------------------------------------------------------------------------- multi-output heads


def output_index(labels: list[str]) -> list[tuple[str, dict[str, int]]]:
    """A multi-output model's flat labels -> ``[(column, {value: class index within the head})]``."""
    return [(name, {value: i for i, value in enumerate(names)}) for name, names, _ in heads_of(labels)]


def output_targets(record, index: list[tuple[str, dict[str, int]]]) -> np.ndarray:
    """A record's class index per head, -1 where its column is empty (that head's loss and metrics leave the
    image out); a UserError for a value the head does not have or a record without these columns."""
    values = dict(record.outputs or ())
    missing = [name for name, _ in index if name not in values]
    if missing:
        raise UserError(f"{record.path}: no value for the output column(s) {', '.join(missing)}; the data needs the"
                        f" model's label columns ({', '.join(name for name, _ in index)})")
    out = np.full(len(index), -1, np.int64)
    for h, (name, classes) in enumerate(index):
        value = values[name]
        if value is None:
            continue
        if value not in classes:
            raise UserError(f"{record.path}: {name} {value!r} is not among the model's {name} classes"
                            f" ({', '.join(classes)})")
        out[h] = classes[value]
    return out


def output_classes(records: list) -> list[str]:
    """The flat labels of multi-output records: each column's values, sorted, in column order; a UserError
    for a column with fewer than two classes."""
    names = [name for name, _ in records[0].outputs]
    labels = []
    for name in names:
        values = sorted({value for r in records for n, value in r.outputs if n == name and value is not None})
        if len(values) < 2:
            raise UserError(f"output column {name!r} has {len(values)} class(es) ({', '.join(values) or 'none'}) in"
                            " the training data; a head needs at least two")
        labels += [qualified(name, v) for v in values]
    return labels


def parse_output_weights(text: str | None, names: list[str]) -> list[float]:
    """``--output-weights 1,0.5,0.5``: one loss weight >= 0 per output column, in order (default 1 each)."""
    if text is None:
        return [1.0] * len(names)
    try:
        weights = [float(x) for x in str(text).split(",")]
    except ValueError:
        weights = []
    if len(weights) != len(names) or not all(np.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise UserError(f"--output-weights {text!r}: give {len(names)} numbers >= 0 (not all 0) joined by commas,"
                        f" one per output column ({', '.join(names)})")
    return weights


def output_heads(labels: list[str], weights: list[float]) -> list[dict]:
    """The ``outputs`` metadata of a multi-output model: each head's name, class labels and loss weight."""
    return [{"name": name, "labels": names, "weight": float(w)}
            for (name, names, _), w in zip(heads_of(labels), weights)]


def output_columns(labels: list[str]) -> list[str]:
    """A multi-output prediction row: each head's class and its probability, then every class's probability."""
    heads = [col for name, _, _ in heads_of(labels) for col in (name, f"{name}_prob")]
    return ["path", *heads, *(f"prob_{label}" for label in labels), "error"]


def is_output_header(fields: list[str]) -> bool:
    labels = [f[len("prob_"):] for f in fields if f.startswith("prob_")]
    return bool(labels) and all(OUTPUT_SEP in label for label in labels) and fields == output_columns(labels)


def output_row(record, probs: np.ndarray | None, error: str, labels: list[str], thresholds=None, sep=None) -> dict:
    """A prediction row of a multi-output model: each head's most probable class and its probability."""
    row = {"path": str(record.path)}
    for name, names, start in heads_of(labels):
        if probs is None:
            row[name] = row[f"{name}_prob"] = ""
            continue
        j = int(np.argmax(probs[start:start + len(names)]))
        row[name], row[f"{name}_prob"] = names[j], round(float(probs[start + j]), 6)
    for j, label in enumerate(labels):
        row[f"prob_{label}"] = "" if probs is None else round(float(probs[j]), 6)
    row["error"] = error
    return row


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
    from .evaluation.thresholds import best_f1_threshold, store_thresholds

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
