"""The Python API behind the command line (see the package docstring)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .data.events import DEFAULT_GAP, group_events
from .data.records import heads_of
from .data.sources import load_dataset
from .errors import UserError, listing
from .evaluation.aggregate import check_aggregate
from .evaluation.metrics import event_metrics, write_metrics
from .evaluation.tta import with_tta
from .prediction.predict import load
from .progress import bar as progress_bar
from .tasks import TASKS, with_label_sets
from .train import train  # noqa: F401 - the API's train (imgcls.train is the same, callable)

log = logging.getLogger("imgcls")


def evaluate(run: str | Path, data: str | Path, split: str | None = None, backend: str = "auto",
             batch_size: int | None = None, write: bool = True, progress: bool = False, events: bool = False,
             aggregate: str = "mean", event_gap: float = DEFAULT_GAP, event_column: str | None = None,
             keep: list | None = None, precision: str = "auto", tta: str = "none"):
    """Metrics of a trained model on labelled data (its ``test`` split, else
    ``val``, else everything).  Writes ``eval.json`` and the confusion matrix
    (CSV, PNG) into the run directory when ``run`` is one (:func:`save_evaluation`).

    ``keep``: a list that receives the per-image predictions (:class:`imgcls.evaluation.html_report.Scored`, for the
    HTML report; its ``unreadable`` holds the files that could not be read).

    ``events``: score capture events too (``Metrics.events``): the data's events (a CSV
    ``event_column`` or ``group`` column, COCO sequences), else frames within ``event_gap`` seconds
    per camera by EXIF time; each event's frames aggregated by ``aggregate`` (``mean`` or ``max``).
    ``precision``: which of the run's ONNX files runs on a CPU (:func:`imgcls.prediction.predict.load`).
    ``tta``: test-time augmentation (:data:`imgcls.evaluation.tta.TTA`; ``flip``: the mean logits of each image
    and its mirror image), whatever the engine."""
    if events:
        check_aggregate(aggregate)
    if not event_gap > 0:
        raise UserError(f"--event-gap {event_gap} is out of range: it must be > 0 seconds")
    predictor = load(run, backend=backend, precision=precision)
    predictor.engine = with_tta(predictor.engine, tta)
    log.info("engine: %s%s", predictor.backend, f" (test-time augmentation: {tta})" if tta != "none" else "")
    labels = predictor.labels
    task = TASKS[predictor.task]
    if events and task.row is not None:
        raise UserError(f"--events scores an event by one class; a {task.name} model's events are not scored yet"
                        " (leave out --events)")
    records = _labelled_records(predictor, data, split, event_column=event_column, event_gap=event_gap)
    source = None
    if events:
        records, source = _with_events(records, event_gap)
    scored = []  # (record, logits) of the frames read, for the events and the report

    def kept(stream):
        for record, logits, error in stream:
            if (events or keep is not None) and logits is not None:
                scored.append((record, logits))
            yield record, logits, error

    stream = kept(predictor.iter_logits(records, batch_size=batch_size))
    metrics, failed = task.stream_metrics(
        progress_bar(stream, total=len(records), disable=not progress, desc="evaluate"), labels, predictor.thresholds)
    if metrics is None:
        raise UserError(f"{data}: none of the {len(records)} images could be read")
    for record, reason in failed:
        log.warning("not evaluated (unreadable): %s: %s", record.path, reason)
    if events:  # log-probabilities are softmax logits of the same distribution (a binary sigmoid's one logit too)
        frames = [(r, np.log(np.maximum(task.probabilities(np.asarray(z)[None])[0], np.finfo(np.float64).tiny)))
                  for r, z in scored]
        metrics.events = event_metrics(frames, labels, aggregate, source)
    if keep is not None and task.name == "multiclass":  # the HTML report: single-label runs
        keep.append(_scored(scored, failed, labels, predictor.temperature))
    if write:
        save_evaluation(metrics, run, keep[-1] if keep else None, data)
    return metrics


def _scored(scored, failed, labels: list[str], temperature: float):
    """Per-image predictions for the HTML report: raw logits, calibrated probabilities."""
    import numpy as np

    from .evaluation.calibration import scaled_probs
    from .evaluation.html_report import Scored

    index = {label: i for i, label in enumerate(labels)}
    logits = np.stack([logits for _, logits in scored]).astype(np.float64)
    return Scored("eval", [str(r.path) for r, _ in scored], np.array([index[r.label] for r, _ in scored]),
                  scaled_probs(logits, temperature), logits, [(str(r.path), why) for r, why in failed])


def report(run: str | Path, data: str | Path | None = None, out: str | Path | None = None, split: str | None = None,
           backend: str = "auto", batch_size: int | None = None, progress: bool = False) -> Path:
    """The self-contained HTML report of a run (:mod:`imgcls.evaluation.html_report`): from its own files
    (``RUN/report.html``), or with ``data`` scored now through the run's predictor, as :func:`evaluate`
    does (``RUN/eval_report.html``)."""
    from . import rundir
    from .evaluation.html_report import write_report

    run = rundir.require_run_dir(run)
    if not run.is_dir():
        raise UserError(f"{run}: a report is made of a run directory; give the run, not a model file")
    if data is None:
        return write_report(run, out)
    kept: list = []
    metrics = evaluate(run, data, split=split, backend=backend, batch_size=batch_size, write=False,
                       progress=progress, keep=kept)
    return write_report(run, out if out is not None else run / rundir.EVAL_REPORT, scored=kept,
                        metrics={"eval": metrics.to_dict()}, on_data=str(data))


def _with_events(records, event_gap: float):
    """The records grouped into capture events, and where the events came from (``data`` or ``exif``)."""
    if any(r.group is not None for r in records):
        return records, "data"
    grouped, report = group_events(records, event_gap)
    log.info("capture events: %d from EXIF times within %g s per camera (%d frames by EXIF time, %d by file time)",
             report.events, event_gap, report.from_exif, report.from_mtime)
    return grouped, "exif"


def choose_thresholds(run: str | Path, data: str | Path, label: str, target_recall: float = 0.99,
                      split: str | None = None, backend: str = "auto", batch_size: int | None = None,
                      progress: bool = False) -> dict:
    """Choose the threshold of class ``label`` on labelled ``data`` so that at least ``target_recall``
    of the other classes' images stay out of its automatic pile; store it in the run
    (``thresholds.json``), draw the trade-off (``thresholds_<label>.png``) and return the figures
    (the chosen threshold and those for :data:`~.thresholds.REPORT_RECALLS`)."""
    from .evaluation import thresholds as th

    if not Path(run).is_dir():
        raise UserError(f"{run}: thresholds are stored in a run directory; give the run, not a model file")
    if not 0.0 < target_recall < 1.0:
        raise UserError(f"--target-recall must lie strictly between 0 and 1, not {target_recall}")
    predictor = load(run, backend=backend)
    if TASKS[predictor.task].heads:
        raise UserError(f"{run} is a multioutput model; `imgcls thresholds` chooses the threshold of one class of a"
                        " multiclass model")
    if TASKS[predictor.task].label_sets:
        raise UserError(f"{run} is a multi-label model: training tuned each label's threshold on val (highest F1)"
                        " and stored them in thresholds.json; `imgcls thresholds` chooses one class of a multiclass"
                        " model. Use --threshold P with predict for one threshold for every label")
    if label not in predictor.labels:
        raise UserError(f"--class {label}: not a class of this model ({listing(predictor.labels)})")
    records = _labelled_records(predictor, data, split)
    probs, truth = [], []
    index = {name: i for i, name in enumerate(predictor.labels)}
    for record, p, error in progress_bar(predictor.iter_probs(records, batch_size=batch_size), total=len(records),
                                 disable=not progress, desc="thresholds"):
        if p is None:
            log.warning("left out (unreadable): %s: %s", record.path, error)
            continue
        probs.append(p)
        truth.append(index[record.label])
    if not probs:
        raise UserError(f"{data}: none of the {len(records)} images could be read")
    probs, truth = np.stack(probs), np.asarray(truth)
    c = index[label]
    if not (truth != c).any():
        raise UserError(f"{data}: every image is {label!r}; thresholds need images of the other classes too")
    chosen = th.choose_threshold(probs, truth, c, target_recall, label)
    report = [th.choose_threshold(probs, truth, c, r, label) for r in th.REPORT_RECALLS]
    path = th.save_thresholds(run, [chosen], predictor.labels)
    png = th.plot_tradeoff(th.tradeoff(probs, truth, c), [chosen], label, Path(run) / f"thresholds_{label}.png")
    return {"chosen": chosen.to_dict(), "table": [r.to_dict() for r in report], "images": len(truth),
            "of_class": int((truth == c).sum()), "file": str(path), "plot": str(png)}


def _labelled_records(predictor, data, split, event_column: str | None = None, event_gap: float = DEFAULT_GAP):
    """The records of ``data``'s split (``test``, else ``val``, else everything), checked against the model
    (a multi-output model's: read from its own label columns)."""
    columns = [name for name, _, _ in heads_of(predictor.labels)] if TASKS[predictor.task].heads else ["label"]
    dataset = load_dataset(data, label_column=",".join(columns), event_column=event_column, event_gap=event_gap)
    if split is None:
        split = next((s for s in ("test", "val", "all") if s in dataset.splits), "train")
    if split not in dataset.splits:
        raise UserError(f"{data} has no {split!r} split; it has {', '.join(dataset.splits)}")
    records = with_label_sets(dataset.splits[split], {"task": predictor.task, "label_sep": predictor.label_sep})
    unknown = sorted({label for r in records for label in r.label_set} - set(predictor.labels))
    if unknown:
        raise UserError(f"{data}: class(es) {listing(unknown)} are not among the model's classes"
                        f" ({listing(predictor.labels)}); evaluate a model trained on these classes")
    return records


def save_evaluation(metrics, run: str | Path, scored=None, data: str | Path | None = None) -> Path | None:
    """``eval.json`` and the confusion matrix into a run directory; a run that cannot be written
    (read-only, a colleague's) only gets a warning: the metrics are computed and returned anyway.
    ``scored`` (from ``evaluate(keep=...)``): also ``eval_report.html``, never at the cost of the rest."""
    if not Path(run).is_dir():
        return None
    try:
        saved = write_metrics(metrics, run, prefix="eval")["confusion_png"]
    except OSError as err:
        log.warning("metrics not saved in %s (%s)", run, err.strerror or err)
        return None
    if scored is not None:
        from . import rundir
        from .evaluation.html_report import write_run_report

        write_run_report(run, Path(run) / rundir.EVAL_REPORT, scored=[scored], metrics={"eval": metrics.to_dict()},
                         on_data=str(data) if data is not None else "the evaluated data")
    return saved


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
