"""ONNX export with metadata, a parity check against PyTorch, and int8 quantization.

``export_onnx`` writes one self-contained ``.onnx`` file whose input is the
uint8 batch ``images`` (N, 3, S, S) with a dynamic batch dimension and whose
output is ``logits`` (N, K); normalization is inside the graph (it is part of
:class:`~imgcls.models.classifier.Classifier`).  The file carries
``metadata_props``: ``imgcls.labels`` (JSON list), ``imgcls.preprocess``
(JSON of ``Preprocess.to_dict()``), ``imgcls.model`` and ``imgcls.version``,
so ``imgcls.prediction.engines.OnnxEngine(path)`` needs nothing else.

Exporter: the torch.export-based exporter (``dynamo=True``, opset 18) first,
the legacy TorchScript exporter (opset 17) as the fallback.  Both export
cifarnet, resnet18, timm tf_efficientnet_lite0 and convnext with the same
parity, but the dynamo graph runs faster in ONNX Runtime where a model pads
"same" (static padding instead of a computed Pad), and the TorchScript
exporter is deprecated since torch 2.9 (docs/decisions.md).

Parity rule: ``max |ort - torch| <= atol * max(1, max |torch logit|)`` with
``atol = 1e-4``, i.e. absolute 1e-4 for logits up to 1, relative to the largest
logit beyond that (float32 rounding grows with the magnitude of the sums).
A file that fails it is not written (an older file at the path stays).

int8: :func:`quantize_int8` = ``quant_pre_process`` + ``quantize_static``
(QDQ, per-channel int8 weights, uint8 activations, MinMax calibration on the
caller's uint8 batches), for a several times higher CPU throughput than fp32
(docs/decisions.md).  Use :func:`agreement` / :func:`compare_engines` to gate
it on validation data; :func:`export_run` gates it on a run's validation
split.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
import torch

from . import rundir
from .data.decode import ImageError, load_uint8
from .data.records import Record
from .errors import UserError, first_line
from .evaluation.metrics import metrics_of_stream
from .models.classifier import Classifier
from .prediction.engines import (INPUT_NAME, OUTPUT_NAME, OnnxEngine, encode_metadata, read_onnx_props,
                                 stream_logits, temperature_metadata)
from .tasks import of as of_task, onnx_props, output_count

PARITY_ATOL = 1e-4
DYNAMO_OPSET = 18
TORCHSCRIPT_OPSET = 17
_PROTOBUF_LIMIT = 2**31 - 1


class ExportError(UserError):
    """The exported file does not reproduce the PyTorch model (or could not be made)."""


def parity_tolerance(reference: np.ndarray, atol: float = PARITY_ATOL) -> float:
    """The allowed max abs difference for these reference logits (see module docstring)."""
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    return atol * max(1.0, scale)


def _cpu_eval_copy(classifier: torch.nn.Module) -> torch.nn.Module:
    """The module itself when it is on the CPU in fp32, else a CPU fp32 copy (the caller's stays)."""
    tensors = [*classifier.parameters(), *classifier.buffers()]
    if all(t.device.type == "cpu" and (not t.is_floating_point() or t.dtype == torch.float32) for t in tensors):
        return classifier
    return copy.deepcopy(classifier).to("cpu").float()


def _input_size(classifier) -> int:
    preprocess = getattr(classifier, "preprocess", None)
    if preprocess is None:
        raise UserError("export needs an imgcls Classifier (a network with its preprocess spec)")
    return int(preprocess.input_size)


def _random_batch(classifier, n: int = 4, seed: int = 0) -> np.ndarray:
    size = _input_size(classifier)
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def torch_logits(classifier: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    """Reference logits: eval mode, CPU, fp32, contiguous, inference_mode."""
    module = _cpu_eval_copy(classifier)
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(batch))).float().numpy()
    finally:
        module.train(was_training)


def parity(classifier: torch.nn.Module, onnx_path: str | Path | bytes, batch: np.ndarray) -> float:
    """Max abs difference between ONNX Runtime and PyTorch logits on ``batch`` (uint8 NCHW)."""
    batch = np.ascontiguousarray(batch)
    ref = torch_logits(classifier, batch)
    out = OnnxEngine(onnx_path)(batch)
    if out.shape != ref.shape:
        raise ExportError(f"ONNX logits have shape {out.shape}, PyTorch {ref.shape}")
    return float(np.abs(out - ref).max()) if ref.size else 0.0


