"""Streaming batch prediction: files in, trustworthy rows out.

Decoding runs in a thread pool a few batches ahead of the engine, through a
bounded window, so memory stays flat however many files there are
(:func:`imgcls.engines.stream_logits`, shared with evaluation and export).
A file that cannot be read becomes a row with an ``error`` and never stops
the batch.  CSV rows are flushed as they are produced: a crash or Ctrl-C
keeps every finished prediction.

This module imports torch only when the torch engine is used, so predicting
from a ``model.onnx`` file works with the runtime install alone.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from . import rundir
from .data.preprocess import Preprocess
from .data.records import Record
from .data.sources import collect_inputs
from .engines import OnnxEngine, TorchEngine, stream_logits
from .errors import UserError
from .softmax import softmax
from .system import cuda_available, resolve_device

log = logging.getLogger("imgcls")

# Images per engine call when none is given: on a CPU 8 is as fast as 32 with a quarter of
# the activation memory; a GPU wants bigger batches (docs/decisions.md).
CPU_BATCH, GPU_BATCH = 8, 32


@dataclass
class Predictor:
    """A model ready to predict: engine + labels + preprocessing."""

    engine: object                  # callable: uint8 (N,3,S,S) -> logits (N,K)
    labels: list[str]
    preprocess: Preprocess
    model_name: str = ""
    backend: str = ""
    batch_size: int = CPU_BATCH     # default images per engine call (CPU_BATCH / GPU_BATCH)

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N,3,S,S) -> probabilities (N,K), float64."""
        return softmax(np.asarray(self.engine(batch), dtype=np.float64))

    def iter_logits(self, records: Iterable[Record], batch_size: int | None = None,
                    workers: int | None = None) -> Iterator[tuple[Record, np.ndarray | None, str]]:
        """Yield ``(record, logits (K,) or None, error)`` per record, in order
        (batches of ``batch_size``, default :attr:`batch_size`)."""
        batch_size = self.batch_size if batch_size is None else batch_size
        yield from stream_logits(self.engine, self.preprocess, records, batch_size, workers)

    def iter_probs(self, records: Iterable[Record], batch_size: int | None = None,
                   workers: int | None = None) -> Iterator[tuple[Record, np.ndarray | None, str]]:
        """Yield ``(record, probabilities (K,) or None, error)`` per record, in order."""
        for record, logits, error in self.iter_logits(records, batch_size, workers):
            yield record, (None if logits is None else softmax(np.asarray(logits, dtype=np.float64))), error

    def iter_predict(self, inputs: Iterable[str | Path | Record], batch_size: int | None = None, top_k: int = 1,
                     workers: int | None = None) -> Iterator[dict]:
        """Yield one CSV row per input, in input order (columns: :func:`row_columns`)."""
        records = [r if isinstance(r, Record) else Record(Path(r)) for r in inputs]
        top_k = max(1, min(top_k, len(self.labels)))
        for record, probs, error in self.iter_probs(records, batch_size, workers):
            yield self._row(record, probs, error, top_k)

    def predict(self, inputs: Iterable[str | Path], batch_size: int | None = None, top_k: int = 1) -> list[dict]:
        """Files and folders (recursive) or CSVs of paths -> list of row dicts."""
        return list(self.iter_predict(collect_inputs(list(inputs)), batch_size, top_k))

    def _row(self, record: Record, probs: np.ndarray | None, error: str, top_k: int) -> dict:
        row = {"path": str(record.path), "label": "", "prob": ""}
        ranked = [] if probs is None else np.argsort(-probs, kind="stable")[:top_k]
        if probs is not None:
            row["label"], row["prob"] = self.labels[ranked[0]], round(float(probs[ranked[0]]), 6)
        if top_k > 1:
            for rank in range(top_k):
                has = probs is not None
                row[f"label_{rank + 1}"] = self.labels[ranked[rank]] if has else ""
                row[f"prob_{rank + 1}"] = round(float(probs[ranked[rank]]), 6) if has else ""
        row["error"] = error
        return row


def row_columns(top_k: int) -> list[str]:
    ranked = [f"{kind}_{r + 1}" for r in range(top_k) for kind in ("label", "prob")] if top_k > 1 else []
    return ["path", "label", "prob", *ranked, "error"]


