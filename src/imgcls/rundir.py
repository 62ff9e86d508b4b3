"""The run directory: everything needed to reproduce a run and to apply its model.

::

    RUN_DIR/
      config.yaml         resolved training configuration
      labels.json         class names, index order = model output order
      preprocess.json     the Preprocess spec of the weights
      model.safetensors   best weights (bare network) + metadata: model, labels,
                          preprocess, build options -> enough alone to predict
      checkpoint.pt       last epoch's full training state, for --resume
      metrics.csv         one row per epoch
      summary.json        headline numbers
      scan.json           pre-flight scan: counts per class, unreadable files, duplicates
      split.csv           which image went to train / val / test (csv module: any path survives)
      features.json       the features strategy: views, penalty, prior, timings
      model.onnx          exported model, labels + preprocess in metadata
      model.int8.onnx     int8 model, when exported and it passed its accuracy gate
      export.json         the int8 gate's accuracies
      <prefix>.json, <prefix>_confusion_matrix.csv/.png   metrics (prefix val, test, eval)
      training_curves.png

Writes are atomic (temp file + rename), so a crash or Ctrl-C never leaves a
half-written file behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import yaml

from .data.preprocess import Preprocess
from .errors import UserError

CONFIG = "config.yaml"
LABELS = "labels.json"
PREPROCESS = "preprocess.json"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
SCAN = "scan.json"
ONNX = "model.onnx"
INT8 = "model.int8.onnx"
EXPORT = "export.json"
SPLIT = "split.csv"
FEATURES = "features.json"
CURVES = "training_curves.png"
SPLIT_COLUMNS = ("path", "label", "group", "split")
# files of a run that nothing but training may write
OWN_FILES = (CONFIG, LABELS, PREPROCESS, WEIGHTS, CHECKPOINT, METRICS, SUMMARY, SCAN, SPLIT, FEATURES)


def metrics_files(prefix: str) -> dict[str, str]:
    """The names of one evaluation's outputs (prefix ``val``, ``test`` or ``eval``)."""
    return {"json": f"{prefix}.json", "confusion_csv": f"{prefix}_confusion_matrix.csv",
            "confusion_png": f"{prefix}_confusion_matrix.png"}


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``path`` through a temp file and a rename: readers see the old or the new file, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def write_yaml(path: str | Path, data) -> None:
    atomic_write(path, yaml.safe_dump(data, sort_keys=False))


def read_yaml(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


def require_run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run directory or model file")
    if path.is_dir() and not (path / WEIGHTS).exists():
        raise UserError(f"{path}: not an imgcls run directory (no {WEIGHTS}); train one with `imgcls train`")
    return path


def save_weights(path: str | Path, state_dict: dict, meta: dict) -> None:
    """Save a state dict with imgcls metadata (JSON strings) in the safetensors header."""
    from safetensors.torch import save  # imports torch: rundir itself stays torch-free for prediction

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, save(tensors, metadata={"imgcls": json.dumps(meta)}))


def weights_meta(path: str | Path) -> dict | None:
    """imgcls metadata of a run directory or .safetensors file; None for any other weights file."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if path.suffix != ".safetensors" or not path.exists():
        return None
    from safetensors import safe_open  # framework="pt" below imports torch; see save_weights

    with safe_open(str(path), framework="pt") as handle:
        meta = (handle.metadata() or {}).get("imgcls")
    return json.loads(meta) if meta else None


def read_weights_meta(path: str | Path) -> dict:
    meta = weights_meta(path)
    if meta is None:
        raise UserError(f"{path}: not an imgcls model file (no imgcls metadata); use it with --weights to fine-tune from it")
    return meta


def model_meta(model_name: str, labels: list[str], preprocess: Preprocess, build: dict) -> dict:
    return {"model": model_name, "labels": list(labels), "preprocess": preprocess.to_dict(), "build": build}


def write_split(path: str | Path, rows) -> None:
    """``split.csv`` from ``(path, label, group, split)`` rows, quoted by the csv module."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SPLIT_COLUMNS)
    writer.writerows(["" if v is None else str(v) for v in row] for row in rows)
    atomic_write(path, out.getvalue())


def read_split(path: str | Path) -> list[dict[str, str]]:
    """The rows of ``split.csv`` as dicts (path, label, group, split); [] when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / SPLIT
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds",
                  "images_per_second")


def append_metrics(run_dir: str | Path, row: dict) -> None:
    """One row of ``metrics.csv``, flushed at once so that a crash keeps the history."""
    path = Path(run_dir) / METRICS
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
