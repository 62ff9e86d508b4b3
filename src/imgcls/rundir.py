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
      scan.json           pre-flight scan: counts per class, unreadable files
      model.onnx          exported model (cached), labels + preprocess in metadata
      *.png               training curves, confusion matrix

Writes are atomic (temp file + rename), so a crash or Ctrl-C never leaves a
half-written file behind.
"""

from __future__ import annotations

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
CURVES = "training_curves.png"


def atomic_write(path: str | Path, data: bytes | str) -> None:
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
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, save(tensors, metadata={"imgcls": json.dumps(meta)}))


def weights_meta(path: str | Path) -> dict | None:
    """imgcls metadata of a run directory or .safetensors file; None for any other weights file."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if path.suffix != ".safetensors" or not path.exists():
        return None
    from safetensors import safe_open

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
