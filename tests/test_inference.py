"""One inference layer: engines.stream_logits -> Predictor.iter_logits / iter_probs -> metrics_of_stream."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from imagezoo import make_class_tree, write_extreme_aspect_png

from imgcls.data.preprocess import Preprocess
from imgcls.data.records import Record
from imgcls.prediction.engines import stream_logits
from imgcls.errors import UserError
from imgcls.evaluation.metrics import compute_metrics, metrics_of_stream
from imgcls.prediction.predict import Predictor
from imgcls.softmax import softmax

SMALL = Preprocess(input_size=32, resize="squash", crop_pct=1.0)
LABELS = ["cat", "dog", "fox"]


class FakeEngine:
    """uint8 (N, 3, S, S) -> deterministic logits (N, 3) from the mean colour; records its batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, batch):
        self.calls.append(len(batch))
        return (batch.reshape(len(batch), 3, -1).mean(-1) / 16.0).astype(np.float32)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    tree = make_class_tree(root, {"cat": 4, "dog": 4, "fox": 3}, seed=3)
    good = [Record(path, label) for label, paths in tree.items() for path in paths]
    broken = root / "broken.png"
    broken.write_bytes(b"not an image")
    missing = root / "missing.png"
    # unreadable files in the middle and at the end: they keep their place in the stream
    return good[:5] + [Record(broken, "cat")] + good[5:] + [Record(missing, "dog")]


def test_stream_logits_keeps_order_and_reports_unreadable_files(records):
    engine = FakeEngine()
    out = list(stream_logits(engine, SMALL, records, batch_size=4, workers=2))
    assert [r for r, _, _ in out] == records
    bad = {r.path.name for r, logits, error in out if logits is None}
    assert bad == {"broken.png", "missing.png"}
    assert all(error for _, logits, error in out if logits is None)
    assert all(not error and logits.shape == (3,) and logits.dtype == np.float32 for _, logits, error in out
               if logits is not None)
    assert sum(engine.calls) == len(records) - 2 and max(engine.calls) <= 4  # decoded images only, in batches
    from imgcls.data.decode import load_uint8

    first = records[0]
    np.testing.assert_array_equal(out[0][1], engine(load_uint8(first.path, SMALL)[None])[0])


def test_stream_logits_rejects_batch_size_zero(records):
    with pytest.raises(UserError, match="at least 1"):
        next(stream_logits(FakeEngine(), SMALL, records, batch_size=0))


def test_stream_logits_turns_extreme_aspect_ratios_into_errors(records, tmp_path):
    # a 4 KB PNG whose shorter-side resize would need gigabytes: a row with a reason, the rest goes on
    tall = Record(write_extreme_aspect_png(tmp_path / "tall.png", 1, 2_000_000))
    spec = Preprocess(input_size=32, resize="shorter", crop_pct=0.875)
    out = list(stream_logits(FakeEngine(), spec, [records[0], tall, records[1]], batch_size=2, workers=1))
    assert [logits is None for _, logits, _ in out] == [False, True, False]
    assert out[1][2].startswith("extreme aspect ratio: 1x2000000")


def test_top_k_below_one_is_refused(records):
    predictor = Predictor(FakeEngine(), LABELS, SMALL)
    with pytest.raises(UserError, match="--top-k must be at least 1"):
        list(predictor.iter_predict(records[:2], top_k=0))


def test_predictor_probabilities_are_the_softmax_of_its_logits(records):
    predictor = Predictor(FakeEngine(), LABELS, SMALL, batch_size=3)
    logits = list(predictor.iter_logits(records))
    probs = list(predictor.iter_probs(records, workers=1))
    for (r1, z, e1), (r2, p, e2) in zip(logits, probs, strict=True):
        assert r1 == r2 and e1 == e2
        if z is None:
            assert p is None
            continue
        assert p.dtype == np.float64
        np.testing.assert_array_equal(p, softmax(np.asarray(z, np.float64)))
    good = np.stack([z for _, z, _ in logits if z is not None])
    batch_probs = np.stack([p for _, p, _ in probs if p is not None])
    # a row's probabilities do not depend on the batch it came in
    engine = predictor.engine
    predictor.engine = lambda batch: good  # predict_proba on the stacked logits
    np.testing.assert_array_equal(predictor.predict_proba(np.zeros((len(good), 3, 32, 32), np.uint8)), batch_probs)
    predictor.engine = engine
    np.testing.assert_allclose(batch_probs.sum(1), 1.0, atol=1e-12)


