"""The Python API behind the command line (see the package docstring)."""

from __future__ import annotations

import logging
from pathlib import Path


from tqdm.auto import tqdm

from .data.sources import load_dataset
from .errors import UserError
from .metrics import metrics_of_stream, write_metrics
from .predict import load
from .train import train  # noqa: F401 - the API's train (imgcls.train is the same, callable)

log = logging.getLogger("imgcls")


def evaluate(run: str | Path, data: str | Path, split: str | None = None, backend: str = "auto",
             batch_size: int | None = None, write: bool = True, progress: bool = False):
    """Metrics of a trained model on labelled data (its ``test`` split, else
    ``val``, else everything).  Writes ``eval.json`` and the confusion matrix
    (CSV, PNG) into the run directory when ``run`` is one (:func:`save_evaluation`)."""
    predictor = load(run, backend=backend)
    dataset = load_dataset(data)
    if split is None:
        split = next((s for s in ("test", "val", "all") if s in dataset.splits), "train")
    if split not in dataset.splits:
        raise UserError(f"{data} has no {split!r} split; it has {', '.join(dataset.splits)}")
    records = dataset.splits[split]
    labels = predictor.labels
    unknown = sorted({r.label for r in records} - set(labels))
    if unknown:
        raise UserError(f"{data}: class(es) {', '.join(unknown)} are not among the model's classes ({', '.join(labels)})")
    stream = predictor.iter_logits(records, batch_size=batch_size)
    metrics, failed = metrics_of_stream(tqdm(stream, total=len(records), disable=not progress, desc="evaluate"),
                                        labels)
    if metrics is None:
        raise UserError(f"{data}: none of the {len(records)} images could be read")
    for record, reason in failed:
        log.warning("not evaluated (unreadable): %s: %s", record.path, reason)
    if write:
        save_evaluation(metrics, run)
    return metrics


def save_evaluation(metrics, run: str | Path) -> Path | None:
    """``eval.json`` and the confusion matrix into a run directory; a run that cannot be written
    (read-only, a colleague's) only gets a warning: the metrics are computed and returned anyway."""
    if not Path(run).is_dir():
        return None
    try:
        return write_metrics(metrics, run, prefix="eval")["confusion_png"]
    except OSError as err:
        log.warning("metrics not saved in %s (%s)", run, err.strerror or err)
        return None


def summary(model: str, input_size: int | None = None, depth: int | None = None, num_classes: int = 1000,
            include_bias: bool = True):
    """Per-layer cost table (activation memory, parameters, FLOPs) of a registered model."""
    # torch and the model zoo: only this command needs them, and api must import without torch
    from .models.catalog import build_on_meta
    from .models.cost import layer_table
    from .models.registry import create_model, default_preprocess

    size = input_size or default_preprocess(model).input_size
    try:  # meta tensors: shapes and counts without allocating or initializing weights
        return layer_table(build_on_meta(model, num_classes, size), (3, size, size), depth, include_bias)
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel
        return layer_table(create_model(model, num_classes, size), (3, size, size), depth, include_bias)
