"""Temperature scaling: ECE and reliability bins by hand, the fit on over-confident logits, and a trained
run whose calibration travels with its run directory, its model.onnx and its model.safetensors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from imagezoo import make_class_tree

import imgcls
from imgcls.evaluation import calibration
from imgcls import rundir
from imgcls.evaluation.calibration import calibrate, ece, fit_temperature, reliability
from imgcls.cli import main
from imgcls.data.decode import load_uint8
from imgcls.data.records import Record
from imgcls.prediction.engines import META_TEMPERATURE, OnnxEngine, decode_metadata, read_onnx_metadata
from imgcls.errors import UserError
from imgcls.prediction.predict import load
from imgcls.softmax import softmax


def _calibrated_sample(n=4000, k=5, seed=0):
    """Logits and labels drawn from softmax(logits): calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, k))
    probs = softmax(logits)
    targets = np.array([rng.choice(k, p=p) for p in probs])
    return logits, targets


def test_ece_and_bins_against_a_hand_computation():
    probs = np.array([[0.95, 0.05], [0.90, 0.10], [0.30, 0.70], [0.45, 0.55], [0.60, 0.40]])
    targets = np.array([0, 1, 1, 0, 0])
    # confidences 0.95 (right), 0.90 (wrong), 0.70 (right), 0.55 (wrong), 0.60 (right); 15 bins of 1/15:
    # 0.95 -> bin 14 (14/15 = 0.933 < 0.95); 0.90 -> bin 13 (0.8667, 0.9333]; 0.70 -> bin 10 (0.6667, 0.7333];
    # 0.55 -> bin 8 (0.5333, 0.6]; 0.60 -> bin 8 (0.6 is the top edge of bin 8: (0.5333, 0.6])
    expected = (abs(1 - 0.95) + abs(0 - 0.90) + abs(1 - 0.70) + 2 * abs(0.5 - (0.55 + 0.60) / 2)) / 5
    assert ece(probs, targets) == pytest.approx(expected, abs=1e-12)
    bins = reliability(probs, targets)
    assert bins.count == [0] * 8 + [2, 0, 1, 0, 0, 1, 1]
    assert bins.confidence[8] == pytest.approx(0.575) and bins.accuracy[8] == pytest.approx(0.5)
    assert bins.accuracy[13] == 0.0 and bins.confidence[13] == pytest.approx(0.90)
    assert bins.confidence[0] is None and bins.accuracy[0] is None
    assert sum(bins.count) == len(targets)


def test_temperature_undoes_over_confidence_and_keeps_the_argmax():
    logits, targets = _calibrated_sample()
    sharp = 4 * logits  # an over-confident model: the same ranking, probabilities too close to 0 and 1
    t = fit_temperature(sharp, targets)
    assert t > 1 and t == pytest.approx(4, rel=0.15)
    result = calibrate(sharp, targets)
    assert result.fitted and result.temperature == pytest.approx(t)
    assert result.ece_after < result.ece_before / 3 and result.nll_after < result.nll_before
    assert (calibration.scaled_probs(sharp, t).argmax(1) == sharp.argmax(1)).all()
    # an under-confident model gets T < 1
    assert fit_temperature(logits / 3, targets) == pytest.approx(1 / 3, rel=0.15)


def test_no_fit_when_the_data_cannot_pin_the_temperature_down():
    logits = np.eye(3)[np.arange(30) % 3] * 2.0
    targets = np.arange(30) % 3  # all right: the likelihood keeps falling as T -> 0
    result = calibrate(logits, targets)
    assert result.temperature == 1.0 and not result.fitted and "no mistake" in result.reason
    assert calibrate(logits[:5], (targets[:5] + 1) % 3).reason.startswith("only 5")
    off = calibrate(logits, (targets + 1) % 3, fit=False)
    assert off.temperature == 1.0 and "--no-calibrate" in off.reason


