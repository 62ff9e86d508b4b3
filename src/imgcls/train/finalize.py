"""After fitting: export the model in memory, and the final metrics through the one evaluation path."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from safetensors.torch import load_file

from .. import export, rundir, tasks
from ..errors import UserError, first_line
from ..evaluation.html_report import write_run_report
from ..evaluation.metrics import write_metrics
from ..evaluation.plots import plot_head_selection, plot_training_curves
from ..prediction.engines import OnnxEngine, TorchEngine, stream_logits
from .calibrate import after_metrics, keep
from .flops import format_flops
from .session import Fit, Session, TrainResult

log = logging.getLogger("imgcls")

_AMP_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: None}


def export_model(s: Session) -> str | None:
    """model.onnx of the session's model, parity-checked on val images; a failure only costs
    speed (prediction falls back to torch)."""
    path = s.run_dir / rundir.ONNX
    path.unlink(missing_ok=True)  # never leave a stale export beside new weights
    sample = np.stack([s.val_set[i][0].numpy() for i in range(min(8, len(s.val_set)))])
    try:
        return str(export.export_onnx(s.model, s.classes, path, s.cfg.model, sample=sample, prebuilt=s.onnx_graph,
                                      task=s.meta))
    except Exception as err:  # noqa: BLE001 - exporter limitations surface as many exception types
        log.warning("ONNX export failed (%s); prediction will use PyTorch", first_line(err))
        return None


def _engine(s: Session, onnx_path: str | None):
    """The best weights as an engine: the exported model on a CPU (ONNX Runtime, parity-checked
    at export and faster than eager there), else the torch model on the training device."""
    if onnx_path is not None and s.device.type == "cpu":
        return OnnxEngine(onnx_path)
    return TorchEngine(s.model, device=str(s.device), amp=_AMP_NAMES[s.amp_dtype])


split_summary = tasks.class_summary  # a multiclass split's entries of summary.json


def stamp_thresholds(s: Session, onnx_path: str | None, thresholds: dict[str, float]) -> None:
    """Tuned thresholds into the metadata of model.safetensors (the best weights, saved again) and model.onnx."""
    s.meta["thresholds"] = dict(thresholds)
    rundir.save_weights(s.run_dir / rundir.WEIGHTS, s.model.net.state_dict(), s.meta)
    if onnx_path is not None:
        export.stamp_metadata(onnx_path, tasks.thresholds_props(thresholds))


def int8_model(s: Session, onnx_path: str | None, fp32_val_accuracy: float | None = None) -> dict:
    """model.int8.onnx beside model.onnx when it passes the accuracy gate (``--int8``,
    :func:`imgcls.export.gate_int8`); what happened, for summary.json.  A failure only costs
    speed: prediction keeps fp32."""
    skip = _int8_skip_reason(s, onnx_path)
    if skip is not None:
        log.info("int8: not attempted (%s)", skip)
        return {"kept": False, "reason": skip}
    start = time.perf_counter()
    try:
        report = export.gate_int8(onnx_path, s.run_dir / rundir.INT8, s.splits["train"], s.splits["val"],
                                  s.preprocess, s.classes, s.run_dir / rundir.EXPORT,
                                  max_loss=export.loss_of_points(s.cfg.int8_max_loss), fp32_accuracy=fp32_val_accuracy)
    except Exception as err:  # noqa: BLE001 - quantizer limitations surface as many exception types
        (s.run_dir / rundir.INT8).unlink(missing_ok=True)
        log.warning("int8 quantization failed (%s); prediction will use fp32 %s", first_line(err), rundir.ONNX)
        return {"kept": False, "reason": f"quantization failed: {first_line(err)}"}
    seconds = round(time.perf_counter() - start, 2)
    if report["kept"]:
        log.info("int8: kept %s, %s (%.0f s)", rundir.INT8, report["reason"], seconds)
    else:
        log.info("int8: refused, %s; prediction will use fp32 %s", report["reason"], rundir.ONNX)
    return {**{k: report[k] for k in ("kept", "reason", "fp32_val_accuracy", "int8_val_accuracy")}, "seconds": seconds}


def _int8_skip_reason(s: Session, onnx_path: str | None) -> str | None:
    """Why int8 is not tried for this run, or None: it needs a multiclass model (``task`` in the
    model's metadata, absent = multiclass), the fp32 ONNX file and validation images to gate it on."""
    if s.cfg.int8 == "off":
        return "--int8 off"
    task = tasks.of(s.meta).name
    if task != tasks.DEFAULT:  # the gate compares top-1 accuracies of one softmax class per image
        return f"a {task} task: the accuracy gate is defined for multiclass models"
    if onnx_path is None:
        return f"no {rundir.ONNX}"
    if not s.splits.get("val") or not s.splits.get("train"):
        return "no validation images to gate it on"
    return None


def finalize(s: Session, fit: Fit, train_seconds: float) -> TrainResult:
    """Summary, curves, and (unless interrupted) the export and the val/test metrics of the best weights."""
    run_dir = s.run_dir
    if not (run_dir / rundir.WEIGHTS).exists():
        raise UserError("training stopped before the first epoch finished; nothing was saved")
    task = tasks.of(s.meta)
    summary = {"model": s.cfg.model, "classes": s.classes, "task": task.name, "strategy": fit.strategy,
               "best_val_accuracy": fit.best_val_accuracy, "best_epoch": fit.best_epoch, "epochs": fit.epochs,
               "epochs_planned": s.cfg.epochs, "train_seconds": round(train_seconds, 2), "n_train": len(s.train_set),
               "n_val": len(s.val_set), "stopped_early": fit.stopped_early, "interrupted": fit.interrupted, "signal": fit.signal,
               "device": str(s.device), "amp": str(s.amp_dtype).replace("torch.", "") if s.amp_dtype else "off"}
    if fit.train_flops is not None:  # counted by train.flops: training steps, and the per-epoch validation apart
        summary.update(train_flops=fit.train_flops, eval_flops=fit.eval_flops)
        log.info("training: %s counted (forward + backward of every step; per-epoch validation %s more)",
                 format_flops(fit.train_flops), format_flops(fit.eval_flops))
    if s.source.report is not None:
        summary["initial_weights"] = s.source.report.summary()
    if s.balance is not None:
        summary["class_balance"] = s.balance.to_dict()
        # the task's own selection metric (multilabel: mAP) picked the epoch, not the balance's
        summary["class_balance"]["selection_metric"] = task.selection or s.balance.selection_metric
    if (run_dir / rundir.METRICS).exists():
        plot_training_curves(run_dir / rundir.METRICS, run_dir / rundir.CURVES)
    (run_dir / rundir.HEAD_SELECTION).unlink(missing_ok=True)  # a resumed or re-fitted run: the new fit's or none
    if (run_dir / rundir.FEATURES).exists():
        plot_head_selection(rundir.read_json(run_dir / rundir.FEATURES), run_dir / rundir.HEAD_SELECTION)
    if not fit.interrupted:
        s.model.net.load_state_dict(load_file(str(run_dir / rundir.WEIGHTS)))
        for name in (rundir.INT8, rundir.EXPORT):  # a stale int8 file would be picked over the new weights
            (run_dir / name).unlink(missing_ok=True)
        onnx_path = export_model(s) if s.cfg.export_onnx else None
        if onnx_path is not None:
            summary["onnx"] = onnx_path
        engine = _engine(s, onnx_path)
        thresholds = None  # label sets: tuned on val, then used on test
        scored: dict[str, list] = {}  # (record, logits) per split, for calibration and the report
        fp32_val_accuracy = None  # the gate's fp32 figure, when the engine is that very file
        for split in ("val", "test"):
            records = s.splits.get(split)
            if not records:
                continue
            stream = keep(stream_logits(engine, s.preprocess, records, batch_size=s.cfg.batch_size),
                          scored.setdefault(split, []))
            metrics, failed = task.stream_metrics(stream, s.classes, thresholds)
            for record, reason in failed:
                log.warning("not evaluated (unreadable now): %s: %s", record.path, reason)
            if metrics is None:
                continue
            if split == "val":
                metrics, thresholds = tasks.settle_thresholds(task, metrics, run_dir)
                if thresholds:  # the model files carry them too: either file alone predicts label sets
                    stamp_thresholds(s, onnx_path, thresholds)
            write_metrics(metrics, run_dir, prefix=split)
            if split == "val" and isinstance(engine, OnnxEngine):
                fp32_val_accuracy = metrics.accuracy
            summary.update(task.summary(split, metrics))
            log.info("%s: %s", split, task.describe(metrics))
            if split == "test":
                summary["n_test"] = metrics.n
        # calibration: temperature on val into calibration.json and the model files; per-image predictions
        summary.update(after_metrics(s, scored))
        # after the temperature is stamped into model.onnx: the int8 file inherits its metadata
        summary["int8"] = int8_model(s, onnx_path, fp32_val_accuracy)
    rundir.write_json(run_dir / rundir.SUMMARY, summary)
    write_run_report(run_dir)  # report.html; a failure is only a warning
    return TrainResult(run_dir, summary)
