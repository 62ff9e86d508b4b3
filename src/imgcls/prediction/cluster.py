"""The predictor on a Ray cluster: ``imgcls predict RUN INPUTS --out OUT --ray [ADDRESS]``.

:func:`ray_predictor` wraps a loaded :class:`~imgcls.prediction.predict.Predictor` in a
:class:`RayPredictor` whose ``iter_logits`` (the one seam every output writer
consumes) runs on Ray Data: the input paths with their positions become a
dataset, ``map_batches`` sends chunks of them to a fixed pool of actors that
load the model once each and run :func:`imgcls.prediction.engines.stream_logits` (the
same decode and engine as a local run, so the rows are the same), and the
results come back through a streaming iterator in input order.  Labels,
thresholds and the rows themselves stay on the driver, so the writers, their
batch-by-batch flushes and the position-keyed ``--resume`` work exactly as
locally (the writers hand ``iter_logits`` only the inputs not yet written).

Ray is an optional extra (``pip install "imgcls[cluster]"``) and is imported
inside functions; the workers must be able to import imgcls and read the
input paths and the model file (a shared file system on a multi-node cluster).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .. import rundir
from ..data.records import Record
from ..errors import UserError
from ..system import available_cpus
from .engines import OnnxEngine, stream_logits
from .predict import GPU_BATCH, Predictor

log = logging.getLogger("imgcls")

INSTALL = 'pip install "imgcls[cluster]"'
LOCAL = "local"                # --ray without an address: a cluster of this machine, started here
CHUNK_BATCHES = 8              # engine batches per actor call: long enough to keep decode and engine overlapped,
                               # short enough that rows reach the output soon after the first images are done
WINDOW = 100_000               # inputs held on the driver at a time: memory stays flat in the number of files,
                               # at the cost of one actor pool start per window


def require_ray():
    """``ray`` with Ray Data, or a UserError saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra is ray[data]: pandas/pyarrow come with it)
    except ImportError:
        raise UserError(f"--ray needs Ray Data, which is not installed; install it with: {INSTALL}") from None
    return ray


# --------------------------------------------------------------------------- what the actors load


@dataclass(frozen=True)
class ModelFiles:
    """The files an actor may load, absolute (the actors' working directory is not ours)."""

    onnx: str | None = None
    weights: str | None = None
    prefer: str = "onnx"       # the engine the local predictor runs: the CPU actors run the same one


def model_files(predictor: Predictor, model_path: str | Path | None = None) -> ModelFiles:
    path = Path(model_path or predictor.source)
    if not str(path) or not path.exists():
        raise UserError(f"--ray: the model {str(path)!r} is not a file or run directory the workers can load")
    path = path.resolve()
    if path.is_dir():  # the ONNX file the predictor chose (int8 or fp32), so the actors run what runs locally
        chosen = Path(predictor.model_file) if predictor.model_file.endswith(".onnx") else None
        onnx, weights = (chosen.resolve() if chosen else path / rundir.ONNX), path / rundir.WEIGHTS
    else:
        onnx, weights = (path, None) if path.suffix == ".onnx" else (None, path)
    onnx = str(onnx) if onnx is not None and onnx.exists() else None
    weights = str(weights) if weights is not None and weights.exists() else None
    prefer = "onnx" if predictor.backend.startswith("onnxruntime") else "torch"
    if (prefer == "onnx" and onnx is None) or (prefer == "torch" and weights is None):
        raise UserError(f"--ray: {path} has no model file the workers can load")
    return ModelFiles(onnx, weights, prefer)


def _onnx_engine(files: ModelFiles, threads: int, gpu: bool):
    if files.onnx is None:
        return None
    import onnxruntime as ort

    if gpu and "CUDAExecutionProvider" not in ort.get_available_providers():
        return None  # this node's onnxruntime has no CUDA: the torch engine may
    return OnnxEngine(files.onnx, threads=threads, device="cuda" if gpu else "cpu")


