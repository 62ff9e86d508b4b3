"""Multi-output models: several CSV label columns, one softmax head each on one backbone.

Tiny generated data: 32 px images whose colours say three things at once (species: a red, green or blue
block top left; time: a bright or dark background; count: a magenta band at the bottom or not).
Some cells of the time and count columns are empty: those images train and score the other heads only.
"""

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import predict_rows_by_backend
from imagezoo import write_csv, write_image

from imgcls import rundir
from imgcls.cli import main
from imgcls.data.records import Record, heads_of
from imgcls.data.sources import from_csv
from imgcls.errors import UserError
from imgcls.evaluation.metrics import compute_metrics, compute_output_metrics
from imgcls.tasks import TASKS, output_classes, output_row, parse_output_weights, resolve
from imgcls.train.objectives import OBJECTIVES

SPECIES = {"deer": (230, 30, 30), "fox": (30, 220, 40), "owl": (40, 40, 235)}
TIMES = {"day": 190, "night": 50}
COUNTS = ("1", "2+")
COLUMNS = ("species", "time", "count")
LABELS = ["species:deer", "species:fox", "species:owl", "time:day", "time:night", "count:1", "count:2+"]
TRAIN = ["--model", "cifarnet", "--batch-size", "8", "--workers", "0", "--lr", "0.003", "--warmup-epochs", "0",
         "--label-smoothing", "0", "--label-column", "species,time,count", "--int8", "off", "--no-augment"]


def scene(species: str, time: str, count: str, rng) -> np.ndarray:
    image = rng.normal(TIMES[time], 12, (32, 32, 3))
    image[2:14, 2:14] = SPECIES[species]
    if count == "2+":
        image[18:30, 4:28] = (240, 40, 240)
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def write_outputs_csv(folder: Path, per_combination: int, seed: int, empty_every: int = 5) -> Path:
    """Every species x time x count combination ``per_combination`` times; every ``empty_every``-th row
    leaves its time cell empty and the one after it its count cell; every 17th its species cell (the
    primary column)."""
    rng = np.random.default_rng(seed)
    rows, k = [], 0
    for species in SPECIES:
        for time in TIMES:
            for count in COUNTS:
                for i in range(per_combination):
                    path = write_image(folder / "img" / f"{species}_{time}_{count}_{i}.png",
                                       array=scene(species, time, count, rng))
                    k += 1
                    rows.append((path.relative_to(folder).as_posix(), "" if k % 17 == 3 else species,
                                 "" if k % empty_every == 0 else time, "" if k % empty_every == 1 else count))
    return write_csv(folder / "labels.csv", ["path", *COLUMNS], rows)


@pytest.fixture(scope="module")
def outputs_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multioutput")
    data = write_outputs_csv(root / "train", per_combination=8, seed=0)
    unseen = write_outputs_csv(root / "unseen", per_combination=2, seed=1)
    run = root / "run"
    assert main(["-q", "train", str(data), "--out", str(run), "--epochs", "12", "--output-weights", "1,0.5,0.5",
                 *TRAIN]) == 0
    return root, run, data, unseen


# --------------------------------------------------------------------------- numbers