def test_a_damaged_stored_temperature_is_a_user_error():
    with pytest.raises(UserError, match="imgcls.temperature.*positive number"):
        decode_metadata({META_TEMPERATURE: "-2"}, "m.onnx")
    with pytest.raises(UserError, match="positive number"):
        decode_metadata({META_TEMPERATURE: "warm"}, "m.onnx")
    assert decode_metadata({META_TEMPERATURE: "1.5"}, "m.onnx")["temperature"] == 1.5
    assert decode_metadata({}, "m.onnx")["temperature"] == 1.0


# --------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def noisy_tree(tmp_path_factory):
    """Three classes with a quarter of the labels swapped: val has mistakes whatever the model learns."""
    root = tmp_path_factory.mktemp("noisy")
    written = make_class_tree(root, {"cat": 24, "dog": 24, "fox": 24}, size=(32, 32), seed=3)
    names = list(written)
    for c, name in enumerate(names):
        for path in written[name][::4]:
            path.rename(root / names[(c + 1) % 3] / f"swapped_{path.name}")
    return root


@pytest.fixture(scope="module")
def run(noisy_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated") / "run"
    return Path(imgcls.train(noisy_tree, out, epochs=2, progress=False, **{**FAST, "export_onnx": True}).run_dir)


def _val_batch(run_dir: Path, n: int = 6):
    rows = [r for r in rundir.read_split(run_dir) if r["split"] == "val"][:n]
    spec = rundir.read_preprocess(run_dir / rundir.PREPROCESS)
    return np.stack([load_uint8(r["path"], spec) for r in rows]), rows


def test_training_writes_the_calibration_and_the_predictions(run):
    cal = json.loads((run / rundir.CALIBRATION).read_text())
    t = cal["temperature"]
    assert cal["fitted"] and t != pytest.approx(1.0, abs=1e-3), cal["reason"]
    assert cal["ece_after"] <= cal["ece_before"] + 1e-9 and cal["nll_after"] <= cal["nll_before"] + 1e-12
    assert len(cal["reliability_before"]["count"]) == 15 and sum(cal["reliability_before"]["count"]) == cal["n"]
    summary = json.loads((run / rundir.SUMMARY).read_text())
    assert summary["temperature"] == round(t, 4)
    assert summary["val_ece_before"] == round(cal["ece_before"], 4)
    assert summary["val_ece_after"] == round(cal["ece_after"], 4)
    val = json.loads((run / "val.json").read_text())
    assert cal["n"] == val["n"]
    # the stored predictions: calibrated probabilities of the final model, one row per val image
    with (run / rundir.predictions_file("val")).open() as handle:
        header = handle.readline().strip().split(",")
    assert header == ["path", "label", "predicted", "confidence", "prob_cat", "prob_dog", "prob_fox"]
    batch, rows = _val_batch(run)
    raw = OnnxEngine(run / rundir.ONNX)(batch)
    with (run / rundir.predictions_file("val")).open(newline="") as handle:
        stored = {r["path"]: r for r in csv.DictReader(handle)}
    expected = softmax(raw.astype(np.float64) / t)
    for row, p in zip(rows, expected):
        got = [float(stored[row["path"]][f"prob_{c}"]) for c in ("cat", "dog", "fox")]
        np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-6)