# ----------------------------------------------------------------------------- export


def _export_dynamo(module, example: torch.Tensor, opset: int):
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},), opset_version=opset, verbose=False, optimize=True,
        )
    if program is None:
        raise RuntimeError("the dynamo exporter returned nothing")
    # into a protobuf ModelProto (weights inline; > 2 GB is handled on save)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        program.save(str(tmp_path), external_data=True)
        return onnx.load(str(tmp_path), load_external_data=True)


def _export_torchscript(module, example: torch.Tensor, opset: int):
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (example,), str(tmp_path), dynamo=False, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset, do_constant_folding=True,
            )
        return onnx.load(str(tmp_path), load_external_data=True)


_EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}
_DEFAULT_OPSET = {"dynamo": DYNAMO_OPSET, "torchscript": TORCHSCRIPT_OPSET}


def onnx_model(module, example: torch.Tensor, exporter: str = "torchscript", opset: int | None = None):
    """``module`` traced on ``example`` into an in-memory ONNX ModelProto, unchecked: for graphs that are
    not classifiers (training's trunk maps); :func:`export_onnx` is the one for models."""
    return _EXPORTERS[exporter](module, example, opset or _DEFAULT_OPSET[exporter])


def _set_metadata(model, props: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def stamp_metadata(path: str | Path, props: dict[str, str]) -> None:
    """Add or replace metadata entries of an exported file (the graph is untouched), atomically."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    _set_metadata(model, props)
    tmp = path.with_name(path.name + ".tmp")
    try:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_model(model, path: Path) -> None:
    """One self-contained file below the 2 GB protobuf limit, else weights in ``<name>.data``."""
    if model.ByteSize() < _PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=False)
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name.removesuffix(".tmp") + ".data")


def _check_parity(classifier, path: Path, batches: Sequence[np.ndarray], atol: float) -> float:
    worst = 0.0
    engine = OnnxEngine(path)
    for batch in batches:
        ref = torch_logits(classifier, batch)
        out = engine(batch)
        if out.shape != ref.shape:
            raise ExportError(f"ONNX logits have shape {out.shape} for a batch of {len(batch)}, PyTorch {ref.shape}")
        diff = float(np.abs(out - ref).max())
        tol = parity_tolerance(ref, atol)
        if not diff <= tol:  # also catches NaN
            raise ExportError(
                f"ONNX Runtime logits differ from PyTorch by {diff:.3g} (allowed {tol:.3g}) on a batch of {len(batch)}"
            )
        worst = max(worst, diff)
    return worst


def export_onnx(
    classifier: torch.nn.Module,
    labels: Sequence[str],
    path: str | Path,
    model_name: str,
    opset: int | None = None,
    sample: np.ndarray | None = None,
    exporter: str = "auto",
    atol: float = PARITY_ATOL,
    prebuilt=None,
    task: dict | None = None,
    metadata: dict[str, str] | None = None,  # more metadata_props (the temperature: engines.temperature_metadata)
) -> Path:
    """Export ``classifier`` (an imgcls Classifier) to one ONNX file and check it.

    * input ``images`` uint8 (N, 3, S, S), output ``logits`` float32 (N, K),
      dynamic N; S = ``classifier.preprocess.input_size``.
    * ``exporter``: ``"auto"`` (dynamo, then TorchScript if dynamo fails or its
      file fails the parity check), ``"dynamo"`` or ``"torchscript"``.
      ``opset`` defaults to 18 (dynamo) / 17 (TorchScript).
    * ``sample``: uint8 images (N, 3, S, S) for the parity check, real ones
      when you have them; default 4 random images.  The check also runs the
      first image alone, so the dynamic batch dimension is exercised.
    * ``prebuilt``: an ONNX ModelProto of the same model made another way
      (:func:`with_linear_head`), tried first under the same parity rule; the
      exporters run only if it fails.
    * ``task``: the model metadata's task entries (:func:`imgcls.tasks.meta`), stored as
      ``imgcls.task`` / ``imgcls.label_sep``; a binary-sigmoid model has one output for its two labels.
    * Raises :class:`ExportError` (a UserError) when no exporter produces a
      file within the parity rule; nothing is written then.

    Returns the path.  The max difference found is in ``path``'s
    ``imgcls.parity_max_abs_diff`` metadata entry.
    """
    path = Path(path)
    labels = [str(x) for x in labels]
    size = _input_size(classifier)
    if exporter not in ("auto", *_EXPORTERS):
        raise UserError(f"unknown exporter {exporter!r}; use auto, dynamo or torchscript")
    if sample is None:
        sample = _random_batch(classifier)
    sample = np.ascontiguousarray(sample)
    if sample.dtype != np.uint8 or sample.ndim != 4 or sample.shape[1:] != (3, size, size) or len(sample) == 0:
        raise UserError(f"the parity sample must be uint8 images (N, 3, {size}, {size}), got {sample.dtype} {sample.shape}")
    checks = [sample, sample[:1]] if len(sample) > 1 else [sample, np.concatenate([sample, sample])]

    module = _cpu_eval_copy(classifier)
    was_training = module.training
    module.eval()
    with torch.inference_mode():
        num_classes = int(module(torch.from_numpy(sample[:1])).shape[-1])
    if num_classes != output_count(task, len(labels)):
        raise UserError(f"the model has {num_classes} outputs but {len(labels)} labels were given"
                        f" (task {of_task(task).name})")

    path.parent.mkdir(parents=True, exist_ok=True)
    props = encode_metadata(labels, classifier.preprocess.to_dict(), model_name,
                            {**onnx_props(task), **(metadata or {})})
    example = torch.from_numpy(np.ascontiguousarray(np.concatenate([sample, sample])[:2]))
    order = list(_EXPORTERS) if exporter == "auto" else [exporter]
    makers = [(name, lambda name=name: _EXPORTERS[name](module, example, opset or _DEFAULT_OPSET[name]),
               f"torch {torch.__version__} {name} opset {opset or _DEFAULT_OPSET[name]}") for name in order]
    if prebuilt is not None:
        made_by = dict((p.key, p.value) for p in prebuilt.metadata_props).get("imgcls.exporter", "unknown")
        makers.insert(0, ("prebuilt", lambda: prebuilt, f"{made_by}, linear head appended"))
    failures = []
    tmp = path.with_name(path.name + ".tmp")
    try:
        for name, make, made_by in makers:
            try:
                model = make()
            except Exception as e:  # exporter limitations surface as many exception types
                failures.append(f"{name} exporter failed: {type(e).__name__}: {first_line(e)}")
                continue
            _set_metadata(model, {**props, "imgcls.exporter": made_by})
            _save_model(model, tmp)
            try:
                diff = _check_parity(module, tmp, checks, atol)
            except ExportError as e:
                failures.append(f"{name} exporter: {e}")
                continue
            _set_metadata(model, {"imgcls.parity_max_abs_diff": f"{diff:.3g}"})
            _save_model(model, tmp)
            os.replace(tmp, path)
            return path
    finally:
        module.train(was_training)
        tmp.unlink(missing_ok=True)
    raise ExportError(f"could not export {model_name} to ONNX: " + "; ".join(failures))


def with_linear_head(model, weight: np.ndarray, bias: np.ndarray):
    """A copy of ``model`` (one output, features ``(N, D)``) followed by ``features @ weight.T + bias``.

    The features strategy exports its extractor once; this makes the fitted classifier's
    graph from it without a second export (a dynamo export takes ~20 s on 2 cores, this
    milliseconds).  :func:`export_onnx` checks the result against PyTorch (``prebuilt``)."""
    from onnx import helper, numpy_helper

    weight = np.ascontiguousarray(weight, dtype=np.float32)
    bias = np.ascontiguousarray(bias, dtype=np.float32)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    if len(graph.output) != 1:
        raise ExportError(f"a head can only be appended to a graph with one output, not {len(graph.output)}")
    name = graph.output[0].name
    features = name + "_features"
    for node in graph.node:
        node.output[:] = [features if o == name else o for o in node.output]
        node.input[:] = [features if i == name else i for i in node.input]
    for info in graph.value_info:
        if info.name == name:
            info.name = features
    graph.initializer.extend([numpy_helper.from_array(weight, "imgcls_head_weight"),
                              numpy_helper.from_array(bias, "imgcls_head_bias")])
    graph.node.append(helper.make_node("Gemm", [features, "imgcls_head_weight", "imgcls_head_bias"], [name],
                                       name="imgcls_head", transB=1))
    dims = graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 2:
        dims[1].Clear()
        dims[1].dim_value = weight.shape[0]
    return out


# ----------------------------------------------------------------------------- int8


class _QuietPerChannelNotes(logging.Filter):
    """onnxruntime logs one root-logger line per 1-D weight (LayerNorm, BatchNorm) it cannot
    quantize per channel (it quantizes them per tensor) and per bias whose weight scale it
    widens (depthwise convolutions); both are fine, and dozens of lines would bury the run's log."""

    NOTES = ("is out-of-range for weight", "to ensure bias input")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(note in message for note in self.NOTES)


class _UInt8Reader:
    """onnxruntime CalibrationDataReader over the caller's uint8 batches."""

    def __init__(self, batches: Iterable[np.ndarray], input_name: str, size: int | None):
        self._it = iter(batches)
        self._name = input_name
        self._size = size
        self.count = 0

    def get_next(self):
        batch = next(self._it, None)
        if batch is None:
            return None
        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1] != 3 or (
                self._size is not None and batch.shape[2:] != (self._size, self._size)):
            raise UserError(
                f"calibration batches must be uint8 images (N, 3, {self._size or 'S'}, {self._size or 'S'}),"
                f" got {batch.dtype} {batch.shape}"
            )
        self.count += len(batch)
        return {self._name: np.ascontiguousarray(batch)}