def _torch_engine(files: ModelFiles, threads: int, gpu: bool):
    if files.weights is None:
        return None
    import torch

    from .engines import TorchEngine
    from ..models.classifier import Classifier  # torch: only where the torch engine runs

    torch.set_num_threads(threads)
    classifier, _ = Classifier.from_file(files.weights)
    return TorchEngine(classifier, device="cuda" if gpu else "cpu")


# engines an actor tries in turn: on a GPU ORT's CUDA provider first, else torch on CUDA
ENGINES = {"onnx": _onnx_engine, "torch": _torch_engine}
ORDER = {False: {"onnx": ("onnx",), "torch": ("torch",)}, True: {"onnx": ("onnx", "torch"), "torch": ("torch", "onnx")}}


class PredictActor:
    """One Ray Data actor: loads the model once, then decodes and scores chunks of paths."""

    def __init__(self, files: ModelFiles, preprocess, num_classes: int, batch_size: int, cpus: float, gpu: bool):
        threads = max(1, int(cpus))
        for name in ORDER[gpu][files.prefer]:
            self.engine = ENGINES[name](files, threads, gpu)
            if self.engine is not None:
                break
        else:
            raise RuntimeError(f"no engine for {files} on this {'GPU' if gpu else 'CPU'} worker")
        self.preprocess, self.num_classes, self.batch_size, self.workers = preprocess, num_classes, batch_size, threads

    def __call__(self, batch: dict) -> dict:
        records = [Record(Path(os.fsdecode(p))) for p in batch["path"]]
        logits = np.full((len(records), self.num_classes), np.nan, np.float32)
        errors = []
        for i, (_, row, error) in enumerate(stream_logits(self.engine, self.preprocess, records, self.batch_size,
                                                          self.workers)):
            if row is not None:
                logits[i] = row
            errors.append(error)
        return {"index": np.asarray(batch["index"]), "logits": logits, "error": np.array(errors, dtype=object)}


# --------------------------------------------------------------------------- the predictor