def test_the_loss_is_each_heads_cross_entropy_on_its_labelled_rows_weighted_and_summed():
    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.normal(0, 2, (9, 7)))
    y = np.array([[0, 1, 0], [1, -1, 1], [2, 0, -1], [0, 0, 0], [1, -1, -1], [2, 1, 1], [0, 1, 0], [1, 0, -1],
                  [2, -1, 1]])
    weights = [1.0, 0.5, 0.25]
    meta = {"labels": LABELS, "outputs": [{"name": n, "weight": w} for n, w in zip(COLUMNS, weights)]}
    loss = OBJECTIVES["multioutput"].criterion(list(y), 7, "none", 0.0, meta=meta)(z, torch.from_numpy(y)).item()
    expected = 0.0
    for h, (start, k) in enumerate(((0, 3), (3, 2), (5, 2))):
        rows = y[:, h] >= 0  # the empty cells leave their images out of that head only
        expected += weights[h] * torch.nn.functional.cross_entropy(z[rows, start:start + k],
                                                                   torch.from_numpy(y[rows, h])).item()
    assert loss == pytest.approx(expected, abs=1e-12)
    # by hand: the mean of -log softmax at the true class, over the labelled rows of each head
    by_hand = 0.0
    for h, (start, k) in enumerate(((0, 3), (3, 2), (5, 2))):
        rows = np.flatnonzero(y[:, h] >= 0)
        logp = torch.log_softmax(z[rows, start:start + k], 1).numpy()
        by_hand += weights[h] * -np.mean(logp[np.arange(len(rows)), y[rows, h]])
    assert loss == pytest.approx(by_hand, abs=1e-12)
    # a batch where a head has no labelled image: that head adds nothing (no NaN)
    only = y[[1, 4]]
    part = OBJECTIVES["multioutput"].criterion(list(y), 7, "none", 0.0, meta=meta)(z[[1, 4]], torch.from_numpy(only))
    assert np.isfinite(part.item())
    # gradients reach only the logits of labelled heads
    zg = z[[4]].clone().requires_grad_(True)
    OBJECTIVES["multioutput"].criterion(list(y), 7, "none", 0.0, meta=meta)(zg, torch.from_numpy(y[[4]])).backward()
    assert zg.grad[0, 3:].abs().sum() == 0 and zg.grad[0, :3].abs().sum() > 0
    # hits: an image counts when every labelled head is right
    crit = OBJECTIVES["multioutput"].criterion(list(y), 7, "none", 0.0, meta=meta)
    perfect = torch.full((2, 7), -5.0)
    perfect[0, [1, 3]] = 5  # row [1, -1, 1] wants species fox, count 2+: count is wrong (tie at -5 -> index 0)
    perfect[1, [1, 5]] = 5  # row [1, -1, -1]: species right, the rest unlabelled
    assert crit.hits(perfect, torch.from_numpy(y[[1, 4]])).item() == 1


def test_per_head_metrics_leave_out_the_empty_cells():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (8, 7))
    y = np.array([[0, 1, 0], [1, -1, 1], [2, 0, -1], [0, 0, 0], [1, -1, -1], [2, 1, 1], [0, 1, 0], [1, 0, -1]])
    m = compute_output_metrics(z, y, LABELS)
    assert list(m.outputs) == list(COLUMNS) and m.n == 8
    for h, (name, names, start) in enumerate(heads_of(LABELS)):
        rows = y[:, h] >= 0
        alone = compute_metrics(z[rows, start:start + len(names)], y[rows, h], names)
        assert m.outputs[name].to_dict() == alone.to_dict() and m.outputs[name].n == rows.sum()
    assert m.accuracy == m.outputs["species"].accuracy  # the primary head's figures
    assert m.loss == pytest.approx(sum(o.loss for o in m.outputs.values()))
    data = m.to_dict()
    assert data["task"] == "multioutput" and data["primary"] == "species"
    assert data["outputs"]["time"]["labels"] == ["day", "night"]
    # probabilities: a softmax per head
    probs = TASKS["multioutput"].probabilities(z, LABELS)
    assert probs[:, :3].sum(1) == pytest.approx(1) and probs[:, 3:5].sum(1) == pytest.approx(1)
    row = output_row(Record(Path("a.png")), probs[0], "", LABELS)
    assert row["species"] == ["deer", "fox", "owl"][int(np.argmax(probs[0, :3]))]
    assert row["count_prob"] == round(float(probs[0, 5:].max()), 6)


def test_csv_columns_become_outputs_and_are_checked(tmp_path):
    data = write_outputs_csv(tmp_path, per_combination=1, seed=0, empty_every=3)
    records = from_csv(data, label_column="species,time,count").splits["all"]
    assert records[0].outputs[0] == ("species", "deer") and records[0].label == "deer"
    assert any(value is None for r in records for _, value in r.outputs)  # empty cells stay missing
    assert output_classes(records) == LABELS  # column order, each column's values sorted
    assert resolve("auto", None, records, len(LABELS)) == "multioutput"
    with pytest.raises(UserError, match="--task multioutput"):
        resolve("multiclass", None, records, len(LABELS))
    with pytest.raises(UserError, match="--label-sep"):
        resolve("auto", ";", records, len(LABELS))
    assert parse_output_weights("1,0.5,0.5", list(COLUMNS)) == [1, 0.5, 0.5]
    assert parse_output_weights(None, list(COLUMNS)) == [1, 1, 1]
    for bad in ("1,2", "1,-1,1", "0,0,0", "a,b,c"):
        with pytest.raises(UserError, match="--output-weights"):
            parse_output_weights(bad, list(COLUMNS))
    with pytest.raises(UserError, match="missing column"):
        from_csv(data, label_column="species,size")
    with pytest.raises(UserError, match="distinct"):
        from_csv(data, label_column="species,species")


