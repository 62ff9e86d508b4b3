"""Engines: one call (uint8 batch -> logits) for torch and ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from imgcls.data.preprocess import Preprocess
from imgcls.prediction.engines import OnnxEngine, TorchEngine, read_onnx_metadata
from imgcls.errors import UserError
from imgcls.export import export_onnx
from imgcls.models.classic import CifarNet
from imgcls.models.classifier import Classifier
from imgcls.system import available_cpus

SMALL = Preprocess(input_size=32, resize="squash", crop_pct=1.0)
LABELS = ["airplane", "bird", "cat", "dog", "ship"]


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    clf = Classifier(CifarNet(len(LABELS)), SMALL).eval()
    path = export_onnx(clf, LABELS, tmp_path_factory.mktemp("engines") / "model.onnx", "cifarnet",
                       exporter="torchscript")  # the fast exporter; test_export covers both
    return clf, path


def test_onnx_engine_matches_torch_engine(exported):
    clf, path = exported
    onnx_engine = OnnxEngine(path)
    engines = [TorchEngine(clf, tune_allocator=False), TorchEngine(clf, channels_last=False, tune_allocator=False)]
    for n in (1, 5):
        batch = _images(n, seed=n)
        out = onnx_engine(batch)
        assert out.shape == (n, len(LABELS)) and out.dtype == np.float32
        for engine in engines:
            ref = engine(batch)
            assert ref.shape == out.shape and ref.dtype == np.float32
            np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    assert not clf.training


def test_metadata_on_engine_and_helper(exported):
    clf, path = exported
    meta = read_onnx_metadata(path)
    assert meta["labels"] == LABELS
    assert meta["preprocess"] == SMALL.to_dict()
    assert meta["model"] == "cifarnet" and meta["version"]
    assert read_onnx_metadata(path.read_bytes()) == meta
    engine = OnnxEngine(path.read_bytes(), threads=1)
    assert engine.metadata == meta and engine.labels == LABELS
    assert engine.preprocess == SMALL and engine.input_size == 32 and engine.num_classes == len(LABELS)
    assert engine.threads == 1
    assert OnnxEngine(path).threads == available_cpus()


def test_input_forms(exported):
    clf, path = exported
    engine = OnnxEngine(path)
    batch = _images(4, seed=3)
    ref = engine(batch)
    # float in [0, 255] (rounded to uint8 for the uint8 graph), non-contiguous, lists
    np.testing.assert_allclose(engine(batch.astype(np.float32) + 0.2), ref, atol=1e-6)
    nhwc = np.ascontiguousarray(batch.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(engine(nhwc.transpose(0, 3, 1, 2)), ref, atol=1e-6)
    np.testing.assert_allclose(engine(batch[::-1])[::-1], ref, atol=1e-5)
    assert engine(batch[:0]).shape == (0, len(LABELS))
    torch_engine = TorchEngine(clf, tune_allocator=False)
    np.testing.assert_allclose(torch_engine(nhwc.transpose(0, 3, 1, 2)), ref, atol=1e-4)
    np.testing.assert_allclose(torch_engine(batch.astype(np.float32)), ref, atol=1e-4)
    with pytest.raises(ValueError, match="one image"):
        engine(batch[0])
    with pytest.raises(ValueError, match="32x32"):
        engine(_images(1, size=40))
    with pytest.raises(ValueError, match="dtype"):
        engine(batch.astype(np.int64))
    with pytest.raises(ValueError, match="NCHW"):
        torch_engine(nhwc)


def _plain_model_bytes() -> bytes:
    """A float-input ONNX model without imgcls metadata: logits = mean over H, W."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)
    graph = helper.make_graph([node], "plain", [x], [y], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def test_model_without_imgcls_metadata():
    data = _plain_model_bytes()
    meta = read_onnx_metadata(data)
    assert meta["labels"] is None and meta["preprocess"] is None and meta["model"] is None
    engine = OnnxEngine(data)
    assert engine.labels is None and engine.preprocess is None
    batch = _images(2, size=4)
    np.testing.assert_allclose(engine(batch), batch.reshape(2, 3, -1).mean(-1), rtol=1e-6)


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "text", "lfs"])
def test_corrupt_file_is_a_user_error(exported, tmp_path, kind):
    _, good = exported
    data = {
        "random": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "truncated": good.read_bytes()[: good.stat().st_size // 2],
        "empty": b"",
        "text": b"Not found\n",
        "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
    }[kind]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data)
    if kind == "lfs":
        for load in (read_onnx_metadata, OnnxEngine):
            with pytest.raises(UserError, match="Git LFS pointer; run `git lfs pull`"):
                load(bad)
        return
    with pytest.raises(UserError, match=r"bad\.onnx is not a valid ONNX model.*export it again"):
        read_onnx_metadata(bad)
    with pytest.raises(UserError, match=r"bad\.onnx is not a valid ONNX model.*export it again"):
        OnnxEngine(bad)


def test_missing_file_and_bad_device(exported, tmp_path):
    with pytest.raises(UserError, match="not found"):
        OnnxEngine(tmp_path / "nope.onnx")
    with pytest.raises(UserError, match="not found"):
        read_onnx_metadata(tmp_path / "nope.onnx")
    with pytest.raises(UserError, match="unknown device"):
        OnnxEngine(exported[1], device="tpu")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(UserError, match="CUDAExecutionProvider"):
            OnnxEngine(exported[1], device="cuda")
        assert OnnxEngine(exported[1], device="auto").providers == ["CPUExecutionProvider"]
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            TorchEngine(Classifier(CifarNet(2), SMALL), device="cuda")


_NO_TORCH = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = {"torch", "torchvision", "timm", "onnx", "onnxscript"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    from imgcls.prediction.engines import OnnxEngine, read_onnx_metadata, tune_cpu_allocator
    meta = read_onnx_metadata(sys.argv[1])
    engine = OnnxEngine(sys.argv[1])
    batch = np.load(sys.argv[2])
    print(json.dumps({
        "meta": meta,
        "logits": engine(batch).tolist(),
        "allocator": tune_cpu_allocator(),
        "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
    }))
""")


def test_runtime_works_without_torch(exported, tmp_path):
    clf, path = exported
    batch = _images(3, seed=9)
    np.save(tmp_path / "batch.npy", batch)
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(path), str(tmp_path / "batch.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["meta"] == read_onnx_metadata(path)
    np.testing.assert_allclose(np.array(result["logits"], np.float32), OnnxEngine(path)(batch), atol=1e-6)
    np.testing.assert_allclose(np.array(result["logits"]), TorchEngine(clf, tune_allocator=False)(batch), atol=1e-4)
    if sys.platform.startswith("linux"):
        assert result["allocator"] is True