@dataclass
class RayPredictor(Predictor):
    """A :class:`Predictor` whose ``iter_logits`` runs on a Ray cluster (see the module docstring)."""

    files: ModelFiles | None = None
    address: str = LOCAL
    actors: int | None = None           # default: the cluster's CPUs / cpus_per_actor (GPUs / gpus_per_actor)
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None  # default: 1 on a CPU actor; a GPU actor its node's CPUs per GPU share

    def iter_logits(self, records: Iterable[Record], batch_size: int | None = None,
                    workers: int | None = None) -> Iterator[tuple[Record, np.ndarray | None, str]]:
        records = iter(records)  # the writers pass only the inputs still to do (--resume)
        window = list(islice(records, WINDOW))
        if not window:
            return
        batch_size = self.batch_size if batch_size is None else batch_size
        with connect(self.address) as ray:
            while window:
                yield from self._window(ray, window, batch_size)
                window = list(islice(records, WINDOW))

    def _window(self, ray, records: list[Record], batch_size: int) -> Iterator[tuple[Record, np.ndarray | None, str]]:
        """One window of the inputs through a fresh actor pool."""
        actors, cpus = self._actors(ray), self._cpus(ray)
        chunk = max(1, min(batch_size * CHUNK_BATCHES, math.ceil(len(records) / actors)))  # every actor busy
        actors = min(actors, math.ceil(len(records) / chunk))  # no actor without a chunk
        dataset = _dataset(ray, records, chunk)
        dataset = dataset.map_batches(
            PredictActor, batch_size=chunk, batch_format="numpy",
            fn_constructor_kwargs=dict(files=self.files, preprocess=self.preprocess, num_classes=len(self.labels),
                                       batch_size=batch_size, cpus=cpus, gpu=self.gpus_per_actor > 0),
            num_cpus=cpus, num_gpus=self.gpus_per_actor or None, **_pool(ray, actors))
        log.info("ray: %d images on %d actors (%g CPU%s)", len(records), actors, cpus,
                 f", {self.gpus_per_actor:g} GPU each" if self.gpus_per_actor else " each")
        # no prefetch: with it, a finished chunk is handed over only once the next one is done too
        yield from _in_order(records, dataset.iter_batches(batch_size=None, batch_format="numpy",
                                                           prefetch_batches=0))

    def _cpus(self, ray) -> float:
        """CPUs per actor: given, else 1 on a CPU actor; a GPU actor gets its share of the CPUs of the GPU node with
        the fewest per GPU, for the decoding that keeps a GPU busy."""
        if self.cpus_per_actor is not None or not self.gpus_per_actor:
            return self.cpus_per_actor or 1.0
        shares = [node["Resources"].get("CPU", 0) / node["Resources"]["GPU"] for node in ray.nodes()
                  if node.get("Alive") and node["Resources"].get("GPU")]
        return float(max(1, math.floor(min(shares, default=1) * self.gpus_per_actor)))

    def _actors(self, ray) -> int:
        have = ray.cluster_resources()
        kind, per = ("GPU", self.gpus_per_actor) if self.gpus_per_actor > 0 else ("CPU", self._cpus(ray))
        total = float(have.get(kind, 0))
        fit = int(total // per + 1e-9)
        if fit < 1:
            raise UserError(f"the Ray cluster has {total:g} {kind}s; an actor needs {per:g}"
                            + (": lower --ray-gpus-per-actor, or use a cluster with GPUs" if kind == "GPU" else ""))
        actors = self.actors or fit
        if actors > fit:
            raise UserError(f"--ray-actors {actors} needs {actors * per:g} {kind}s but the Ray cluster has {total:g};"
                            f" use --ray-actors {fit} or fewer")
        return actors


def ray_predictor(predictor: Predictor, model_path: str | Path | None = None, address: str | None = None,
                  actors: int | None = None, gpus_per_actor: float = 0.0,
                  cpus_per_actor: float | None = None) -> RayPredictor:
    """``predictor`` with its ``iter_logits`` on a Ray cluster: ``address`` (default: a local cluster started when
    the first image is predicted, shut down after the last), ``actors`` model copies (default: as many as the
    cluster's CPUs, or GPUs, allow), each with ``gpus_per_actor`` GPUs and ``cpus_per_actor`` CPUs (its decode
    threads; default 1 on a CPU actor, a GPU actor's share of its node's CPUs).

    ``model_path``: what the actors load (default: where ``predictor`` was loaded from, a run directory or a model
    file).  A UserError when Ray is not installed or an option cannot work.
    """
    require_ray()
    if actors is not None and (isinstance(actors, bool) or actors < 1):
        raise UserError(f"--ray-actors must be at least 1, not {actors}")
    if gpus_per_actor < 0:
        raise UserError(f"--ray-gpus-per-actor must be 0 or more, not {gpus_per_actor}")
    if cpus_per_actor is not None and not cpus_per_actor > 0:
        raise UserError(f"CPUs per actor must be more than 0, not {cpus_per_actor}")
    if address not in (None, LOCAL):
        _check_reachable(address)  # before any output is touched
    base = {f.name: getattr(predictor, f.name) for f in fields(Predictor) if f.init}  # not its cached hash
    base["backend"] = f"ray ({predictor.backend})"
    if gpus_per_actor > 0:
        base["batch_size"] = GPU_BATCH  # the default batch of the actors' device, not of this machine's
    return RayPredictor(**base, files=model_files(predictor, model_path), address=address or LOCAL, actors=actors,
                        gpus_per_actor=float(gpus_per_actor), cpus_per_actor=cpus_per_actor)


# --------------------------------------------------------------------------- Ray plumbing


@contextmanager
def connect(address: str = LOCAL):
    """Ray, initialized: an existing connection as it is, else ``address`` (``local``: a cluster of this machine's
    usable CPUs, started here and shut down on the way out, Ctrl-C included)."""
    ray = require_ray()
    if ray.is_initialized():  # the caller's own Ray (a notebook, a test): used, left running
        with _quiet_data(ray):
            yield ray
        return
    options = dict(logging_level=_ray_level(), log_to_driver=False)
    t0 = time.perf_counter()
    try:
        if address == LOCAL:
            cpus = available_cpus()
            ray.init(address=LOCAL, num_cpus=cpus, include_dashboard=False, **options)
            log.info("ray: started a local cluster with %d CPUs in %.1f s", cpus, time.perf_counter() - t0)
        else:
            _check_reachable(address)
            ray.init(address=address, **options)
            log.info("ray: connected to %s (%g CPUs, %g GPUs) in %.1f s", address,
                     ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0),
                     time.perf_counter() - t0)
    except ConnectionError as err:
        raise UserError(f"--ray {address}: no Ray cluster answers there ({str(err).splitlines()[0]}); start one"
                        " with `ray start --head`, or give --ray alone for a cluster of this machine") from None
    try:
        with _quiet_data(ray):
            yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A UserError now when nothing listens at ``host:port`` (``ray://host:port`` too): Ray itself retries for
    minutes, deaf to Ctrl-C.  ``auto`` and other forms go to Ray as they are."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"--ray {address}: no Ray cluster answers there ({err.strerror or err}); start one with"
                        " `ray start --head`, or give --ray alone for a cluster of this machine") from None


