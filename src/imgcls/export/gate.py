"""A run directory's export: its model to ONNX, and the int8 file kept only when it passes the accuracy gate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .. import rundir
from ..data.decode import ImageError, load_uint8
from ..data.records import Record
from ..errors import UserError
from ..evaluation.metrics import metrics_of_stream
from ..models.classifier import Classifier
from ..prediction.engines import OnnxEngine, stream_logits, temperature_metadata
from ..tasks import of as of_task
from .graph import export_onnx
from .int8 import quantize_int8

_GATE_BATCH = 32  # images per engine call for the gate's accuracies
# calibration runs a copy of the model that reduces every tensor; its memory grows with the batch,
# so small batches keep the int8 step below the memory training itself needs
_CALIBRATION_BATCH = 8
_CALIBRATION_IMAGES = 128


def _split_records(rows: list[dict], split: str) -> list[Record]:
    """The ``split`` rows of a run's split.csv as labelled records."""
    return [Record(Path(r["path"]), r["label"]) for r in rows if r["split"] == split]


def _spread(records: list[Record], limit: int) -> list[Record]:
    """At most ``limit`` records, evenly spaced over the list (every class, not the first ones)."""
    if len(records) <= limit:
        return list(records)
    return [records[i] for i in np.linspace(0, len(records) - 1, limit).round().astype(int)]


def _image_batches(records: Iterable[Record], spec, batch_size: int = _GATE_BATCH):
    """uint8 batches of the records' images (parity sample, calibration); unreadable files skipped."""
    images = []
    for record in records:
        try:
            images.append(load_uint8(record.path, spec))
        except ImageError:
            continue
        if len(images) == batch_size:
            yield np.stack(images)
            images = []
    if images:
        yield np.stack(images)


def _val_accuracy(onnx_path: Path, val: list[Record], spec, labels: list[str]) -> float:
    """Top-1 accuracy on the readable validation images, through the path evaluation takes;
    0.0 when none is readable."""
    metrics, _ = metrics_of_stream(stream_logits(OnnxEngine(onnx_path), spec, val, _GATE_BATCH), labels)
    return metrics.accuracy if metrics is not None else 0.0


def _check_out(run: Path, out: Path) -> None:
    """Refuse an --out that would replace one of the run's own files, or is no ONNX file."""
    own = {(run / name).resolve() for name in rundir.OWN_FILES}
    if out.resolve() in own or (out.exists() and out.is_dir()):
        raise UserError(f"--out {out} would replace {'a folder' if out.is_dir() else 'a file of the run itself'};"
                        f" give a new .onnx path (the default is {run / rundir.ONNX})")
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--out {out}: export writes an ONNX model; give a path ending in .onnx")


MAX_INT8_LOSS = 0.01  # the gate: int8 may lose at most this much validation accuracy (1 point)


def loss_of_points(points: float | None) -> float | None:
    """``--int8-max-loss`` (points of accuracy) as the gate's fraction; None stays None (the default)."""
    if points is not None and not 0 <= points <= 100:
        raise UserError(f"--int8-max-loss {points:g} is out of range: give points of accuracy from 0 to 100")
    return None if points is None else points / 100


def gate_int8(fp32_path: str | Path, int8_path: str | Path, train: Sequence[Record], val: Sequence[Record], spec,
              labels: Sequence[str], report_path: str | Path, max_loss: float | None = None,
              fp32_accuracy: float | None = None) -> dict:
    """Make the int8 file of ``fp32_path`` and keep it only when it passes the accuracy gate.

    Calibration: up to 128 of the ``train`` records, evenly spaced.  The gate: top-1
    accuracy of both files on the readable ``val`` images (``fp32_accuracy`` when the
    caller already scored ``fp32_path`` on them); int8 is refused, and its file removed,
    when it loses more than ``max_loss`` (default :data:`MAX_INT8_LOSS`).  The figures go
    to ``report_path`` (``export.json``) either way and are returned, with ``kept`` and
    ``reason``.  Quantization errors propagate (nothing is left at ``int8_path``).
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    max_loss = MAX_INT8_LOSS if max_loss is None else max_loss
    labels, val = list(labels), list(val)
    calibration = _image_batches(_spread(list(train), _CALIBRATION_IMAGES), spec, _CALIBRATION_BATCH)
    quantize_int8(fp32_path, int8_path, calibration)
    if fp32_accuracy is None:
        fp32_accuracy = _val_accuracy(fp32_path, val, spec, labels)
    int8_accuracy = _val_accuracy(int8_path, val, spec, labels)
    loss = fp32_accuracy - int8_accuracy
    kept = loss <= max_loss + 1e-9  # accuracies are counts over n: 0.95 - 0.94 is a point, not a bit more
    if kept:
        reason = (f"val accuracy {int8_accuracy:.4f} (fp32 {fp32_accuracy:.4f}): loses {100 * loss:.1f} points,"
                  f" at most {100 * max_loss:g} allowed")
    else:
        int8_path.unlink(missing_ok=True)
        reason = (f"int8 quantization loses {100 * loss:.1f} points of validation accuracy ({fp32_accuracy:.4f}"
                  f" -> {int8_accuracy:.4f}), more than {100 * max_loss:g}")
    report = {"fp32_val_accuracy": fp32_accuracy, "int8_val_accuracy": int8_accuracy, "n_val": len(val),
              "max_loss": max_loss, "kept": kept, "int8_file": str(int8_path), "reason": reason}
    rundir.write_json(Path(report_path), report)
    return report


def export_run(run: str | Path, out: str | Path | None = None, int8: bool = False,
               max_int8_loss: float | None = None) -> Path:
    """Export a run's best model to ONNX (labels + preprocessing inside).

    The parity check uses real validation images of the run.  ``int8``: static
    quantization calibrated on up to 128 training images, then refused (a
    UserError with the numbers) when it loses more than ``max_int8_loss``
    (default :data:`MAX_INT8_LOSS`) of validation accuracy (:func:`gate_int8`);
    both accuracies go to ``export.json`` in the run directory.
    """
    run = rundir.require_run_dir(run)
    if not run.is_dir():
        raise UserError(f"{run}: export takes a run directory")
    if out is not None:
        _check_out(run, Path(out))
    classifier, meta = Classifier.from_file(run / rundir.WEIGHTS)
    spec = classifier.preprocess
    labels = meta["labels"]
    split = rundir.read_split(run)
    val = _split_records(split, "val")
    sample = next(_image_batches(val[:8], spec), None)
    fp32_path = Path(out) if out and not int8 else run / rundir.ONNX
    if not int8 or not fp32_path.exists():
        export_onnx(classifier, labels, fp32_path, meta["model"], sample=sample, task=meta,
                    metadata=temperature_metadata(meta))
    if not int8:
        return fp32_path
    if of_task(meta).name != "multiclass":
        raise UserError(f"--int8: the accuracy gate scores multiclass models only; this is a {of_task(meta).name}"
                        f" model: keep the fp32 model ({fp32_path})")
    int8_path = Path(out) if out else run / rundir.INT8
    report = gate_int8(fp32_path, int8_path, _split_records(split, "train"), val, spec, labels, run / rundir.EXPORT,
                       max_int8_loss)
    if not report["kept"]:
        raise UserError(f"{report['reason']}; keep the fp32 model ({fp32_path})")
    logging.getLogger("imgcls").info("int8: %s", report["reason"])
    return int8_path