def quantize_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    calibration_batches: Iterable[np.ndarray],
    quant_format: str = "qdq",
    per_channel: bool = True,
    method: str = "minmax",
    pre_process: bool = True,
    reduce_range: bool = False,
) -> Path:
    """Static int8 quantization of an exported fp32 file, metadata kept.

    ``calibration_batches``: uint8 images (N, 3, S, S), preprocessed like the
    model's inputs (a few hundred training images are plenty).
    ``quant_format``: ``"qdq"`` (default; the faster one on our CPUs) or ``"qoperator"``.
    ``method``: ``"minmax"`` (default), ``"entropy"`` or ``"percentile"``.
    ``pre_process`` runs onnxruntime's ``quant_pre_process`` (shape inference
    + graph optimization) first, which makes the quantized graph faster
    (docs/decisions.md).
    ``reduce_range`` (7-bit weights) avoids the u8 x s8 saturation of x86 CPUs
    without VNNI (AVX2-only) at some accuracy cost; the reference CPU has VNNI.
    The int8 file gets ``imgcls.quantization`` metadata.  Gate it on
    validation accuracy before use (:func:`agreement`, :func:`compare_engines`).
    """
    # onnxruntime's quantization tools take seconds to import; only int8 exports need them
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    props = read_onnx_props(onnx_path)  # UserError when missing / corrupt
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if quant_format not in formats:
        raise UserError(f"unknown quantization format {quant_format!r}; use qdq or qoperator")
    if method not in methods:
        raise UserError(f"unknown calibration method {method!r}; use {', '.join(methods)}")

    engine = OnnxEngine(onnx_path, threads=1)
    input_name = engine.session.get_inputs()[0].name
    reader_impl = _UInt8Reader(calibration_batches, input_name, engine.input_size)
    del engine

    class Reader(CalibrationDataReader):
        def get_next(self):
            return reader_impl.get_next()

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with tempfile.TemporaryDirectory() as work:
        source = onnx_path
        if pre_process:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            prepared = Path(work) / "prepared.onnx"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=False)
                source = prepared
            except Exception as e:  # fall back to the plain graph
                warnings.warn(f"quant_pre_process failed ({type(e).__name__}: {e}); quantizing the plain graph")
        quiet = _QuietPerChannelNotes()
        logging.getLogger().addFilter(quiet)
        try:
            quantize_static(
                str(source), str(tmp), Reader(),
                quant_format=formats[quant_format], per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=methods[method], reduce_range=reduce_range,
                extra_options={"CalibTensorRangeSymmetric": False},
            )
        except UserError:
            tmp.unlink(missing_ok=True)
            raise
        except Exception as e:
            tmp.unlink(missing_ok=True)
            if reader_impl.count == 0:
                raise UserError("int8 calibration needs at least one batch of images") from None
            raise ExportError(f"int8 quantization of {onnx_path} failed: {type(e).__name__}: {e}") from e
        finally:
            logging.getLogger().removeFilter(quiet)
    if reader_impl.count == 0:
        tmp.unlink(missing_ok=True)
        raise UserError("int8 calibration needs at least one batch of images")
    try:
        model = onnx.load(str(tmp))
        props = {k: v for k, v in props.items() if k != "imgcls.parity_max_abs_diff"}
        props["imgcls.quantization"] = (
            f"int8 static {quant_format} per_channel={per_channel} {method} on {reader_impl.count} images"
        )
        _set_metadata(model, props)
        _save_model(model, tmp)
        OnnxEngine(tmp, threads=1)  # it loads
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def agreement(fp32_logits: np.ndarray, int8_logits: np.ndarray) -> float:
    """Fraction of rows whose argmax (top-1 class) is the same in both."""
    a, b = np.asarray(fp32_logits), np.asarray(int8_logits)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (N, K) logit arrays of the same shape, got {a.shape} and {b.shape}")
    if len(a) == 0:
        return 1.0
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def compare_engines(reference, candidate, batches: Iterable[np.ndarray], labels: Iterable[int] | None = None) -> dict:
    """Run two engines on the same batches: top-1 agreement, max abs diff, and
    accuracies when ``labels`` (class indices, in batch order) are given.

    Gate an int8 file with ``acc_reference - acc_candidate <= 0.01`` on the
    validation split (the lead's rule: refuse int8 if it loses > 1 point).
    """
    ref_all, cand_all = [], []
    for batch in batches:
        ref_all.append(reference(batch))
        cand_all.append(candidate(batch))
    ref = np.concatenate(ref_all) if ref_all else np.zeros((0, 0), np.float32)
    cand = np.concatenate(cand_all) if cand_all else np.zeros((0, 0), np.float32)
    result = {
        "n": int(len(ref)),
        "agreement": agreement(ref, cand),
        "max_abs_diff": float(np.abs(ref - cand).max()) if ref.size else 0.0,
    }
    if labels is not None:
        y = np.asarray(list(labels))
        if len(y) != len(ref):
            raise ValueError(f"{len(y)} labels for {len(ref)} images")
        result["acc_reference"] = float(np.mean(ref.argmax(1) == y)) if len(y) else float("nan")
        result["acc_candidate"] = float(np.mean(cand.argmax(1) == y)) if len(y) else float("nan")
        result["acc_drop"] = result["acc_reference"] - result["acc_candidate"]
    return result