@contextmanager
def _quiet_data(ray):
    """Ray Data's settings for our datasets, restored afterwards (a caller's session keeps its own)."""
    context = ray.data.DataContext.get_current()
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    saved = context.execution_options.preserve_order, context.enable_progress_bars, [g.level for g in loggers]
    context.execution_options.preserve_order = True  # rows are written in input order, batch by batch
    context.enable_progress_bars = False  # predict has its own bar
    for logger in loggers:
        logger.setLevel(_ray_level())
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved[:2]
        for logger, level in zip(loggers, saved[2]):
            logger.setLevel(level)


def _ray_level() -> int:
    """Ray's own log lines (start-up notices, tips) only under ``-v``; its errors always."""
    return logging.INFO if log.getEffectiveLevel() <= logging.DEBUG else logging.ERROR


def _dataset(ray, records: list[Record], chunk: int):
    """The inputs as a dataset of (index, path bytes), one block of ``chunk`` rows per actor call: a block is
    the unit Ray hands to a free actor and the unit of rows coming back.  Bytes, so file names that are not
    UTF-8 survive Arrow."""
    import pyarrow as pa  # comes with ray[data]

    paths = [os.fsencode(os.path.abspath(r.path)) for r in records]
    blocks = [pa.table({"index": pa.array(range(start, min(start + chunk, len(paths))), pa.int64()),
                        "path": pa.array(paths[start:start + chunk], pa.binary())})
              for start in range(0, len(paths), chunk)]
    return ray.data.from_arrow(blocks)


def _pool(ray, actors: int) -> dict:
    """A fixed pool of ``actors``, each sent one block at a time (a block goes to whichever actor is free, so
    an actor that starts late or a slow file does not hold back blocks queued behind it), in the spelling of
    the installed Ray (``compute=ActorPoolStrategy(size=)``; ``concurrency=`` in the releases that had it)."""
    accepts = inspect.signature(ray.data.ActorPoolStrategy.__init__).parameters
    if "size" not in accepts:  # pragma: no cover - no such Ray >= 2.9 known
        return {"concurrency": actors}
    one = {"max_tasks_in_flight_per_actor": 1} if "max_tasks_in_flight_per_actor" in accepts else {}
    return {"compute": ray.data.ActorPoolStrategy(size=actors, **one)}


def _in_order(records: list[Record], batches) -> Iterator[tuple[Record, np.ndarray | None, str]]:
    """Yield each record's result in input order as soon as it and all before it are back.  Ray Data keeps the
    order already (``preserve_order``); the buffer only makes that a checked fact rather than an assumption."""
    waiting: dict[int, tuple] = {}
    next_index = 0
    for batch in batches:
        for index, logits, error in zip(batch["index"], batch["logits"], batch["error"]):
            waiting[int(index)] = (None if error else np.asarray(logits, np.float32), str(error))
        while next_index in waiting:
            logits, error = waiting.pop(next_index)
            yield records[next_index], logits, error
            next_index += 1
    if next_index != len(records):
        raise RuntimeError(f"Ray returned {next_index} of {len(records)} results")
