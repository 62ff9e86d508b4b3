"""int8 by default on CPUs: training writes model.int8.onnx behind the accuracy gate, prediction and
evaluation pick it (``--precision`` opts out)."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
from conftest import FAST
from imagezoo import make_class_tree

import imgcls
from imgcls import export, rundir
from imgcls.cli import main
from imgcls.data.decode import ImageError, load_uint8
from imgcls.prediction.engines import OnnxEngine
from imgcls.errors import UserError
from imgcls.system import cuda_available

pytestmark = pytest.mark.skipif(cuda_available(), reason="int8 is the CPU default; a GPU keeps fp32/torch")

CLASSES = {"cat": 24, "dog": 24, "fox": 24}


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _train(data, out, **options):
    """A tiny exported run and the imgcls log lines training wrote."""
    lines, logger = _Lines(), logging.getLogger("imgcls")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        result = imgcls.train(data, out, progress=False, **{**FAST, "epochs": 2, "export_onnx": True, **options})
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return result.run_dir, lines.lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    make_class_tree(root / "data", CLASSES, seed=3)
    kept = _train(root / "data", root / "kept", int8="auto", epochs=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export.gate, "MAX_INT8_LOSS", -1.0)  # a gate no model passes: int8 must lose < -100 points
        refused = _train(root / "data", root / "refused", int8="auto", epochs=1)
    return root, kept, refused


def _accuracy(path, run, split="val"):
    """Top-1 accuracy of one ONNX file on a split of the run's split.csv, image by image."""
    engine, labels = OnnxEngine(path), rundir.read_json(run / rundir.LABELS)
    hits = n = 0
    for row in rundir.read_split(run):
        if row["split"] != split:
            continue
        try:
            image = load_uint8(row["path"], engine.preprocess)
        except ImageError:
            continue
        hits += int(engine(image[None])[0].argmax() == labels.index(row["label"]))
        n += 1
    return hits / n, n


def test_training_keeps_int8_within_the_gate(runs):
    _, (run, lines), _ = runs
    assert (run / rundir.ONNX).exists() and (run / rundir.INT8).exists()
    report = rundir.read_json(run / rundir.EXPORT)
    fp32_acc, n = _accuracy(run / rundir.ONNX, run)
    int8_acc, _ = _accuracy(run / rundir.INT8, run)
    assert report["n_val"] == n >= 10
    assert report["fp32_val_accuracy"] == pytest.approx(fp32_acc, abs=1e-12) and fp32_acc >= 0.9  # it learned
    assert report["int8_val_accuracy"] == pytest.approx(int8_acc, abs=1e-12)
    assert report["kept"] is True and fp32_acc - int8_acc <= export.MAX_INT8_LOSS == report["max_loss"]
    # the gate's fp32 figure is the final val metric, scored once
    assert rundir.read_json(run / "val.json")["accuracy"] == pytest.approx(fp32_acc, abs=1e-12)
    assert rundir.read_json(run / rundir.SUMMARY)["int8"]["kept"] is True
    assert any(line.startswith("int8: kept model.int8.onnx, val accuracy") for line in lines), lines
    n_train = sum(row["split"] == "train" for row in rundir.read_split(run))
    props = OnnxEngine(run / rundir.INT8).metadata["props"]
    assert f"on {n_train} images" in props["imgcls.quantization"]  # calibrated on the training split


def test_a_refused_int8_leaves_no_file_and_says_why(runs):
    _, _, (run, lines) = runs
    assert (run / rundir.ONNX).exists() and not (run / rundir.INT8).exists()
    assert sorted(p.name for p in run.iterdir() if "int8" in p.name) == []  # no .tmp either
    report = rundir.read_json(run / rundir.EXPORT)
    assert report["kept"] is False and report["max_loss"] == -1.0
    assert report["fp32_val_accuracy"] == pytest.approx(_accuracy(run / rundir.ONNX, run)[0], abs=1e-12)
    refused = [line for line in lines if line.startswith("int8: refused")]
    assert refused and "points of validation accuracy" in refused[0] and "more than -100" in refused[0], lines
    assert rundir.read_json(run / rundir.SUMMARY)["int8"]["kept"] is False