# ----------------------------------------------------------------------------- run directories

_GATE_BATCH = 32  # images per engine call for the gate's accuracies
# calibration runs a copy of the model that reduces every tensor; its memory grows with the batch,
# so small batches keep the int8 step below the memory training itself needs
_CALIBRATION_BATCH = 8
_CALIBRATION_IMAGES = 128


def _split_records(rows: list[dict], split: str) -> list[Record]:
    """The ``split`` rows of a run's split.csv as labelled records."""
    return [Record(Path(r["path"]), r["label"]) for r in rows if r["split"] == split]


def _spread(records: list[Record], limit: int) -> list[Record]:
    """At most ``limit`` records, evenly spaced over the list (every class, not the first ones)."""
    if len(records) <= limit:
        return list(records)
    return [records[i] for i in np.linspace(0, len(records) - 1, limit).round().astype(int)]


def _image_batches(records: Iterable[Record], spec, batch_size: int = _GATE_BATCH):
    """uint8 batches of the records' images (parity sample, calibration); unreadable files skipped."""
    images = []
    for record in records:
        try:
            images.append(load_uint8(record.path, spec))
        except ImageError:
            continue
        if len(images) == batch_size:
            yield np.stack(images)
            images = []
    if images:
        yield np.stack(images)


def _val_accuracy(onnx_path: Path, val: list[Record], spec, labels: list[str]) -> float:
    """Top-1 accuracy on the readable validation images, through the path evaluation takes;
    0.0 when none is readable."""
    metrics, _ = metrics_of_stream(stream_logits(OnnxEngine(onnx_path), spec, val, _GATE_BATCH), labels)
    return metrics.accuracy if metrics is not None else 0.0


