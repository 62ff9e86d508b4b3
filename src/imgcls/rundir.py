"""The run directory: everything needed to reproduce a run and to apply its model.

::

    RUN_DIR/
      config.yaml         resolved training configuration
      labels.json         class names, index order = model output order
      preprocess.json     the Preprocess spec of the weights
      model.safetensors   best weights (bare network) + metadata: model, labels,
                          preprocess, build options, task (multilabel: its tuned
                          thresholds) -> enough alone to predict
      checkpoint.pt       last epoch's full training state, for --resume
      metrics.csv         one row per epoch
      summary.json        headline numbers
      scan.json           pre-flight scan: counts per class, unreadable files, duplicates
      split.csv           which image went to train / val / test (csv module: any path survives)
      features.json       the features strategy: views, penalty, prior, timings
      model.onnx          exported model, labels + preprocess in metadata
      model.int8.onnx     int8 model, when exported and it passed its accuracy gate
      export.json         the int8 gate's accuracies
      thresholds.json     per-class decision thresholds (imgcls thresholds), thresholds_<class>.png;
                          multi-label runs: each label's threshold, tuned on val by training
      <prefix>.json, <prefix>_confusion_matrix.csv/.png   metrics (prefix val, test, eval)
      training_curves.png
      head_selection.png  the features strategy: the head's cross-validation, each penalty and family
      calibration.json    the temperature fitted on val, ECE/NLL before and after, reliability bins
      val_predictions.csv, test_predictions.csv   per image: true, predicted, calibrated probabilities
      report.html         the self-contained HTML report (imgcls report; eval_report.html: imgcls eval)

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
from .errors import UserError, first_line

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
THRESHOLDS = "thresholds.json"   # imgcls thresholds: per-class decision thresholds
CURVES = "training_curves.png"
HEAD_SELECTION = "head_selection.png"  # the features head's cross-validation (evaluation.plots)
SPLIT_COLUMNS = ("path", "label", "group", "split")
CALIBRATION = "calibration.json"  # temperature scaling fitted on val (imgcls.evaluation.calibration)
REPORT = "report.html"            # written by training and `imgcls report`
EVAL_REPORT = "eval_report.html"  # written by `imgcls eval` and `imgcls report --data`
# files of a run that nothing but training may write
OWN_FILES = (CONFIG, LABELS, PREPROCESS, WEIGHTS, CHECKPOINT, METRICS, SUMMARY, SCAN, SPLIT, FEATURES, THRESHOLDS)


def metrics_files(prefix: str) -> dict[str, str]:
    """The names of one evaluation's outputs (prefix ``val``, ``test`` or ``eval``)."""
    return {"json": f"{prefix}.json", "confusion_csv": f"{prefix}_confusion_matrix.csv",
            "confusion_png": f"{prefix}_confusion_matrix.png"}


def predictions_file(prefix: str) -> str:
    """Per-image predictions of a split's final metrics (prefix ``val``, ``test``)."""
    return f"{prefix}_predictions.csv"


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``path`` through a temp file and a rename: readers see the old or the new file, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the run is shared like any other file
        with os.fdopen(fd, "wb") as handle:
            # file names that are not valid UTF-8 are written back as their own bytes
            handle.write(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _broken(path, what: str, err: BaseException, fix: str) -> UserError:
    return UserError(f"{path}: not a valid {what} ({first_line(err, 200)}); {fix}")


def write_json(path: str | Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path, fix: str = "delete or restore it"):
    """A JSON file of the run; a UserError naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _broken(path, "JSON file", err, fix) from None


def write_yaml(path: str | Path, data) -> None:
    atomic_write(path, yaml.safe_dump(data, sort_keys=False))


def read_yaml(path: str | Path, fix: str = "restore it or train a new run") -> dict:
    """A YAML mapping (config.yaml); a UserError naming the file when it is anything else."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise _broken(path, "YAML file", err, fix) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of options, found a {type(data).__name__}; {fix}")
    return data


def read_preprocess(path: str | Path, fix: str = "restore it or train a new run") -> Preprocess:
    """``preprocess.json``; a UserError naming the file when it is not a valid spec."""
    return preprocess_from(read_json(path, fix), path, fix)


def preprocess_from(data, where, fix: str) -> Preprocess:
    """A Preprocess from stored metadata; a UserError naming ``where`` when it does not make one."""
    try:
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        spec = Preprocess.from_dict(data)
        if not (isinstance(spec.input_size, int) and spec.input_size > 0 and len(spec.mean) == 3
                and len(spec.std) == 3 and all(float(v) > 0 for v in spec.std)):
            raise ValueError(f"input_size {spec.input_size!r}, mean {spec.mean!r}, std {spec.std!r}")
        _ = spec.resize_size, spec.pil_interpolation  # the derived values must compute too
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise _broken(where, "preprocessing spec", err, fix) from None
    return spec


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

    fix = "the file is truncated or corrupt: copy it again, or train a new run"
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = (handle.metadata() or {}).get("imgcls")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        raise _broken(path, "safetensors file", err, fix) from None
    if not meta:
        return None
    try:
        meta = json.loads(meta)
        if not (isinstance(meta, dict) and isinstance(meta.get("model"), str)
                and isinstance(meta.get("labels"), list) and meta["labels"]
                and all(isinstance(x, str) for x in meta["labels"])
                and isinstance(meta.get("build", {}), dict)):
            raise ValueError("expected model (text), labels (a list of text), preprocess and build")
    except ValueError as err:
        raise _broken(path, "imgcls model file: its metadata", err, fix) from None
    preprocess_from(meta.get("preprocess"), f"{path} (its metadata)", fix)
    return meta


def read_weights_meta(path: str | Path) -> dict:
    meta = weights_meta(path)
    if meta is None:
        raise UserError(f"{path}: not an imgcls model file (no imgcls metadata); use it with --weights to fine-tune from it")
    return meta


def model_meta(model_name: str, labels: list[str], preprocess: Preprocess, build: dict,
               task: dict | None = None) -> dict:
    """``task``: the task's entries (:func:`imgcls.tasks.meta`: task name, label separator)."""
    return {"model": model_name, "labels": list(labels), "preprocess": preprocess.to_dict(), "build": build,
            **(task or {})}


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
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return list(csv.DictReader(handle))


METRIC_COLUMNS = ("epoch", "input_size",  # input_size: the side the epoch trained at (--progressive shrinks it)
                  "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy",
                  "epoch_seconds", "images_per_second", "val_map",  # val_map: multi-label runs
                  "train_flops")  # counted FLOPs of the training steps so far (train.flops)


def truncate_metrics(run_dir: str | Path, epochs: int) -> None:
    """Keep the rows of ``metrics.csv`` up to ``epochs`` (a resume repeats what came after its checkpoint)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    kept = [r for r in rows if r.get("epoch", "").isdigit() and int(r["epoch"]) <= epochs]
    if len(kept) == len(rows):
        return
    out = io.StringIO()  # in the file's own columns, as append_metrics keeps them
    writer = csv.DictWriter(out, fieldnames=reader.fieldnames or METRIC_COLUMNS, extrasaction="ignore",
                            lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(kept)
    atomic_write(path, out.getvalue())


def append_metrics(run_dir: str | Path, row: dict) -> None:
    """One row of ``metrics.csv``, flushed at once so that a crash keeps the history."""
    path = Path(run_dir) / METRICS
    new = not path.exists()
    columns = METRIC_COLUMNS
    if not new:  # a resumed run keeps the columns its file began with
        with path.open(newline="") as handle:
            columns = next(csv.reader(handle), None) or METRIC_COLUMNS
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