def test_int8_off_or_without_an_onnx_file_is_not_attempted(tmp_path, caplog):
    from types import SimpleNamespace

    from imgcls.train.finalize import int8_model

    (tmp_path / rundir.ONNX).write_bytes(b"never read")
    splits = {"train": ["a"], "val": ["b"]}
    with caplog.at_level(logging.INFO, logger="imgcls"):
        off = int8_model(SimpleNamespace(cfg=SimpleNamespace(int8="off"), meta={}, run_dir=tmp_path, splits=splits),
                         str(tmp_path / rundir.ONNX))
        none = int8_model(SimpleNamespace(cfg=SimpleNamespace(int8="auto"), meta={}, run_dir=tmp_path, splits=splits),
                          None)
    assert off == {"kept": False, "reason": "--int8 off"} and none == {"kept": False, "reason": "no model.onnx"}
    assert "int8: not attempted (--int8 off)" in caplog.text and "int8: not attempted (no model.onnx)" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.ONNX]


def test_the_gate_allows_the_loss_the_user_gives(runs, tmp_path, monkeypatch, capsys):
    """--int8-max-loss, in points of accuracy: export and training hand it to the same gate."""
    import shutil
    from types import SimpleNamespace

    from imgcls.train import finalize

    _, (kept, _), _ = runs
    run = tmp_path / "run"
    shutil.copytree(kept, run)
    assert main(["export", str(run), "--int8", "--int8-max-loss", "2.5", "--out", str(tmp_path / "x.onnx")]) == 0
    assert rundir.read_json(run / rundir.EXPORT)["max_loss"] == pytest.approx(0.025)
    assert main(["export", str(run), "--int8", "--int8-max-loss", "-1"]) == 2
    assert "--int8-max-loss -1 is out of range" in capsys.readouterr().err
    assert main(["train", str(run), "--int8-max-loss", "101", "--out", str(tmp_path / "t")]) == 2
    assert "--int8-max-loss 101" in capsys.readouterr().err and not (tmp_path / "t").exists()

    asked = []
    monkeypatch.setattr(export, "gate_int8", lambda *a, max_loss=None, **k: asked.append(max_loss) or
                        {"kept": False, "reason": "", "fp32_val_accuracy": 1.0, "int8_val_accuracy": 0.0})
    for points in (None, 0.0, 3.0):
        session = SimpleNamespace(cfg=SimpleNamespace(int8="auto", int8_max_loss=points), meta={}, run_dir=tmp_path,
                                  splits={"train": ["a"], "val": ["b"]}, preprocess=None, classes=["a", "b"])
        finalize.int8_model(session, str(run / rundir.ONNX))
    assert asked == [None, 0.0, 0.03]  # None: the gate's own default, MAX_INT8_LOSS


def test_the_last_lines_of_train_say_which_file_predict_will_run(runs, tmp_path, capsys):
    root, _, _ = runs
    assert main(["train", str(root / "data"), "--out", str(tmp_path / "run"), "--model", "cifarnet", "--epochs", "2",
                 "--batch-size", "8", "--workers", "0", "--int8-max-loss", "100"]) == 0
    int8 = rundir.read_json(tmp_path / "run" / rundir.SUMMARY)["int8"]
    assert int8["kept"]  # any loss allowed
    out = capsys.readouterr().out
    assert (f"predict, eval and serve on a CPU run model.int8.onnx: val accuracy {int8['int8_val_accuracy']:.4f}"
            f" (fp32 {int8['fp32_val_accuracy']:.4f}; --precision fp32 for that file)") in out


def _predict(run, inputs, out, caplog, *options):
    with caplog.at_level(logging.INFO, logger="imgcls"):
        caplog.clear()
        assert main(["predict", str(run), str(inputs), "--out", str(out), *options]) == 0
        text = caplog.text
    with open(out, newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}, text