def predict_to_csv(predictor: Predictor, inputs: list[str | Path], out: str | Path, batch_size: int | None = None,
                   top_k: int = 1, progress: bool = True, resume: bool = False, overwrite: bool = False) -> dict:
    """Write predictions to ``out`` row by row; returns counts.

    Rows are flushed batch by batch, so a crash or Ctrl-C keeps every finished
    prediction.  An existing ``out`` is never replaced silently: ``resume``
    keeps its rows and predicts only the inputs it lacks (appending), and
    ``overwrite`` starts it again; with neither it is an error.
    """
    records = collect_inputs(inputs)
    batch_size = predictor.batch_size if batch_size is None else batch_size
    top_k = max(1, min(top_k, len(predictor.labels)))
    columns = row_columns(top_k)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = 0
    if not overwrite and _holds_rows(out):  # a file with a header alone holds nothing to lose
        if not resume:
            raise UserError(f"{out} already exists; add --resume to finish it (only the images it lacks are"
                            " predicted) or --overwrite to replace it")
        finished = _finished_paths(out, columns)
        kept = len(finished)
        records = [r for r in records if os.path.abspath(r.path) not in finished]
        log.info("resuming %s: %d rows kept, %d images to go", out, kept, len(records))
    append = kept > 0
    done = errors = 0
    with out.open("a" if append else "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if not append:
            writer.writeheader()
        bar = tqdm(total=len(records), unit="img", desc="predict", disable=not progress)
        try:
            for row in predictor.iter_predict(records, batch_size, top_k):
                writer.writerow(row)
                done += 1
                errors += bool(row["error"])
                bar.update()
                if done % batch_size == 0:
                    handle.flush()
        except KeyboardInterrupt:
            log.warning("interrupted: %s holds %d predictions; run the same command with --resume to finish it",
                        out, kept + done)
            raise
        finally:
            bar.close()
    return {"images": done, "errors": errors, "kept": kept, "out": str(out)}


def _holds_rows(out: Path) -> bool:
    """True when ``out`` exists with at least one line after its header."""
    try:
        with out.open("rb") as handle:
            return len([line for _, line in zip(range(2), handle) if line.strip()]) > 1
    except FileNotFoundError:
        return False


def _finished_paths(out: Path, columns: list[str]) -> set[str]:
    """Paths already predicted in ``out`` (absolute, so ``photos/x.jpg`` matches ``./photos/x.jpg``);
    a last line cut off by a crash is dropped from the file."""
    data = out.read_bytes()
    if not data.endswith(b"\n"):  # killed mid-row: keep whole rows only
        data = data[: data.rfind(b"\n") + 1]
        with out.open("r+b") as handle:
            handle.truncate(len(data))
    lines = data.decode("utf-8").splitlines()
    reader = csv.DictReader(lines)
    if reader.fieldnames != columns:
        raise UserError(f"{out} has columns {', '.join(reader.fieldnames or [])}, not {', '.join(columns)}"
                        " (another --top-k?); resume with the options that wrote it, or use --overwrite")
    return {os.path.abspath(row["path"]) for row in reader}


# --------------------------------------------------------------------------- loading


def _torch_predictor(weights: Path, device: str = "auto") -> Predictor:
    from .models.classifier import Classifier  # torch: only for the torch backend

    if device == "auto":
        device = resolve_device("auto")
    classifier, meta = Classifier.from_file(weights)
    engine = TorchEngine(classifier, device=device)
    return Predictor(engine, list(meta["labels"]), classifier.preprocess, meta["model"], f"torch ({engine.device})",
                     GPU_BATCH if engine.device.type == "cuda" else CPU_BATCH)


def _onnx_predictor(path: Path) -> Predictor:
    engine = OnnxEngine(path)
    if not engine.labels or engine.preprocess is None:
        raise UserError(f"{path}: this ONNX file carries no imgcls labels/preprocessing; export it with `imgcls export`")
    on_gpu = "CUDAExecutionProvider" in engine.providers
    return Predictor(engine, list(engine.labels), engine.preprocess, engine.metadata.get("model") or "", "onnxruntime",
                     GPU_BATCH if on_gpu else CPU_BATCH)


def load(path: str | Path, backend: str = "auto", device: str = "auto") -> Predictor:
    """A run directory, a ``model.safetensors`` or a ``model.onnx`` -> :class:`Predictor`.

    ``backend``: ``torch``, ``onnx`` or ``auto`` (ONNX Runtime on a CPU when the
    run holds an exported model, else torch).
    """
    path = rundir.require_run_dir(path)
    if backend not in ("auto", "torch", "onnx"):
        raise UserError(f"unknown backend {backend!r}; use auto, torch or onnx")
    if path.is_file():
        if path.suffix == ".onnx":
            if backend == "torch":
                raise UserError(f"{path} is an ONNX file; it runs on --backend onnx only")
            return _onnx_predictor(path)
        if path.suffix == ".safetensors":
            return _torch_predictor(path, device)
        raise UserError(f"{path}: expected a run directory, a .safetensors or an .onnx file")
    onnx_file = path / rundir.ONNX
    if backend == "onnx" or (backend == "auto" and onnx_file.exists() and device in ("auto", "cpu")
                             and not cuda_available()):
        if not onnx_file.exists():
            raise UserError(f"{path} has no {rundir.ONNX}; create it with `imgcls export {path}`")
        return _onnx_predictor(onnx_file)
    return _torch_predictor(path / rundir.WEIGHTS, device)
