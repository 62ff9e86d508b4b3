"""Torch and ONNX Runtime behind one call: ``engine(uint8 batch) -> logits``.

Every engine is a callable ``engine(batch) -> np.ndarray float32 (N, K)`` for a
batch ``(N, 3, S, S)`` of uint8 pixels (float batches in [0, 255] are accepted
too), so prediction code never knows which backend runs.

* :class:`OnnxEngine` runs an exported ``model.onnx`` with ONNX Runtime.  This
  module does **not** import torch for it (the prediction runtime installs
  without torch); torch is imported lazily inside :class:`TorchEngine` only.
* :class:`TorchEngine` runs a :class:`~imgcls.models.classifier.Classifier`
  in eval/inference mode: fp32 + channels_last on CPU, channels_last +
  autocast (bf16, else fp16) on CUDA.
* :func:`read_onnx_metadata` reads the labels / preprocess spec / model name /
  imgcls version that :func:`imgcls.export.export_onnx` stores in the file's
  ``metadata_props`` (through ONNX Runtime: no torch, no ``onnx`` package).
* :func:`stream_logits` is the one decode -> engine loop: records in, one
  ``(record, logits or None, error)`` per record out, for prediction,
  evaluation and the int8 gate alike.

Why the CPU allocator matters: glibc serves big blocks (activations of a
batch) with fresh ``mmap`` pages and returns them on ``free``, so every
forward pass page-faults its activations in again, which makes PyTorch eager
much slower (docs/decisions.md).  :func:`tune_cpu_allocator` (called by
:class:`TorchEngine` on CPU unless told not to) keeps freed memory in the
process instead, as a caching allocator (or jemalloc via ``LD_PRELOAD``)
would.  ONNX Runtime has its own arena and does not need it.
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import UserError, first_line
from ..system import available_cpus, default_workers

if TYPE_CHECKING:
    from ..data.preprocess import Preprocess
    from ..data.records import Record

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
META_LABELS = "imgcls.labels"
META_PREPROCESS = "imgcls.preprocess"
META_MODEL = "imgcls.model"
META_VERSION = "imgcls.version"
META_TEMPERATURE = "imgcls.temperature"  # temperature scaling fitted on val (imgcls.evaluation.calibration); absent: 1


def imgcls_version() -> str:
    try:
        from importlib.metadata import version

        return version("imgcls")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


# ----------------------------------------------------------------------------- metadata


def _not_onnx(name: str, reason: str, head: bytes = b"") -> UserError:
    if head.startswith(b"version https://git-lfs"):
        return UserError(f"{name} is not a valid ONNX model: it is a Git LFS pointer; run `git lfs pull` to fetch the file")
    return UserError(
        f"{name} is not a valid ONNX model ({reason}); the file is corrupt or truncated,"
        " export it again with `imgcls export`"
    )


def _head(path_or_bytes, n: int = 64) -> bytes:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes[:n])
    try:
        with open(path_or_bytes, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _open_session(path_or_bytes: str | Path | bytes, options, providers: list[str]):
    """(ONNX Runtime session, display name), with user-facing errors for missing or corrupt files."""
    import onnxruntime as ort

    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        source, name = bytes(path_or_bytes), "<bytes>"
    else:
        path = Path(path_or_bytes)
        if not path.is_file():
            raise UserError(f"ONNX model {path} not found; pass the path of an exported model.onnx")
        source, name = str(path), str(path)
    try:
        return ort.InferenceSession(source, options, providers=providers), name
    except Exception as e:  # ORT raises its own Fail / InvalidProtobuf / InvalidGraph types
        first = first_line(e)
        raise _not_onnx(name, first[:300], _head(source)) from None


def read_onnx_props(path_or_bytes: str | Path | bytes) -> dict[str, str]:
    """All ``metadata_props`` of an ONNX file (or its bytes), as ONNX Runtime reads them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only reading metadata
    options.log_severity_level = 3
    session, _ = _open_session(path_or_bytes, options, ["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def decode_metadata(props: dict[str, str], source: str = "the model") -> dict[str, Any]:
    """imgcls metadata_props -> ``{labels, preprocess, temperature, model, version, props}``.

    ``labels`` is a list of str (None when absent), ``preprocess`` the
    :meth:`Preprocess.to_dict` dict (None when absent), ``props`` every
    metadata entry as stored.  ``source`` (the file) starts every error message.
    """
    fix = "export the model again with `imgcls export`"

    def _json(key):
        if key not in props:
            return None
        try:
            return json.loads(props[key])
        except (json.JSONDecodeError, RecursionError):
            raise UserError(f"{source}: the {key} metadata is not valid JSON; {fix}") from None

    labels = _json(META_LABELS)
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise UserError(f"{source}: the {META_LABELS} metadata must be a JSON list of strings; {fix}")
    preprocess = _json(META_PREPROCESS)
    if preprocess is not None and not isinstance(preprocess, dict):
        raise UserError(f"{source}: the {META_PREPROCESS} metadata must be a JSON object; {fix}")
    from ..tasks import from_onnx_props  # NumPy only

    temperature = 1.0
    if META_TEMPERATURE in props:
        from ..evaluation.calibration import check_temperature  # NumPy only

        temperature = check_temperature(props[META_TEMPERATURE], f"{source} ({META_TEMPERATURE} metadata)", fix)
    return {
        "labels": labels,
        "preprocess": preprocess,
        "temperature": temperature,
        "model": props.get(META_MODEL),
        "version": props.get(META_VERSION),
        "props": dict(props),
        **from_onnx_props(props),  # task, label_sep
    }


def encode_metadata(labels, preprocess: dict, model_name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The metadata_props that :func:`read_onnx_metadata` reads back."""
    props = {
        META_LABELS: json.dumps([str(x) for x in labels], ensure_ascii=False),
        META_PREPROCESS: json.dumps(preprocess, sort_keys=True),
        META_MODEL: str(model_name),
        META_VERSION: imgcls_version(),
    }
    props.update(extra or {})
    return props


def temperature_metadata(meta: dict | None) -> dict[str, str]:
    """The ONNX metadata entry of the temperature in a model file's imgcls metadata (none when it has none)."""
    value = (meta or {}).get("temperature")
    return {} if value is None else {META_TEMPERATURE: repr(float(value))}


def read_onnx_metadata(path: str | Path | bytes) -> dict[str, Any]:
    """Labels, preprocess dict, model name and imgcls version of an exported file.

    Works without torch and without the ``onnx`` package.  Raises
    :class:`UserError` for a missing or corrupt file.
    """
    return decode_metadata(read_onnx_props(path), "<bytes>" if isinstance(path, (bytes, bytearray, memoryview))
                           else str(path))


# ----------------------------------------------------------------------------- shared input handling


def _check_batch(batch) -> np.ndarray:
    x = np.asarray(batch)
    if x.ndim == 3:
        raise ValueError(f"engine expects a batch (N, 3, S, S), got one image {x.shape}; use batch[None]")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"engine expects a batch (N, 3, S, S) in NCHW order, got shape {x.shape}")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"engine expects uint8 pixels (or float in [0, 255]), got dtype {x.dtype}")
    return x


class _Staging:
    """A reused host buffer for inputs that need a copy (wrong dtype, not contiguous).

    Writing into already-touched memory is several times faster than into
    fresh pages, so the buffer grows to the largest batch seen and stays.
    """

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self._buf: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.dtype == self.dtype and x.flags.c_contiguous:
            return x  # zero-copy
        if self._buf is None or self._buf.shape[1:] != x.shape[1:] or self._buf.shape[0] < x.shape[0]:
            self._buf = np.empty(x.shape, self.dtype)
        out = self._buf[: x.shape[0]]
        if self.dtype == np.uint8 and x.dtype != np.uint8:  # float pixels -> nearest uint8
            np.rint(np.clip(x, 0, 255), out=out, casting="unsafe")
        else:
            np.copyto(out, x, casting="unsafe")
        return out


# ----------------------------------------------------------------------------- ONNX Runtime


class OnnxEngine:
    """An exported ``model.onnx`` in ONNX Runtime: ``engine(uint8 batch) -> logits``.

    ``device``: ``"cpu"`` (default), ``"cuda"`` (CUDAExecutionProvider; a
    UserError when this onnxruntime build has none) or ``"auto"`` (CUDA when
    available).  ``threads``: intra-op threads, default every CPU this process
    may use (:func:`imgcls.system.available_cpus`); inter-op threads are 1 (one graph runs
    sequentially, so more would only oversubscribe the cores).  ``spin``:
    let idle intra-op threads busy-wait (ORT's default; off here, see below).

    Float batches are rounded to uint8 when the model takes uint8 (all imgcls
    exports do).  Attributes: ``labels``, ``preprocess``
    (:class:`~imgcls.data.preprocess.Preprocess` or None), ``metadata``
    (see :func:`read_onnx_metadata`), ``input_size``, ``num_classes``,
    ``providers``.
    """

    def __init__(
        self,
        path_or_bytes: str | Path | bytes,
        threads: int | None = None,
        device: str = "cpu",
        spin: bool = False,
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.threads = int(threads) if threads else available_cpus()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # idle workers sleep instead of spinning: spinning steals the cores the decode threads and
        # other processes need, and only pays off at batch 1 (docs/decisions.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.log_severity_level = 3  # errors only; warnings about unused initializers are noise

        available = ort.get_available_providers()
        if device not in ("cpu", "cuda", "auto"):
            raise UserError(f"unknown device {device!r} for ONNX Runtime; use cpu, cuda or auto")
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise UserError(
                "device cuda asked for, but this onnxruntime has no CUDAExecutionProvider;"
                " install onnxruntime-gpu or use --device cpu"
            )
        use_cuda = device in ("cuda", "auto") and "CUDAExecutionProvider" in available
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        self.session, self.name = _open_session(path_or_bytes, options, providers)
        name = self.name
        self.providers = self.session.get_providers()

        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise UserError(f"{name} has {len(inputs)} inputs; an imgcls model takes one image batch")
        self._input = inputs[0].name
        self._output = outputs[0].name
        self._input_uint8 = inputs[0].type == "tensor(uint8)"
        self._staging = _Staging(np.uint8 if self._input_uint8 else np.float32)
        shape = inputs[0].shape
        self.input_size = shape[-1] if isinstance(shape[-1], int) else None
        out_shape = outputs[0].shape
        self.num_classes = out_shape[-1] if isinstance(out_shape[-1], int) else None

        # everything the file says is checked here, at load, not mid-run
        self.metadata = decode_metadata(dict(self.session.get_modelmeta().custom_metadata_map), name)
        self.labels: list[str] | None = self.metadata["labels"]
        from ..tasks import output_count  # NumPy only

        outputs = None if self.labels is None else output_count(self.metadata, len(self.labels))
        if outputs is not None and self.num_classes is not None and outputs != self.num_classes:
            task = "" if outputs == len(self.labels) else f" (a {self.metadata['task']} model of them has {outputs})"
            raise UserError(f"{name}: its {META_LABELS} metadata names {len(self.labels)} classes but the model"
                            f" outputs {self.num_classes}{task}; export the model again with `imgcls export`")
        if self.num_classes is None and outputs is not None:
            self.num_classes = outputs
        self.preprocess = None
        if self.metadata["preprocess"] is not None:
            self.preprocess = _metadata_preprocess(self.metadata["preprocess"], name)
            if self.input_size is None:
                self.input_size = self.preprocess.input_size
            elif self.input_size != self.preprocess.input_size:
                raise UserError(f"{name}: its {META_PREPROCESS} metadata says {self.preprocess.input_size} px input"
                                f" but the model takes {self.input_size}; export the model again")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = _check_batch(batch)
        if self.input_size is not None and x.shape[2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.name} takes {self.input_size}x{self.input_size} images, got {x.shape[2]}x{x.shape[3]}"
            )
        if x.shape[0] == 0:
            return np.zeros((0, self.num_classes or 0), np.float32)
        (logits,) = self.session.run([self._output], {self._input: self._staging(x)})
        return np.asarray(logits, dtype=np.float32)

    def __repr__(self) -> str:
        return f"OnnxEngine({self.name!r}, threads={self.threads}, providers={self.providers})"


def _metadata_preprocess(data: dict, name: str):
    """The Preprocess of ONNX metadata, through the one loader of stored specs (names the file)."""
    from ..rundir import preprocess_from  # Pillow + NumPy + YAML: no torch

    return preprocess_from(data, f"{name} ({META_PREPROCESS} metadata)", "export the model again with `imgcls export`")


# ----------------------------------------------------------------------------- PyTorch

_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS.

    Sets ``M_MMAP_MAX = 0`` (big blocks come from the heap, not fresh mmap
    pages) and a 1 GiB ``M_TRIM_THRESHOLD`` (freed heap memory is not
    returned).  Process-wide and idempotent; the cost is that the process
    keeps its peak memory, as caching allocators do.  Returns False (and does
    nothing) when the C library is not glibc or jemalloc/tcmalloc is preloaded.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux") or any(
        lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")
    ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok


class TorchEngine:
    """A PyTorch classifier behind the engine call: ``engine(uint8 batch) -> logits``.

    ``module`` takes uint8 (or float in [0, 255]) NCHW and returns logits, as
    :class:`~imgcls.models.classifier.Classifier` does.  It is put in eval
    mode and moved to ``device``; runs under ``torch.inference_mode``.

    * CPU: fp32; ``channels_last`` on by default (faster with oneDNN on the
      reference machine: benchmarks/engines.py), and :func:`tune_cpu_allocator`
      unless ``tune_allocator=False``.  Numpy input is used zero-copy.
    * CUDA: channels_last and autocast (``amp="bf16"`` when supported, else
      ``"fp16"``; ``amp=None`` for fp32); inputs go through a reused pinned
      host buffer and a reused device buffer.

    Attributes: ``module``, ``device``, ``labels`` (optional, passed in).
    """

    def __init__(
        self,
        module,
        device: str = "cpu",
        channels_last: bool | None = None,
        amp: str | None = "auto",
        tune_allocator: bool = True,
        labels: list[str] | None = None,
    ):
        import torch  # only the torch engine needs it: ONNX prediction runs without torch

        self._torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
        cuda = self.device.type == "cuda"
        self.channels_last = True if channels_last is None else bool(channels_last)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.module = module.eval().to(self.device, memory_format=self.memory_format)
        self.labels = labels
        if amp == "auto":
            amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else None
        if amp not in (None, "bf16", "fp16"):
            raise UserError(f"unknown amp mode {amp!r}; use bf16, fp16 or none")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
        if self.device.type == "cpu" and tune_allocator:
            tune_cpu_allocator()
        self._host: Any = None  # pinned staging buffer (CUDA)
        self._dev: Any = None  # device buffer (CUDA)

    def _to_device(self, x: np.ndarray):
        torch = self._torch
        if x.dtype not in (np.uint8, np.float32):
            x = x.astype(np.float32)
        src = torch.from_numpy(np.ascontiguousarray(x))  # zero-copy for contiguous input
        cpu = self.device.type == "cpu"
        if cpu and not self.channels_last:
            return src
        # a reused buffer: CPU -> channels_last layout; CUDA -> pinned host copy
        if self._host is None or self._host.dtype != src.dtype or self._host.shape[1:] != src.shape[1:] \
                or self._host.shape[0] < src.shape[0]:
            if cpu:
                self._host = torch.empty(src.shape, dtype=src.dtype).contiguous(memory_format=self.memory_format)
            else:
                self._host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
                self._dev = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        n = src.shape[0]
        host = self._host[:n]
        host.copy_(src)
        if cpu:
            return host
        dev = self._dev[:n]
        dev.copy_(host, non_blocking=True)
        return dev.contiguous(memory_format=self.memory_format) if self.channels_last else dev

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = _check_batch(batch)
        with torch.inference_mode():
            t = self._to_device(x)
            if self.amp_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.amp_dtype):
                    logits = self.module(t)
            else:
                logits = self.module(t)
            return logits.float().cpu().numpy()

    def __repr__(self) -> str:
        return f"TorchEngine(device={self.device}, channels_last={self.channels_last}, amp={self.amp_dtype})"