def test_predict_uses_int8_by_default_and_fp32_on_request(runs, tmp_path, caplog):
    root, (run, _), _ = runs
    rows8, log8 = _predict(run, root / "data", tmp_path / "int8.csv", caplog)
    rows32, log32 = _predict(run, root / "data", tmp_path / "fp32.csv", caplog, "--precision", "fp32")
    assert "engine: onnxruntime int8 (model.int8.onnx)" in log8
    assert "engine: onnxruntime fp32 (model.onnx)" in log32
    assert rows8.keys() == rows32.keys() and len(rows8) == sum(CLASSES.values())
    # agreement on every image fp32 is at least 50% sure of
    confident = [p for p in rows32 if float(rows32[p]["prob"]) >= 0.5]
    assert len(confident) >= 0.8 * len(rows32)
    assert [rows8[p]["label"] for p in confident] == [rows32[p]["label"] for p in confident]
    # the rows are int8's own: the file computed directly, and it is not the fp32 model
    engine, labels = OnnxEngine(run / rundir.INT8), rundir.read_json(run / rundir.LABELS)
    some = sorted(rows8)[:8]
    batch = np.stack([load_uint8(p, engine.preprocess) for p in some])
    logits = engine(batch)
    assert [labels[i] for i in logits.argmax(1)] == [rows8[p]["label"] for p in some]
    assert np.abs(logits - OnnxEngine(run / rundir.ONNX)(batch)).max() > 1e-3


def test_eval_uses_int8_by_default(runs, tmp_path, caplog):
    root, (run, _), _ = runs
    for options, engine in (([], "onnxruntime int8 (model.int8.onnx)"),
                            (["--precision", "fp32"], "onnxruntime fp32 (model.onnx)")):
        with caplog.at_level(logging.INFO, logger="imgcls"):
            caplog.clear()
            assert main(["eval", str(run), str(root / "data"), "--json", *options]) == 0
            assert f"engine: {engine}" in caplog.text
    predictor = imgcls.load(run)
    assert predictor.backend == "onnxruntime int8 (model.int8.onnx)"
    assert imgcls.load(run, precision="fp32").backend == "onnxruntime fp32 (model.onnx)"
    assert imgcls.load(run, backend="torch").backend.startswith("torch")


def test_a_run_without_int8_keeps_fp32_and_int8_on_request_is_an_error(runs, tmp_path, caplog, capsys):
    root, _, (run, _) = runs
    _, text = _predict(run, root / "data" / "cat", tmp_path / "rows.csv", caplog)
    capsys.readouterr()
    assert "engine: onnxruntime fp32 (model.onnx)" in text and "has no model.int8.onnx" in text
    assert main(["predict", str(run), str(root / "data" / "cat"), "--out", str(tmp_path / "x.csv"),
                 "--precision", "int8"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("imgcls: error:") and f"imgcls export {run} --int8" in err
    assert not (tmp_path / "x.csv").exists()
    with pytest.raises(UserError, match="has no model.int8.onnx"):
        imgcls.load(run, precision="int8")
    with pytest.raises(UserError, match="runs on ONNX Runtime"):
        imgcls.load(run, backend="torch", precision="int8")
    with pytest.raises(UserError, match="not an int8 model"):
        imgcls.load(run / rundir.ONNX, precision="int8")
    with pytest.raises(UserError, match="unknown precision"):
        imgcls.load(run, precision="int4")


def test_int8_is_not_attempted_for_a_multilabel_model(tmp_path, caplog):
    from types import SimpleNamespace

    from imgcls.train.finalize import int8_model

    (tmp_path / rundir.ONNX).write_bytes(b"never read")
    session = SimpleNamespace(cfg=SimpleNamespace(int8="auto"), meta={"task": "multilabel"}, run_dir=tmp_path,
                              splits={"train": ["a"], "val": ["b"]})
    with caplog.at_level(logging.INFO, logger="imgcls"):
        result = int8_model(session, str(tmp_path / rundir.ONNX))
    assert result["kept"] is False and "multilabel task" in result["reason"]
    assert "int8: not attempted (a multilabel task" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.ONNX]


@pytest.mark.parametrize("n", [5, 128, 129, 245, 1000])
def test_calibration_images_are_spread_over_the_whole_training_list(n):
    """split.csv lists the training images class by class: the calibration takes them from end to end."""
    chosen = export.gate._spread(list(range(n)), 128)
    assert len(chosen) == len(set(chosen)) == min(n, 128) and chosen == sorted(chosen)
    assert chosen[0] == 0 and chosen[-1] == n - 1
    assert max(np.diff(chosen), default=1) <= -(-n // 128) + 1  # no stretch of the list left out