# --------------------------------------------------------------------------- end to end


def test_multioutput_train_writes_every_head(outputs_run):
    _, run, data, _ = outputs_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "multioutput" and summary["classes"] == LABELS
    for name in COLUMNS:  # the colours are easy: every head must have learned them
        assert summary["val_outputs"][name]["accuracy"] >= 0.8, summary["val_outputs"]
    assert summary["val_accuracy"] == summary["val_outputs"]["species"]["accuracy"]
    val = json.loads((run / "val.json").read_text())
    assert set(val["outputs"]) == set(COLUMNS) and val["primary"] == "species"
    split = list(csv.DictReader((run / "split.csv").open()))
    cells = {r["path"]: r for r in csv.DictReader(data.open())}
    val_rows = [cells[Path(r["path"]).relative_to(data.parent).as_posix()] for r in split if r["split"] == "val"]
    for name in COLUMNS:  # each head is scored on the val images that have a value in its column
        assert val["outputs"][name]["n"] == sum(bool(r[name]) for r in val_rows) < len(val_rows) == val["n"]
    meta = rundir.read_weights_meta(run / "model.safetensors")
    assert meta["task"] == "multioutput"
    assert [(o["name"], o["labels"], o["weight"]) for o in meta["outputs"]] == [
        ("species", ["deer", "fox", "owl"], 1.0), ("time", ["day", "night"], 0.5), ("count", ["1", "2+"], 0.5)]
    # the ONNX file holds every head (one output, the heads side by side) and their labels
    model = onnx.load(str(run / "model.onnx"))
    assert model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value == 7
    props = {p.key: p.value for p in model.metadata_props}
    assert props["imgcls.task"] == "multioutput" and json.loads(props["imgcls.labels"]) == LABELS
    assert [(o["name"], o["labels"]) for o in json.loads(props["imgcls.outputs"])] == [
        ("species", ["deer", "fox", "owl"]), ("time", ["day", "night"]), ("count", ["1", "2+"])]
    assert not summary["int8"]["kept"]