def _check_out(run: Path, out: Path) -> None:
    """Refuse an --out that would replace one of the run's own files, or is no ONNX file."""
    own = {(run / name).resolve() for name in rundir.OWN_FILES}
    if out.resolve() in own or (out.exists() and out.is_dir()):
        raise UserError(f"--out {out} would replace {'a folder' if out.is_dir() else 'a file of the run itself'};"
                        f" give a new .onnx path (the default is {run / rundir.ONNX})")
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--out {out}: export writes an ONNX model; give a path ending in .onnx")


MAX_INT8_LOSS = 0.01  # the gate: int8 may lose at most this much validation accuracy (1 point)


def gate_int8(fp32_path: str | Path, int8_path: str | Path, train: Sequence[Record], val: Sequence[Record], spec,
              labels: Sequence[str], report_path: str | Path, max_loss: float | None = None,
              fp32_accuracy: float | None = None) -> dict:
    """Make the int8 file of ``fp32_path`` and keep it only when it passes the accuracy gate.

    Calibration: up to 128 of the ``train`` records, evenly spaced.  The gate: top-1
    accuracy of both files on the readable ``val`` images (``fp32_accuracy`` when the
    caller already scored ``fp32_path`` on them); int8 is refused, and its file removed,
    when it loses more than ``max_loss`` (default :data:`MAX_INT8_LOSS`).  The figures go
    to ``report_path`` (``export.json``) either way and are returned, with ``kept`` and
    ``reason``.  Quantization errors propagate (nothing is left at ``int8_path``).
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    max_loss = MAX_INT8_LOSS if max_loss is None else max_loss
    labels, val = list(labels), list(val)
    calibration = _image_batches(_spread(list(train), _CALIBRATION_IMAGES), spec, _CALIBRATION_BATCH)
    quantize_int8(fp32_path, int8_path, calibration)
    if fp32_accuracy is None:
        fp32_accuracy = _val_accuracy(fp32_path, val, spec, labels)
    int8_accuracy = _val_accuracy(int8_path, val, spec, labels)
    loss = fp32_accuracy - int8_accuracy
    kept = loss <= max_loss + 1e-9  # accuracies are counts over n: 0.95 - 0.94 is a point, not a bit more
    if kept:
        reason = (f"val accuracy {int8_accuracy:.4f} (fp32 {fp32_accuracy:.4f}): loses {100 * loss:.1f} points,"
                  f" at most {100 * max_loss:g} allowed")
    else:
        int8_path.unlink(missing_ok=True)
        reason = (f"int8 quantization loses {100 * loss:.1f} points of validation accuracy ({fp32_accuracy:.4f}"
                  f" -> {int8_accuracy:.4f}), more than {100 * max_loss:g}")
    report = {"fp32_val_accuracy": fp32_accuracy, "int8_val_accuracy": int8_accuracy, "n_val": len(val),
              "max_loss": max_loss, "kept": kept, "int8_file": str(int8_path), "reason": reason}
    rundir.write_json(Path(report_path), report)
    return report


def export_run(run: str | Path, out: str | Path | None = None, int8: bool = False,
               max_int8_loss: float | None = None) -> Path:
    """Export a run's best model to ONNX (labels + preprocessing inside).

    The parity check uses real validation images of the run.  ``int8``: static
    quantization calibrated on up to 128 training images, then refused (a
    UserError with the numbers) when it loses more than ``max_int8_loss``
    (default :data:`MAX_INT8_LOSS`) of validation accuracy (:func:`gate_int8`);
    both accuracies go to ``export.json`` in the run directory.
    """
    run = rundir.require_run_dir(run)
    if not run.is_dir():
        raise UserError(f"{run}: export takes a run directory")
    if out is not None:
        _check_out(run, Path(out))
    classifier, meta = Classifier.from_file(run / rundir.WEIGHTS)
    spec = classifier.preprocess
    labels = meta["labels"]
    split = rundir.read_split(run)
    val = _split_records(split, "val")
    sample = next(_image_batches(val[:8], spec), None)
    fp32_path = Path(out) if out and not int8 else run / rundir.ONNX
    if not int8 or not fp32_path.exists():
        export_onnx(classifier, labels, fp32_path, meta["model"], sample=sample, task=meta,
                    metadata=temperature_metadata(meta))
    if not int8:
        return fp32_path
    if of_task(meta).name != "multiclass":
        raise UserError(f"--int8: the accuracy gate scores multiclass models only; this is a {of_task(meta).name}"
                        f" model: keep the fp32 model ({fp32_path})")
    int8_path = Path(out) if out else run / rundir.INT8
    report = gate_int8(fp32_path, int8_path, _split_records(split, "train"), val, spec, labels, run / rundir.EXPORT,
                       max_int8_loss)
    if not report["kept"]:
        raise UserError(f"{report['reason']}; keep the fp32 model ({fp32_path})")
    logging.getLogger("imgcls").info("int8: %s", report["reason"])
    return int8_path
