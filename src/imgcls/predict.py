"""Streaming batch prediction: files in, trustworthy rows out.

Decoding runs in a thread pool a few batches ahead of the engine, through a
bounded window, so memory stays flat however many files there are
(:func:`imgcls.engines.stream_logits`, shared with evaluation and export).
A file that cannot be read becomes a row with an ``error`` and never stops
the batch.  CSV rows are flushed as they are produced: a crash or Ctrl-C
keeps every finished prediction.

Writing a CSV (:func:`predict_to_csv`) is guarded at one boundary, before any
row is written: every option is checked and every input collected first; the
output is locked (``OUT.lock``, ``flock``) so two runs cannot interleave
rows; an existing file is replaced only with ``--overwrite`` unless it is our
own header with no rows.  Rows are written in input order, so ``--resume``
keys on position: the k complete rows in the file are inputs 1..k (checked
path by path), and the run goes on from input k + 1.  The file is UTF-8,
with ``surrogateescape`` so file names that are not valid UTF-8 survive.

This module imports torch only when the torch engine is used, so predicting
from a ``model.onnx`` file works with the runtime install alone.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from . import rundir, tasks
from .data.preprocess import Preprocess
from .data.records import Record
from .data.sources import collect_inputs
from .engines import OnnxEngine, TorchEngine, stream_logits
from .errors import UserError
from .system import cuda_available, resolve_device
from .thresholds import check_threshold, decide, load_thresholds

try:  # POSIX; elsewhere predict runs without the output lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

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
    thresholds: dict = field(default_factory=dict)  # label -> threshold; rows get a decision column when set
    task: str = tasks.DEFAULT       # imgcls.tasks: how logits become probabilities and rows
    label_sep: str = tasks.DEFAULT_SEP  # multilabel: joins the labels of a row

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N,3,S,S) -> probabilities (N,K), float64."""
        return tasks.TASKS[self.task].probabilities(self.engine(batch))

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
            yield record, (None if logits is None else tasks.TASKS[self.task].probabilities(logits[None])[0]), error

    def iter_predict(self, inputs: Iterable[str | Path | Record], batch_size: int | None = None, top_k: int = 1,
                     workers: int | None = None) -> Iterator[dict]:
        """Yield one CSV row per input, in input order (columns: :func:`row_columns`)."""
        check_options(batch_size, top_k)
        records = [r if isinstance(r, Record) else Record(Path(r)) for r in inputs]
        top_k = min(top_k, len(self.labels))
        for record, probs, error in self.iter_probs(records, batch_size, workers):
            if tasks.TASKS[self.task].label_sets:  # multilabel: each label's probability and the set that passes
                yield tasks.label_set_row(record, probs, error, self.labels, self.thresholds, self.label_sep)
            else:
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
        if self.thresholds:
            # the unrounded probability: the threshold was chosen on those
            row["decision"] = "" if probs is None else decide(row["label"], float(probs[ranked[0]]), self.thresholds)
        row["error"] = error
        return row

    def with_threshold(self, threshold: float | None) -> Predictor:
        """This predictor with one threshold for every class (``--threshold``), replacing stored ones."""
        check_threshold(threshold)
        if threshold is not None:
            self.thresholds = {label: float(threshold) for label in self.labels}
        return self


def row_columns(top_k: int, decision: bool = False) -> list[str]:
    ranked = [f"{kind}_{r + 1}" for r in range(top_k) for kind in ("label", "prob")] if top_k > 1 else []
    return ["path", "label", "prob", *ranked, *(["decision"] if decision else []), "error"]