def test_export_command_keeps_every_head(outputs_run, tmp_path):
    _, run, _, _ = outputs_run
    out = tmp_path / "again.onnx"
    assert main(["-q", "export", str(run), "--out", str(out)]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["imgcls.task"] == "multioutput" and json.loads(props["imgcls.labels"]) == LABELS
    assert [o["name"] for o in json.loads(props["imgcls.outputs"])] == list(COLUMNS)
    # the int8 gate compares one class's accuracy: refused
    assert main(["-q", "export", str(run), "--int8", "--out", str(tmp_path / "q.onnx")]) == 2


def test_onnx_logits_match_torch_for_every_head(outputs_run):
    from imgcls.data.decode import load_uint8
    from imgcls.prediction.engines import OnnxEngine
    from imgcls.models.classifier import Classifier

    _, run, _, unseen = outputs_run
    classifier, _ = Classifier.from_file(run / "model.safetensors")
    engine = OnnxEngine(run / "model.onnx")
    paths = sorted((unseen.parent / "img").glob("*.png"))[:12]
    batch = np.stack([load_uint8(p, classifier.preprocess) for p in paths])
    with torch.inference_mode():
        expected = classifier.eval()(torch.from_numpy(batch)).numpy()
    assert expected.shape == (12, 7)
    np.testing.assert_allclose(engine(batch), expected, atol=1e-4, rtol=0)


def test_multioutput_eval_scores_each_head(outputs_run, capsys):
    _, run, _, unseen = outputs_run
    assert main(["eval", str(run), str(unseen), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["task"] == "multioutput" and metrics["n"] == 24
    truth = list(csv.DictReader(unseen.open()))
    for name in COLUMNS:
        head = metrics["outputs"][name]
        assert head["n"] == sum(bool(r[name]) for r in truth)
        assert head["accuracy"] >= 0.8 and 0 <= head["balanced_accuracy"] <= 1
        assert {row["label"] for row in head["per_class"]} == {x.split(":")[1] for x in LABELS if x.startswith(name)}
    saved = json.loads((run / "eval.json").read_text())
    assert saved["outputs"]["count"]["accuracy"] == metrics["outputs"]["count"]["accuracy"]
    assert (run / "eval_confusion_matrix.csv").read_text().startswith("output,species")
    # one class's threshold and event scoring are single-output tools: refused
    assert main(["thresholds", str(run), str(unseen), "--class", "species:deer"]) == 2
    assert "multioutput" in capsys.readouterr().err
    assert main(["eval", str(run), str(unseen), "--events"]) == 2
    assert "--events" in capsys.readouterr().err


def test_multioutput_predict_writes_a_class_per_head(outputs_run, tmp_path, capsys):
    _, run, _, unseen = outputs_run
    images = unseen.parent / "img"
    by_backend = predict_rows_by_backend(run, images, tmp_path)
    onnx_rows, torch_rows = by_backend["onnx"], by_backend["torch"]
    assert list(onnx_rows[0]) == ["path", "species", "species_prob", "time", "time_prob", "count", "count_prob",
                                  *(f"prob_{x}" for x in LABELS), "error"]
    for a, b in zip(onnx_rows, torch_rows):
        assert a["path"] == b["path"] and all(a[c] == b[c] for c in COLUMNS)
        for x in LABELS:
            assert float(a[f"prob_{x}"]) == pytest.approx(float(b[f"prob_{x}"]), abs=1e-5)
        species = [float(a[f"prob_species:{s}"]) for s in SPECIES]
        assert sum(species) == pytest.approx(1, abs=1e-5) and float(a["species_prob"]) == max(species)
    # the file names say the truth: species_time_count_i.png
    right = {c: sum(Path(r["path"]).name.split("_")[i] == r[c] for r in onnx_rows) for i, c in enumerate(COLUMNS)}
    assert all(n >= 0.8 * len(onnx_rows) for n in right.values()), right
    # JSON Lines: the same rows
    jsonl = tmp_path / "rows.jsonl"
    assert main(["-q", "predict", str(run / "model.onnx"), str(images), "--out", str(jsonl)]) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["species"] for r in rows] == [r["species"] for r in onnx_rows]
    # resume recognises the header
    assert main(["-q", "predict", str(run), str(images), "--out", str(tmp_path / "onnx.csv"), "--resume"]) == 0
    # formats that take one class per image are refused with the way out
    for extra in (["--out", str(tmp_path / "md.json")], ["--out", str(tmp_path / "e.csv"), "--events"],
                  ["--out", str(tmp_path / "t.csv"), "--threshold", "0.5"]):
        assert main(["-q", "predict", str(run), str(images), *extra]) == 2
        assert "multioutput" in capsys.readouterr().err


def test_features_strategy_fits_a_head_per_output(outputs_run, tmp_path, capsys):
    _, run, data, unseen = outputs_run
    out = tmp_path / "f"
    assert main(["-q", "train", str(data), "--out", str(out), "--weights", str(run), "--strategy", "features",
                 "--views", "2", *TRAIN]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "features" and summary["task"] == "multioutput"
    assert all(summary["val_outputs"][name]["accuracy"] >= 0.8 for name in COLUMNS), summary["val_outputs"]
    features = json.loads((out / "features.json").read_text())
    assert {row["output"] for row in features["cv"]} <= set(COLUMNS)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert graph.output[0].type.tensor_type.shape.dim[-1].dim_value == 7
    capsys.readouterr()
    assert main(["eval", str(out), str(unseen), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert all(metrics["outputs"][name]["accuracy"] >= 0.8 for name in COLUMNS)
    # the tail strategy fine-tunes one softmax head: refused
    code = main(["-q", "train", str(data), "--out", str(tmp_path / "t"), "--weights", str(run), "--strategy", "tail",
                 *TRAIN])
    assert code == 2 and "--strategy finetune" in capsys.readouterr().err


def test_multioutput_options_are_checked(outputs_run, tmp_path, capsys):
    root, run, data, _ = outputs_run
    common = ["-q", "train", str(data), "--epochs", "1", *TRAIN]
    assert main([*common, "--out", str(tmp_path / "a"), "--output-weights", "1,2"]) == 2
    assert "--output-weights" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "b"), "--balance", "sampler"]) == 2
    assert "--balance weights" in capsys.readouterr().err
    # class weights: each head's own, from its labelled images
    assert main([*common, "--out", str(tmp_path / "w"), "--balance", "weights"]) == 0
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["class_balance"]["balance"] == "weights"
    assert main([*common, "--out", str(tmp_path / "c"), "--task", "multilabel"]) == 2
    assert "--task multioutput" in capsys.readouterr().err
    # one label column and --output-weights: refused
    assert main(["-q", "train", str(data), "--out", str(tmp_path / "d"), "--model", "cifarnet", "--label-column",
                 "species", "--output-weights", "1", "--epochs", "1"]) == 2
    assert "several label columns" in capsys.readouterr().err
