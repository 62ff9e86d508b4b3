"""Streaming batch prediction: files in, trustworthy rows out.

Decoding runs in a thread pool a few batches ahead of the engine, through a
bounded window, so memory stays flat however many files there are
(:func:`imgcls.prediction.engines.stream_logits`, shared with evaluation and export).
A file that cannot be read becomes a row with an ``error`` and never stops
the batch.  Rows are flushed as they are produced: a crash or Ctrl-C keeps
every finished prediction.

Writing an output (:func:`predict_to_file`; the formats and their row files
are :mod:`imgcls.prediction.outputs`) is guarded at one boundary, before any row is
written: every option is checked and every input collected first; the output
is locked (``OUT.lock``, ``flock``) so two runs cannot interleave rows; an
existing file is replaced only with ``--overwrite`` unless it is our own
header with no rows.  Rows are written in input order, so ``--resume`` keys
on position: the k complete rows in the file are inputs 1..k (checked path by
path), and the run goes on from input k + 1.

This module imports torch only when the torch engine is used, so predicting
from a ``model.onnx`` file works with the runtime install alone.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .. import __version__, rundir, tasks
from ..data.events import DEFAULT_GAP, group_events
from ..data.preprocess import Preprocess
from ..data.records import Record
from ..data.sources import collect_inputs, keyed_inputs
from ..errors import UserError
from ..evaluation.aggregate import check_aggregate
from ..evaluation.calibration import check_temperature, run_temperature
from ..evaluation.thresholds import check_threshold, decide, load_thresholds
from ..progress import bar as progress_bar
from ..system import cuda_available, resolve_device
from . import fingerprint, outputs
from .engines import OnnxEngine, TorchEngine, stream_logits
from .rowfiles import output_lock
from .shards import Shard, parse_shard, select

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
    source: str = ""                # the file or run it was loaded from
    task: str = tasks.DEFAULT       # imgcls.tasks: how logits become probabilities and rows
    label_sep: str = tasks.DEFAULT_SEP  # multilabel: joins the labels of a row
    temperature: float = 1.0        # probabilities of logits / temperature (imgcls.evaluation.calibration)
    model_file: str = ""            # the model file that runs: its sha256 fingerprints every output
    _sha256: str | None = field(default=None, init=False, repr=False, compare=False)

    def model_meta(self) -> dict:
        """What the rows depend on: the model file's sha256 (hashed once), name, task, labels, preprocessing
        and temperature."""
        if self._sha256 is None and self.model_file:
            self._sha256 = fingerprint.file_sha256(self.model_file)
        return {"file": self.model_file or None, "sha256": self._sha256, "name": self.model_name,
                "task": self.task, "labels": list(self.labels), "preprocess": asdict(self.preprocess),
                "temperature": self.temperature}

    def classifier_name(self) -> str:
        """How output files name the model (MegaDetector's ``classifier``, Camtrap DP's ``classifiedBy``)."""
        name = self.model_name or "imgcls"
        return f"{name} ({self.source})" if self.source else name

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N,3,S,S) -> probabilities (N,K), float64."""
        logits = np.asarray(self.engine(batch), dtype=np.float64)
        return tasks.TASKS[self.task].probabilities(logits / self.temperature, self.labels)

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
            probs = None if logits is None else tasks.TASKS[self.task].probabilities(
                np.asarray(logits, dtype=np.float64)[None] / self.temperature, self.labels)[0]
            yield record, probs, error

    def iter_predict(self, inputs: Iterable[str | Path | Record], batch_size: int | None = None, top_k: int = 1,
                     workers: int | None = None, events: bool = False) -> Iterator[dict]:
        """Yield one row per input, in input order (columns: :func:`row_columns`; ``events``: the record's
        group as the ``event`` column)."""
        check_options(batch_size, top_k)
        records = (r if isinstance(r, Record) else Record(Path(r)) for r in inputs)  # lazy: memory stays flat
        top_k = min(top_k, len(self.labels))
        task = tasks.TASKS[self.task]
        for record, probs, error in self.iter_probs(records, batch_size, workers):
            # multilabel: each label's probability and the set that passes; multioutput: each head's class
            if task.row is not None:
                yield task.row(record, probs, error, self.labels, self.thresholds, self.label_sep)
            else:
                yield self._row(record, probs, error, top_k, events)

    def predict(self, inputs: Iterable[str | Path], batch_size: int | None = None, top_k: int = 1) -> list[dict]:
        """Files and folders (recursive) or CSVs of paths -> list of row dicts."""
        return list(self.iter_predict(collect_inputs(list(inputs)), batch_size, top_k))

    def _row(self, record: Record, probs: np.ndarray | None, error: str, top_k: int, events: bool = False) -> dict:
        """One output row (every format is made from these; :func:`row_columns` lists its keys)."""
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
        if events:
            row["event"] = record.group or ""
        row["error"] = error
        return row

    def with_threshold(self, threshold: float | None) -> Predictor:
        """This predictor with one threshold for every class (``--threshold``), replacing stored ones."""
        check_threshold(threshold)
        if threshold is not None:
            self.thresholds = {label: float(threshold) for label in self.labels}
        return self