def test_predict_applies_the_temperature_from_the_run_and_from_each_model_file_alone(run, tmp_path):
    t = json.loads((run / rundir.CALIBRATION).read_text())["temperature"]
    batch, rows = _val_batch(run)
    raw = OnnxEngine(run / rundir.ONNX)(batch).astype(np.float64)
    alone = tmp_path / "copied.onnx"
    shutil.copy(run / rundir.ONNX, alone)
    assert read_onnx_metadata(alone)["temperature"] == pytest.approx(t)
    assert rundir.weights_meta(run)["temperature"] == pytest.approx(t)
    for source in (run, alone):
        predictor = load(source)
        assert predictor.temperature == pytest.approx(t)
        np.testing.assert_allclose(predictor.predict_proba(batch), softmax(raw / t), rtol=1e-6, atol=1e-9)
        probs = [p for _, p, _ in predictor.iter_probs([Record(Path(r["path"])) for r in rows])]
        np.testing.assert_allclose(np.stack(probs), softmax(raw / t), rtol=1e-5, atol=1e-7)
    weights = tmp_path / "copied.safetensors"
    shutil.copy(run / rundir.WEIGHTS, weights)
    torch_predictor = load(weights)
    assert torch_predictor.temperature == pytest.approx(t)
    torch_raw = np.asarray(torch_predictor.engine(batch), dtype=np.float64)
    np.testing.assert_allclose(torch_predictor.predict_proba(batch), softmax(torch_raw / t), rtol=1e-6, atol=1e-9)
    # the rows of `imgcls predict` carry the calibrated probability
    out = tmp_path / "rows.csv"
    assert main(["-q", "predict", str(alone), *(r["path"] for r in rows), "--out", str(out)]) == 0
    with out.open(newline="") as handle:
        got = [float(r["prob"]) for r in csv.DictReader(handle)]
    np.testing.assert_allclose(got, softmax(raw / t).max(1), atol=2e-6)
    # the run's calibration.json wins over the files' metadata
    cal = json.loads((run / rundir.CALIBRATION).read_text())
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    rundir.write_json(copy / rundir.CALIBRATION, {**cal, "temperature": 2.5})
    assert load(copy).temperature == 2.5
    rundir.write_json(copy / rundir.CALIBRATION, {**cal, "temperature": 0})
    with pytest.raises(UserError, match="calibration.json.*positive number"):
        load(copy)


def test_reexport_keeps_the_temperature(run, tmp_path):
    from imgcls.export import export_run

    t = json.loads((run / rundir.CALIBRATION).read_text())["temperature"]
    path = export_run(run, tmp_path / "again.onnx")
    assert read_onnx_metadata(path)["temperature"] == pytest.approx(t)


def test_no_calibrate_keeps_raw_probabilities(noisy_tree, tmp_path):
    from imgcls.cli import build_parser
    from imgcls.train.config import options_from_args

    parse = lambda *a: options_from_args(build_parser().parse_args(["train", "d", "--out", "o", *a]))  # noqa: E731
    assert parse("--no-calibrate") == {"calibrate": False} and parse("--calibrate") == {"calibrate": True}
    assert parse() == {}
    run = Path(imgcls.train(noisy_tree, tmp_path / "raw", epochs=1, progress=False, calibrate=False, **FAST).run_dir)
    cal = json.loads((run / rundir.CALIBRATION).read_text())
    assert cal["temperature"] == 1.0 and not cal["fitted"] and "--no-calibrate" in cal["reason"]
    assert json.loads((run / rundir.SUMMARY).read_text())["temperature"] == 1.0
    assert rundir.read_yaml(run / rundir.CONFIG)["calibrate"] is False
    assert load(run).temperature == 1.0


def test_features_strategy_calibrates_the_final_models_val_logits(run, noisy_tree, tmp_path):
    """The features strategy scores val on its cached features; finalize scores it again through the exported
    model: the same loss shows that the logits calibrated are the final model's."""
    out = Path(imgcls.train(noisy_tree, tmp_path / "features", weights=str(run), epochs=1, progress=False,
                            **{**FAST, "export_onnx": True}).run_dir)
    assert json.loads((out / rundir.SUMMARY).read_text())["strategy"] == "features"
    with (out / rundir.METRICS).open(newline="") as handle:
        fit_loss = float(list(csv.DictReader(handle))[-1]["val_loss"])
    final = json.loads((out / "val.json").read_text())
    cal = json.loads((out / rundir.CALIBRATION).read_text())
    assert final["loss"] == pytest.approx(fit_loss, rel=1e-4, abs=1e-6)
    assert cal["nll_before"] == pytest.approx(final["loss"], rel=1e-9) and cal["n"] == final["n"]
