"""After the final metrics: temperature scaling on val, stamped into every copy of the model, and the
per-image predictions the HTML report shows.

:func:`keep` sits in finalize's val/test streams, so the logits the final metrics score are the ones
calibrated (val runs once).  They are the final model's for every strategy: finalize scores the best
weights it has just loaded (or their ONNX export, parity-checked against them), and the features
strategy fits its head on the training images only, so val stays held out.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from safetensors.torch import load_file

from .. import rundir
from ..evaluation.calibration import calibrate, figures, single_label, write_calibration
from ..evaluation.html_report import write_predictions
from ..prediction.engines import META_TEMPERATURE
from .session import Session

log = logging.getLogger("imgcls")


def keep(stream, rows: list):
    """``stream`` unchanged, with each ``(record, logits)`` that has logits appended to ``rows``."""
    for record, logits, error in stream:
        if logits is not None:
            rows.append((record, logits))
        yield record, logits, error


def _arrays(rows, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {label: i for i, label in enumerate(classes)}
    return (np.stack([logits for _, logits in rows]).astype(np.float64),
            np.array([index[record.label] for record, _ in rows], dtype=np.int64))


def stamp_temperature(run_dir: Path, temperature: float) -> None:
    """The temperature into model.safetensors' imgcls metadata and model.onnx's metadata_props, so either
    file alone predicts calibrated probabilities."""
    weights = run_dir / rundir.WEIGHTS
    meta = rundir.read_weights_meta(weights)
    rundir.save_weights(weights, load_file(str(weights)), {**meta, "temperature": temperature})
    path = run_dir / rundir.ONNX
    if not path.exists():
        return
    if path.with_name(path.name + ".data").exists():  # weights beside the graph: rewriting them is not worth it
        log.warning("%s keeps no temperature (its weights are an external file); the run's %s has it", path,
                    rundir.CALIBRATION)
        return
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, META_TEMPERATURE: repr(float(temperature))})
    tmp = path.with_name(path.name + ".tmp")
    try:
        onnx.save_model(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def after_metrics(s: Session, scored: dict[str, list]) -> dict:
    """calibration.json, the temperature in the model files and ``<split>_predictions.csv`` from the
    ``(record, logits)`` rows finalize kept per split; returns what summary.json gets."""
    task = s.meta.get("task")  # resolved at prepare (config.yaml may say auto)
    if not single_label(task):
        log.info("calibration and per-image predictions: skipped (they handle single-label runs; task %s)", task)
        return {}
    if not scored.get("val"):
        log.info("calibration: skipped (no val image was scored)")
        return {}
    logits, targets = _arrays(scored["val"], s.classes)
    result = calibrate(logits, targets, fit=s.cfg.calibrate)
    summary = result.summary()
    for split, rows in scored.items():
        if split != "val" and rows:
            result.held_out[split] = figures(*_arrays(rows, s.classes), result.temperature)
            summary[f"{split}_ece_before"] = round(result.held_out[split]["ece_before"], 4)
            summary[f"{split}_ece_after"] = round(result.held_out[split]["ece_after"], 4)
    write_calibration(s.run_dir, result)
    stamp_temperature(s.run_dir, result.temperature)
    for split, rows in scored.items():
        if rows:
            write_predictions(s.run_dir / rundir.predictions_file(split), [r for r, _ in rows],
                              _arrays(rows, s.classes)[0], s.classes, result.temperature)
    if result.fitted:
        log.info("calibration: temperature %.3f fitted on %d val images; ECE %.4f -> %.4f, NLL %.4f -> %.4f",
                 result.temperature, result.n, result.ece_before, result.ece_after, result.nll_before,
                 result.nll_after)
    else:
        log.info("calibration: temperature 1 (%s); ECE %.4f on val", result.reason, result.ece_before)
    return summary