def check_options(batch_size: int | None, top_k: int) -> None:
    """UserError for options that cannot work; called before any file is touched."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"--top-k must be at least 1, not {top_k}")


def predict_to_csv(predictor: Predictor, inputs: list[str | Path], out: str | Path, batch_size: int | None = None,
                   top_k: int = 1, progress: bool = True, resume: bool = False, overwrite: bool = False) -> dict:
    """Write predictions to ``out`` row by row, in input order; returns counts.

    Rows are flushed batch by batch, so a crash or Ctrl-C keeps every finished
    prediction.  An existing ``out`` is never replaced silently: ``resume``
    keeps its rows and predicts the inputs after them (appending), and
    ``overwrite`` starts it again; with neither it is an error (unless it is
    our header alone).  Options and inputs are checked before ``out`` is
    touched, and ``out`` is locked for the whole run.
    """
    check_options(batch_size, top_k)
    records = collect_inputs(inputs)
    batch_size = predictor.batch_size if batch_size is None else batch_size
    top_k = min(top_k, len(predictor.labels))
    columns = (tasks.label_set_columns(predictor.labels) if tasks.TASKS[predictor.task].label_sets
               else row_columns(top_k, bool(predictor.thresholds)))
    out = Path(out)
    _check_output_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        kept = _rows_to_keep(out, columns, records, resume, overwrite)
        records = records[kept:]
        return _write_rows(predictor, records, out, columns, batch_size, top_k, kept, progress)


def _write_rows(predictor: Predictor, records: list[Record], out: Path, columns: list[str], batch_size: int,
                top_k: int, kept: int, progress: bool) -> dict:
    done = errors = 0
    # surrogateescape: a file name that is not valid UTF-8 is written as its own bytes, not a crash
    with out.open("a" if kept else "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if not kept:
            writer.writeheader()
            handle.flush()  # a crash before the first batch leaves our header, which may be replaced
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


# --------------------------------------------------------------------------- the output file


@contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on ``OUT.lock`` for the block; a UserError when another process holds it.

    The lock file is removed on the way out while still locked; a process that
    opened it meanwhile sees another inode after locking and retries, so two
    runs never both believe they hold the lock.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = out.with_name(out.name + ".lock")
    fd = _acquire(lock_path, out)
    try:
        yield
    finally:
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)  # releases the lock (also on Ctrl-C and exceptions; the kernel does it on a kill)


def _acquire(lock_path: Path, out: Path) -> int:
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{out} is being written by another imgcls predict (it holds {lock_path});"
                            " wait for that run to finish, or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_inode(fd, lock_path):
            return fd
        os.close(fd)  # the previous holder removed this lock file as we locked it: take the new one


def _same_inode(fd: int, path: Path) -> bool:
    try:
        held, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _check_output_path(out: Path) -> None:
    try:
        mode = os.stat(out).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise UserError(f"{out} exists and is not a regular file; --out must name a CSV file to write")


def _rows_to_keep(out: Path, columns: list[str], records: list[Record], resume: bool, overwrite: bool) -> int:
    """How many inputs ``out`` already holds (0: write it afresh); UserErrors for files not to be touched."""
    if overwrite or _replaceable(out):
        return 0
    header = _first_line(out)
    ours = _is_our_header(header)
    if not resume:
        if ours:
            raise UserError(f"{out} already exists; add --resume to finish it (only the images it lacks are"
                            " predicted) or --overwrite to replace it")
        raise UserError(f"{out} already exists and is not an imgcls predict CSV; choose another --out,"
                        " or add --overwrite to replace it")
    if not ours:
        raise UserError(f"{out} is not an imgcls predict CSV (its first line is {','.join(header)[:80]!r}); --resume"
                        " continues a file this command wrote: choose another --out, or use --overwrite")
    if header != columns:
        raise UserError(f"{out} has columns {', '.join(header)}, not {', '.join(columns)} (another --top-k, or"
                        " thresholds added or removed?);"
                        " resume with the options that wrote it, or use --overwrite")
    done = _complete_rows(out, columns)
    _check_same_inputs(out, done, records)
    log.info("resuming %s: %d rows kept, %d images to go", out, len(done), len(records) - len(done))
    return len(done)


def _replaceable(out: Path) -> bool:
    """True when ``out`` is absent, empty, or exactly our header line: there is nothing in it to lose."""
    try:
        if out.stat().st_size > 64 * 1024:
            return False
        text = out.read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return True
    if not text:
        return True
    line = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else None
    return line is not None and "\n" not in line and "\r" not in line and _is_our_header(line.split(","))


def _first_line(out: Path) -> list[str]:
    with out.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        try:
            return next(csv.reader([handle.readline(64 * 1024)]), [])
        except csv.Error:
            return []


def _is_our_header(fields: list[str]) -> bool:
    decision = "decision" in fields
    ranked = (len(fields) - 4 - decision) // 2
    return fields in (row_columns(1, decision), row_columns(max(2, ranked), decision)) \
        or tasks.is_label_set_header(fields)


def _complete_rows(out: Path, columns: list[str]) -> list[str]:
    """The paths of the complete rows of ``out``, in order.

    A last row cut off by a crash (the bytes do not read back as the row the
    csv module writes) is dropped from the file; an unreadable row anywhere
    else is an error, never silently dropped.
    """
    text = out.read_bytes().decode("utf-8", "surrogateescape")
    paths = []
    reader, consumed = _counting_reader(text)
    next(reader)  # the header, already checked
    good_end = consumed()
    line = 2
    try:
        for fields in reader:
            chunk, good = text[good_end:consumed()], len(fields) == len(columns)
            if not good or _csv_line(fields).rstrip("\r\n") != chunk.rstrip("\r\n") or not chunk.endswith("\n"):
                if consumed() < len(text):  # only the last row may be cut off
                    raise UserError(f"{out}:{line}: not a row imgcls predict wrote; fix or delete that line,"
                                    " or use --overwrite")
                break
            paths.append(fields[0])
            good_end = consumed()
            line += chunk.count("\n")
    except csv.Error as err:
        raise UserError(f"{out}:{line}: not a CSV row ({err}); fix or delete that line, or use --overwrite") from None
    if good_end < len(text):  # killed mid-row: keep whole rows only
        with out.open("r+b") as handle:
            handle.truncate(len(text[:good_end].encode("utf-8", "surrogateescape")))
    return paths


def _counting_reader(text: str):
    """A csv reader over ``text`` and a function telling how many characters it has consumed
    (the reader pulls one line at a time and never reads past the end of a record)."""
    count = [0]

    def lines():
        for piece in io.StringIO(text, newline=""):
            count[0] += len(piece)
            yield piece

    return csv.reader(lines()), lambda: count[0]


def _csv_line(fields: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(fields)
    return buffer.getvalue()


def _check_same_inputs(out: Path, done: list[str], records: list[Record]) -> None:
    """Row i of ``out`` must be input i: otherwise the file was written for other inputs."""
    fix = "resume with the inputs (and order) that wrote it, or use --overwrite"
    if len(done) > len(records):
        raise UserError(f"{out} holds {len(done)} rows but there are only {len(records)} inputs; it was written"
                        f" for other inputs: {fix}")
    for i, (written, record) in enumerate(zip(done, records), start=1):
        if not _same_input(written, record.path):
            raise UserError(f"{out}: row {i} is {written!r} but input {i} is {str(record.path)!r}; the file was"
                            f" written for other inputs: {fix}")


def _same_input(written: str, path: Path) -> bool:
    """``written`` (a path column) names ``path``: as given, resolved absolute, or (written relative from
    another working directory) as the tail of its absolute path."""
    given = str(path)
    if written == given or os.path.abspath(written) == os.path.abspath(given):
        return True
    if os.path.isabs(written):
        return False
    tail = tuple(p for p in Path(os.path.normpath(written)).parts if p not in ("..", "."))
    return bool(tail) and Path(os.path.abspath(given)).parts[-len(tail):] == tail


# --------------------------------------------------------------------------- loading


def _torch_predictor(weights: Path, device: str = "auto") -> Predictor:
    from .models.classifier import Classifier  # torch: only for the torch backend

    if device == "auto":
        device = resolve_device("auto")
    classifier, meta = Classifier.from_file(weights)
    engine = TorchEngine(classifier, device=device)
    return Predictor(engine, list(meta["labels"]), classifier.preprocess, meta["model"], f"torch ({engine.device})",
                     GPU_BATCH if engine.device.type == "cuda" else CPU_BATCH, tasks.thresholds_of(meta),
                     task=tasks.of(meta).name, label_sep=tasks.sep_of(meta))


def _onnx_predictor(path: Path) -> Predictor:
    engine = OnnxEngine(path)
    if not engine.labels or engine.preprocess is None:
        raise UserError(f"{path}: this ONNX file carries no imgcls labels/preprocessing; export it with `imgcls export`")
    on_gpu = "CUDAExecutionProvider" in engine.providers
    return Predictor(engine, list(engine.labels), engine.preprocess, engine.metadata.get("model") or "", "onnxruntime",
                     GPU_BATCH if on_gpu else CPU_BATCH, tasks.thresholds_of(engine.metadata),
                     task=tasks.of(engine.metadata).name, label_sep=tasks.sep_of(engine.metadata))


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
        predictor = _onnx_predictor(onnx_file)
    else:
        predictor = _torch_predictor(path / rundir.WEIGHTS, device)
    predictor.thresholds = load_thresholds(path) or predictor.thresholds  # `imgcls thresholds`, training's
    return predictor