# ----------------------------------------------------------------------------- streaming


def stream_logits(
    engine: Callable[[np.ndarray], np.ndarray],
    preprocess: Preprocess,
    records: Iterable[Record],
    batch_size: int,
    workers: int | None = None,
) -> Iterator[tuple[Record, np.ndarray | None, str]]:
    """Yield ``(record, logits row (K,) or None, error)`` per record, in input order.

    Images are decoded with ``preprocess`` in a pool of ``workers`` threads
    (default :func:`imgcls.system.default_workers`; Pillow and simplejpeg
    release the GIL) a few batches ahead of ``engine``, through a bounded
    window, so memory stays flat however many records there are.  A record
    that cannot be decoded gets ``None`` and the decoder's reason and never
    stops the stream.  ``engine`` is called with uint8 batches of at most
    ``batch_size`` decoded images.
    """
    from ..data.decode import ImageError, load_uint8  # Pillow: only when images are decoded

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    workers = workers or default_workers()

    def decode(record: Record):
        try:
            return load_uint8(record.path, preprocess), ""
        except ImageError as err:  # every decoding failure, missing files included
            return None, err.reason

    window = max(2, workers) * batch_size  # decoded images in flight, bounded
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        feed = iter(records)

        def refill():
            for record in feed:
                pending.append((record, pool.submit(decode, record)))
                if len(pending) >= window:
                    return

        refill()
        while pending:
            batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            refill()
            decoded = [(record, *future.result()) for record, future in batch]
            good = [array for _, array, _ in decoded if array is not None]
            rows = iter(np.asarray(engine(np.stack(good))) if good else ())
            for record, array, error in decoded:
                yield record, (None if array is None else next(rows)), error