def test_predictor_batches_by_its_default(records):
    predictor = Predictor(FakeEngine(), LABELS, SMALL, batch_size=4)
    list(predictor.iter_logits(records))
    # batches of 4 records; the unreadable one drops out of the second, the last batch (missing file) needs no call
    assert predictor.engine.calls == [4, 3, 4]
    predictor.engine.calls.clear()
    list(predictor.iter_logits(records, batch_size=20))
    assert predictor.engine.calls == [11]


def test_metrics_of_stream_equals_compute_metrics_on_the_readable_rows(records):
    stream = list(stream_logits(FakeEngine(), SMALL, records, batch_size=4))
    metrics, failures = metrics_of_stream(iter(stream), LABELS)
    assert [r.path.name for r, _ in failures] == ["broken.png", "missing.png"]
    assert all(reason for _, reason in failures)
    z = np.stack([logits for _, logits, _ in stream if logits is not None])
    y = np.array([LABELS.index(r.label) for r, logits, _ in stream if logits is not None])
    expected = compute_metrics(z, y, LABELS)
    assert metrics.to_dict() == expected.to_dict()
    assert metrics.n == 11
    # the loss is the mean negative log-softmax of the true class, exactly as written out
    z64 = z.astype(np.float64)
    shifted = z64 - z64.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    assert metrics.loss == float(-log_probs[np.arange(len(y)), y].mean())


def test_metrics_of_stream_without_readable_rows_and_with_unknown_classes(records):
    metrics, failures = metrics_of_stream(iter([(records[0], None, "broken")]), LABELS)
    assert metrics is None and failures == [(records[0], "broken")]
    assert metrics_of_stream(iter([]), LABELS) == (None, [])
    stranger = Record(records[0].path, "yak")
    with pytest.raises(UserError, match="'yak' is not among the model's classes"):
        metrics_of_stream(iter([(stranger, np.zeros(3, np.float32), "")]), LABELS)


_NO_TORCH = textwrap.dedent("""
    import json, sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm"):
                raise ImportError("blocked: " + name)

    sys.meta_path.insert(0, Block())
    import imgcls
    from imgcls.data.records import Record

    predictor = imgcls.load(sys.argv[1])
    records = [Record(p) for p in sys.argv[2:]]
    logits = [None if z is None else z.tolist() for _, z, _ in predictor.iter_logits(records)]
    probs = [None if p is None else p.tolist() for _, p, _ in predictor.iter_probs(records)]
    rows = list(predictor.iter_predict(records))
    print(json.dumps({"backend": predictor.backend, "logits": logits, "probs": probs, "rows": rows,
                      "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
""")


def test_onnx_prediction_runs_without_torch(records, tmp_path):
    torch = pytest.importorskip("torch")
    from imgcls.export import export_onnx
    from imgcls.models.classic import CifarNet
    from imgcls.models.classifier import Classifier

    torch.manual_seed(0)
    clf = Classifier(CifarNet(len(LABELS)), SMALL).eval()
    path = export_onnx(clf, LABELS, tmp_path / "model.onnx", "cifarnet", exporter="torchscript")
    files = [str(r.path) for r in records]
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(path), *files], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"].startswith("onnxruntime") and result["torch"] == []
    import imgcls

    predictor = imgcls.load(path)
    here = list(predictor.iter_logits([Record(r.path) for r in records]))
    for (_, z, _), z_child, p_child in zip(here, result["logits"], result["probs"], strict=True):
        assert (z is None) == (z_child is None) == (p_child is None)
        if z is not None:
            np.testing.assert_allclose(z_child, z, atol=1e-6)
            np.testing.assert_allclose(p_child, softmax(np.asarray(z, np.float64)), atol=1e-6)
    assert [row["label"] for row in result["rows"]] == [row["label"] for row in predictor.iter_predict(files)]
    assert sum(bool(row["error"]) for row in result["rows"]) == 2
