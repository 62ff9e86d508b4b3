"""Static int8 quantization of an exported file, and the figures that gate it.

:func:`quantize_int8` = onnxruntime's ``quant_pre_process`` + ``quantize_static``
(QDQ, per-channel int8 weights, uint8 activations, MinMax calibration on the
caller's uint8 batches), for a several times higher CPU throughput than fp32
(docs/decisions.md).  :func:`agreement` and :func:`compare_engines` hold an int8
file against its fp32 one; :mod:`.gate` applies them to a run's validation split.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from ..errors import UserError
from ..prediction.engines import OnnxEngine, read_onnx_props
from .graph import ExportError, save_model, set_props


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


# ops that carry a network's bulk of multiply-adds: int8 pays there; what runs after the last of them (pooling,
# the concatenated read-out, the head) stays fp32, since one activation scale for features of unlike ranges
# (the read-out's taps) rounds the small ones away, for no speed (figures: docs/decisions.md, session 19)
TRUNK_OPS = frozenset({"Conv", "ConvTranspose", "MatMul"})


def readout_nodes(model) -> list[str]:
    """Names of the nodes of ``model`` (an ONNX ModelProto) from which no :data:`TRUNK_OPS` node can be
    reached: the pooling and head that follow the trunk.  A graph without trunk ops gives every node."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_trunk: dict[int, bool] = {}
    # ONNX lists nodes in topological order, so walking it backwards meets every consumer before its
    # producer; a consumer not met yet (an unsorted graph) counts as trunk, which quantizes as before
    for node in reversed(model.graph.node):
        feeds_trunk[id(node)] = any(c.op_type in TRUNK_OPS or feeds_trunk.get(id(c), True)
                                    for out in node.output for c in consumers.get(out, ()))
    return [n.name for n in model.graph.node if n.op_type not in TRUNK_OPS and not feeds_trunk[id(n)] and n.name]


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
        keep_fp32 = readout_nodes(onnx.load(str(source), load_external_data=False))
        quiet = _QuietPerChannelNotes()
        logging.getLogger().addFilter(quiet)
        try:
            quantize_static(
                str(source), str(tmp), Reader(),
                quant_format=formats[quant_format], per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=methods[method], reduce_range=reduce_range,
                extra_options={"CalibTensorRangeSymmetric": False}, nodes_to_exclude=keep_fp32,
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
            f"int8 static {quant_format} per_channel={per_channel} {method} on {reader_impl.count} images;"
            f" fp32 after the trunk: {len(keep_fp32)} nodes"
        )
        set_props(model, props)
        save_model(model, tmp)
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


