"""One classifier to one ONNX file: the export, its metadata and the parity check against PyTorch.

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
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch

from ..errors import UserError, first_line
from ..prediction.engines import INPUT_NAME, OUTPUT_NAME, OnnxEngine, encode_metadata
from ..tasks import of as of_task, onnx_props, output_count

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


def set_props(model, props: dict[str, str]) -> None:
    """Add or replace ``props`` in an in-memory ModelProto's ``metadata_props``."""
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
    set_props(model, props)
    tmp = path.with_name(path.name + ".tmp")
    try:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model, path: Path) -> None:
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
            set_props(model, {**props, "imgcls.exporter": made_by})
            save_model(model, tmp)
            try:
                diff = _check_parity(module, tmp, checks, atol)
            except ExportError as e:
                failures.append(f"{name} exporter: {e}")
                continue
            set_props(model, {"imgcls.parity_max_abs_diff": f"{diff:.3g}"})
            save_model(model, tmp)
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