def row_columns(top_k: int, decision: bool = False, event: bool = False) -> list[str]:
    ranked = [f"{kind}_{r + 1}" for r in range(top_k) for kind in ("label", "prob")] if top_k > 1 else []
    return ["path", "label", "prob", *ranked, *(["decision"] if decision else []), *(["event"] if event else []),
            "error"]


def check_options(batch_size: int | None, top_k: int) -> None:
    """UserError for options that cannot work; called before any file is touched."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"--top-k must be at least 1, not {top_k}")


def predict_to_csv(predictor: Predictor, inputs: list[str | Path], out: str | Path, batch_size: int | None = None,
                   top_k: int = 1, progress: bool = True, resume: bool = False, overwrite: bool = False,
                   **options) -> dict:
    """:func:`predict_to_file` writing CSV whatever the extension of ``out``."""
    return predict_to_file(predictor, inputs, out, "csv", batch_size, top_k, progress, resume, overwrite, **options)


def predict_to_file(predictor: Predictor, inputs: list[str | Path], out: str | Path, format: str | None = None,
                    batch_size: int | None = None, top_k: int = 1, progress: bool = True, resume: bool = False,
                    overwrite: bool = False, events: bool = False, event_gap: float = DEFAULT_GAP,
                    aggregate: str | None = None, media: str | Path | None = None, sort_into: str | Path | None = None,
                    sort_mode: str = "link", shard: str | Shard | None = None, shard_by: str = "path") -> dict:
    """Write predictions to ``out`` row by row, in input order; returns counts and the files written.

    ``format`` (csv, jsonl, megadetector, camtrapdp; default from the extension
    of ``out``, :mod:`imgcls.prediction.outputs`).  Rows are flushed batch by batch, so a
    crash or Ctrl-C keeps every finished prediction.  An existing output is
    never replaced silently: ``resume`` keeps its rows and predicts the inputs
    after them, and ``overwrite`` starts it again; with neither it is an error
    (unless it is our header alone).  Options and inputs are checked before
    ``out`` is touched, and ``out`` is locked for the whole run.  The sidecar
    ``OUT.meta.json`` (:mod:`imgcls.prediction.fingerprint`) records the model and options
    before the first row; ``resume`` with another model or options is refused.

    Inputs are enumerated lazily (:func:`imgcls.data.sources.keyed_inputs`), so
    memory does not grow with their number; ``events`` and ``media`` need them
    all at once and hold one list.  ``shard`` (``"K/N"`` or a :class:`Shard`,
    ``shard_by`` path | folder): only that deterministic share of the inputs.

    ``events``: an ``event`` column from :func:`imgcls.data.events.group_events`
    (per camera folder, EXIF times within ``event_gap`` seconds); ``aggregate``
    (mean | max, implies events) also writes one row per event.  ``media``: a
    Camtrap DP media.csv whose IDs the camtrapdp output reuses.  ``sort_into``:
    afterwards, link (``sort_mode`` link) or copy every image into
    ``sort_into/<decision or label>/``.
    """
    check_options(batch_size, top_k)
    if aggregate is not None:
        check_aggregate(aggregate)
    shard = shard if isinstance(shard, Shard) else parse_shard(shard, shard_by)
    inputs = list(inputs)
    out = Path(out)
    fmt = outputs.resolve_format(out, format)
    task = tasks.TASKS[predictor.task]
    if task.row is not None and (fmt.whole or events or aggregate is not None or sort_into is not None):
        what = ("each label's probability and the set that passes" if task.label_sets
                else "each output's class and probabilities")
        raise UserError(f"a {task.name} model writes one row per image with {what}: --format csv or jsonl, without"
                        f" --events, --aggregate or --sort-into (asked: {fmt.name})")
    if task.heads and predictor.thresholds:
        raise UserError("--threshold and stored thresholds decide one class per image; a multioutput model's rows"
                        " give each output's class and probability (leave out --threshold)")
    if media is not None and fmt.name != "camtrapdp":
        raise UserError(f"--media applies to the Camtrap DP output (--format camtrapdp), not {fmt.name}")
    if sort_into is not None:
        if sort_mode not in outputs.SORT_MODES:
            raise UserError(f"unknown sort mode {sort_mode!r}; use {' or '.join(outputs.SORT_MODES)}")
        outputs.check_sort_into(sort_into, inputs)
    events = events or aggregate is not None
    if fmt.name == "camtrapdp" and events and aggregate is None:
        aggregate = "mean"  # Camtrap DP has event-level observations: events on means event rows
    if events and shard is not None and shard.by != "folder":
        log.warning("--shard %s by path may put the frames of one capture event in two shards; --shard-by folder"
                    " keeps each camera folder (and its events) in one shard", shard)
    folders: set[str] = set()  # every folder of the inputs, this shard's or not, once the walk is done
    records, total = _inputs(inputs, shard, folders)
    table = None
    if events or media is not None:  # both need every input at once: one list
        records = list(records)
        total = (lambda n: lambda: n)(len(records))
        table = outputs.read_media(media, records) if media is not None else None
        if events:
            records, report = group_events(records, event_gap, others=folders)
            log.info("capture events: %d in %d images (%d frames timed by EXIF, %d by file time)", report.events,
                     len(records), report.from_exif, report.from_mtime)
        records = iter(records)
    labels = predictor.labels
    # final files and event rows are made from the rows alone: they keep every class's probability
    top_k = len(labels) if fmt.whole or aggregate else min(top_k, len(labels))
    columns = (task.columns(labels) if task.columns is not None
               else row_columns(top_k, bool(predictor.thresholds), events))
    outputs.check_output_path(out, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    row_path = outputs.journal_path(out) if fmt.whole else out
    rows_file = fmt.rows(row_path, columns, _is_our_header)
    meta = fingerprint.build(
        predictor.model_meta(),
        {"format": fmt.name, "top_k": top_k, "thresholds": dict(predictor.thresholds) or None, "events": events,
         "event_gap": event_gap if events else None, "aggregate": aggregate,
         "media": str(media) if media is not None else None},
        {"inputs": [str(i) for i in inputs]}, shard.to_dict() if shard else None, __version__,
        [str(f) for f in outputs.output_files(out, fmt, aggregate)])
    single = Path(inputs[0]) if len(inputs) == 1 and Path(inputs[0]).is_dir() else None
    job = outputs.Job(out, fmt, list(labels), predictor.classifier_name(), dict(predictor.thresholds), [],
                      aggregate, table, single, __version__, fingerprint=meta["fingerprint"], folders=folders)
    batch_size = predictor.batch_size if batch_size is None else batch_size
    result = {"images": 0, "errors": 0, "kept": 0, "out": str(out), "format": fmt.name, "files": [], "sorted": None,
              "meta": str(fingerprint.meta_path(out)), "shard": str(shard) if shard else None}
    with output_lock(out):
        old = None if overwrite else fingerprint.read(out)  # --overwrite replaces even a damaged sidecar
        kept = rows_file.keep(records, resume, overwrite, lambda: _check_meta(out, old, meta))
        if fmt.whole and outputs.check_final(job, row_path.exists(), resume, overwrite, total):
            _check_meta(out, old, meta)
            log.info("%s is finished (its journal is gone); nothing to resume", out)
            count = total()
            if not (old or {}).get("complete"):  # killed between the final file and its sidecar
                fingerprint.write(out, {**(old or meta), "complete": True, "rows": count})
            return {**result, "kept": count, "files": [str(out)]}
        if kept:
            log.info("resuming %s: its %d rows are the first %d inputs, skipped", row_path, kept, kept)
        if kept and (old is None or "rows_before_meta" in old):  # rows no sidecar vouches for
            meta["rows_before_meta"] = kept if old is None else old["rows_before_meta"]
        fingerprint.write(out, meta)  # before the first row; "complete" only once the run has finished
        result["kept"] = kept
        result["images"], result["errors"] = _write_rows(predictor, records, rows_file, kept, batch_size, top_k,
                                                         events, progress, total)
        rows = rows_file.read() if fmt.whole or aggregate or sort_into is not None else None
        if fmt.whole:
            job.records = [Record(Path(row["path"]), group=row.get("event")) for row in rows]
            files = fmt.final(job, rows)
            row_path.unlink()  # after the final file is in place: a kill before this resumes from the journal
        else:
            files = [out, *(fmt.events(job, rows) if aggregate else [])]
        result["files"] = [str(f) for f in files]
        fingerprint.write(out, {**meta, "complete": True, "rows": kept + result["images"]})
        outputs.remove_stale_temps([*map(Path, meta["files"]), fingerprint.meta_path(out)])
    if sort_into is not None:
        result["sorted"] = outputs.sort_into(rows, sort_into, sort_mode)
    return result


def _inputs(inputs: list, shard: Shard | None, folders: set[str]):
    """(a lazy iterator of the records to predict, a function counting them by a second walk); a
    UserError when the inputs hold no image at all (an empty shard is a legitimate, empty output).
    ``folders`` fills with the folder of every input image as the walk passes it, in a shard or not."""
    keyed = keyed_inputs(inputs)
    head = next(keyed, None)
    if head is None:
        raise UserError(f"no images found in {', '.join(map(str, inputs))}")

    def noted(pairs):
        last = None
        for record, key in pairs:
            folder = os.path.dirname(os.path.abspath(record.path))
            if folder != last:  # a folder's files come together: one set lookup per folder, not per file
                folders.add(folder)
                last = folder
            yield record, key

    records = select(noted(chain([head], keyed)), shard)
    return records, lambda: sum(1 for _ in select(keyed_inputs(inputs), shard))


def _check_meta(out: Path, old: dict | None, new: dict) -> None:
    if old is None:
        log.warning("%s has rows but no %s (an older imgcls wrote it): resuming without checking that the same"
                    " model wrote them", out, fingerprint.meta_path(out).name)
        return
    fingerprint.check_resume(out, old, new)


def _write_rows(predictor: Predictor, records: Iterator[Record], rows_file, kept: int, batch_size: int, top_k: int,
                events: bool, progress: bool, total: Callable[[], int] | None = None) -> tuple[int, int]:
    done = errors = 0
    with rows_file.open(kept) as writer:
        bar = progress_bar(initial=kept, unit="img", desc="predict", disable=not progress, dynamic_ncols=True)
        if progress and total is not None:
            _count_in_background(bar, total)
        try:
            for row in predictor.iter_predict(records, batch_size, top_k, events=events):
                writer.write(row)
                done += 1
                errors += bool(row["error"])
                bar.update()
                if done % batch_size == 0:
                    writer.flush()
        except KeyboardInterrupt:
            log.warning("interrupted: %s holds %d predictions; run the same command with --resume to finish it",
                        rows_file.path, kept + done)
            raise
        finally:
            bar.close()
    return done, errors


def _count_in_background(bar, total: Callable[[], int]) -> None:
    """The bar shows the rate at once, and an ETA once a second walk over the inputs (names only, in a
    thread beside the prediction) has counted them."""
    def count():
        try:
            bar.total = total()
        except Exception:  # noqa: BLE001 - the count only feeds the bar; the prediction reports real errors
            pass

    threading.Thread(target=count, daemon=True, name="imgcls-count").start()


def _is_our_header(fields: list[str]) -> bool:
    decision, event = "decision" in fields, "event" in fields
    ranked = (len(fields) - 4 - decision - event) // 2
    return fields in (row_columns(1, decision, event), row_columns(max(2, ranked), decision, event)) \
        or tasks.is_label_set_header(fields) or tasks.is_output_header(fields)


# --------------------------------------------------------------------------- loading


def _torch_predictor(weights: Path, device: str = "auto") -> Predictor:
    from ..models.classifier import Classifier  # torch: only for the torch backend

    if device == "auto":
        device = resolve_device("auto")
    classifier, meta = Classifier.from_file(weights)
    engine = TorchEngine(classifier, device=device)
    return Predictor(engine, list(meta["labels"]), classifier.preprocess, meta["model"], f"torch ({engine.device})",
                     GPU_BATCH if engine.device.type == "cuda" else CPU_BATCH, tasks.thresholds_of(meta),
                     task=tasks.of(meta).name, label_sep=tasks.sep_of(meta),
                     temperature=check_temperature(meta.get("temperature", 1.0), f"{weights} (its metadata)"))


def _onnx_predictor(path: Path, threads: int | None = None) -> Predictor:
    engine = OnnxEngine(path, threads=threads)
    if not engine.labels or engine.preprocess is None:
        raise UserError(f"{path}: this ONNX file carries no imgcls labels/preprocessing; export it with `imgcls export`")
    on_gpu = "CUDAExecutionProvider" in engine.providers
    precision = "int8" if "imgcls.quantization" in engine.metadata.get("props", {}) else "fp32"
    return Predictor(engine, list(engine.labels), engine.preprocess, engine.metadata.get("model") or "",
                     f"onnxruntime {precision} ({path.name})", GPU_BATCH if on_gpu else CPU_BATCH,
                     tasks.thresholds_of(engine.metadata),
                     task=tasks.of(engine.metadata).name, label_sep=tasks.sep_of(engine.metadata),
                     temperature=engine.metadata.get("temperature", 1.0), model_file=str(path))


# int8 runs on ONNX Runtime on CPUs; a GPU keeps fp32
PRECISIONS = ("auto", "int8", "fp32")


def _run_onnx_file(run: Path, precision: str) -> Path:
    """The ONNX file of a run directory for ``precision`` (auto: int8 when the run has one)."""
    int8, fp32 = run / rundir.INT8, run / rundir.ONNX
    if precision == "int8" and not int8.exists():
        raise UserError(f"{run} has no {rundir.INT8} (an older run, or int8 lost more than 1 point of validation"
                        f" accuracy: see {rundir.EXPORT}); make one with `imgcls export {run} --int8`, or use"
                        " --precision fp32")
    if precision != "fp32" and int8.exists():
        return int8
    if not fp32.exists():
        raise UserError(f"{run} has no {rundir.ONNX}; create it with `imgcls export {run}`")
    if precision == "auto":
        log.info("%s has no %s (an older run, or int8 refused by its accuracy gate); using fp32 %s", run,
                 rundir.INT8, rundir.ONNX)
    return fp32


def load(path: str | Path, backend: str = "auto", device: str = "auto", precision: str = "auto",
         threads: int | None = None) -> Predictor:
    """A run directory, a ``model.safetensors`` or a ``model.onnx`` -> :class:`Predictor`.

    ``backend``: ``torch``, ``onnx`` or ``auto`` (ONNX Runtime on a CPU when the
    run holds an exported model, else torch).  ``precision`` of a run directory
    on ONNX Runtime: ``auto`` (its ``model.int8.onnx`` when training or
    ``imgcls export --int8`` kept one, else ``model.onnx``), ``int8`` or ``fp32``;
    torch is always fp32.  ``threads``: ONNX Runtime's intra-op threads (default: every usable CPU).
    """
    path = rundir.require_run_dir(path)
    if backend not in ("auto", "torch", "onnx"):
        raise UserError(f"unknown backend {backend!r}; use auto, torch or onnx")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "int8" and backend == "torch":
        raise UserError("--precision int8 runs on ONNX Runtime; leave out --backend torch")
    if path.is_file():
        if path.suffix == ".onnx":
            if backend == "torch":
                raise UserError(f"{path} is an ONNX file; it runs on --backend onnx only")
            predictor = _onnx_predictor(path, threads)
            if precision != "auto" and not predictor.backend.startswith(f"onnxruntime {precision}"):
                raise UserError(f"{path} is not an {precision} model; give the run directory or the"
                                f" {rundir.INT8 if precision == 'int8' else rundir.ONNX} file")
            return replace(predictor, source=str(path))
        if path.suffix == ".safetensors":
            if precision == "int8":
                raise UserError(f"{path} holds fp32 weights; give the run directory or its {rundir.INT8}")
            return replace(_torch_predictor(path, device), source=str(path), model_file=str(path))
        raise UserError(f"{path}: expected a run directory, a .safetensors or an .onnx file")
    has_onnx = (path / rundir.ONNX).exists() or (path / rundir.INT8).exists()
    on_cpu = device in ("auto", "cpu") and not cuda_available()
    if backend == "onnx" or precision == "int8" or (backend == "auto" and has_onnx and on_cpu):
        # int8 pays on CPUs; with a GPU at hand, --backend onnx stays fp32 unless asked
        predictor = _onnx_predictor(_run_onnx_file(path, precision if on_cpu or precision != "auto" else "fp32"), threads)
    else:
        predictor = _torch_predictor(path / rundir.WEIGHTS, device)
        predictor.model_file = str(path / rundir.WEIGHTS)
    predictor.thresholds = load_thresholds(path) or predictor.thresholds  # `imgcls thresholds`, training's
    predictor.temperature = run_temperature(path, predictor.temperature)  # the run's calibration.json wins
    predictor.source = str(path)
    return predictor
