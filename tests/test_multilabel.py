"""Tasks beyond one class per image: multi-label (a sigmoid per label) and binary as one sigmoid.

Tiny generated data: 32 px images whose colour patches say which of three labels are present
(deer: a red block top left, fox: a green block top right, owl: a blue band at the bottom).
"""

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import predict_rows_by_backend
from imagezoo import make_class_tree, write_csv, write_image
from PIL import Image
from sklearn.metrics import accuracy_score, average_precision_score, precision_recall_fscore_support

from imgcls import rundir
from imgcls.cli import main
from imgcls.data.records import Record
from imgcls.data.split import split_records
from imgcls.errors import UserError
from imgcls.evaluation.metrics import compute_label_set_metrics
from imgcls.softmax import binary_cross_entropy_with_logits, negative_log_likelihood, sigmoid
from imgcls.tasks import TASKS, label_set_row, parse_label_sets, resolve
from imgcls.evaluation.thresholds import best_f1_threshold, load_thresholds
from imgcls.train.objectives import OBJECTIVES

LABELS = ("deer", "fox", "owl")
SUBSETS = [("deer",), ("fox",), ("owl",), ("deer", "fox"), ("deer", "owl"), ("fox", "owl"), ("deer", "fox", "owl")]
TRAIN = ["--model", "cifarnet", "--batch-size", "8", "--workers", "0", "--lr", "0.003", "--warmup-epochs", "0",
         "--label-smoothing", "0"]


def label_set_image(labels, rng) -> np.ndarray:
    image = rng.normal(110, 25, (32, 32, 3))
    if "deer" in labels:
        image[2:14, 2:14] = (230, 30, 30)
    if "fox" in labels:
        image[2:14, 18:30] = (30, 220, 40)
    if "owl" in labels:
        image[20:30, :] = (40, 40, 235)
    return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def write_label_set_csv(folder: Path, per_subset: int, seed: int, sep: str = ";") -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for k, subset in enumerate(SUBSETS):
        for i in range(per_subset):
            path = write_image(folder / "img" / f"{k}_{i}.png", array=label_set_image(subset, rng))
            rows.append((path.relative_to(folder).as_posix(), sep.join(subset)))
    return write_csv(folder / "labels.csv", ["path", "label"], rows)


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel")
    data = write_label_set_csv(root / "train", per_subset=10, seed=0)
    unseen = write_label_set_csv(root / "unseen", per_subset=3, seed=1)
    run = root / "run"
    assert main(["-q", "train", str(data), "--out", str(run), "--label-sep", ";", "--epochs", "8", *TRAIN]) == 0
    return root, run, data, unseen


# --------------------------------------------------------------------------- numbers


def test_bce_with_logits_is_the_bernoulli_negative_log_likelihood():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (7, 3))
    y = (rng.random((7, 3)) < 0.4).astype(np.float64)
    torch_loss = torch.nn.BCEWithLogitsLoss()(torch.from_numpy(z), torch.from_numpy(y)).item()
    bernoulli = negative_log_likelihood(sigmoid(z).ravel(), y.ravel())  # -mean log p^y (1-p)^(1-y)
    assert torch_loss == pytest.approx(float(bernoulli), abs=1e-12)
    assert torch_loss == pytest.approx(float(binary_cross_entropy_with_logits(z, y)), abs=1e-12)
    # the training loss of both sigmoid tasks is that loss
    for name, targets in (("multilabel", y), ("binary-sigmoid", y[:, 0])):
        logits = torch.from_numpy(z if name == "multilabel" else z[:, :1])
        loss = OBJECTIVES[name].criterion(list(targets), 3, "none", 0.0)(logits, torch.from_numpy(targets)).item()
        assert loss == pytest.approx(float(binary_cross_entropy_with_logits(logits.numpy(), targets.reshape(logits.shape))),
                                     abs=1e-12)


def test_balanced_weights_of_a_sigmoid_weigh_each_label_by_its_absent_over_present():
    from imgcls.train.objectives import _pos_weight

    targets = [np.array([1, 0]), np.array([1, 1]), np.array([0, 0]), np.array([1, 0])]
    assert _pos_weight(targets, "balanced").tolist() == pytest.approx([1 / 3, 3.0])
    assert _pos_weight(targets, "none") is None
    assert _pos_weight([1, 0, 0, 0], "balanced").tolist() == pytest.approx([3.0])  # binary: class indices


def test_label_set_metrics_agree_with_scikit_learn():
    truth = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]])
    probs = np.array([[0.9, 0.2, 0.7], [0.3, 0.8, 0.1], [0.6, 0.4, 0.2], [0.1, 0.3, 0.9], [0.7, 0.6, 0.3],
                      [0.2, 0.7, 0.4]])
    logits = np.log(probs / (1 - probs))
    m = compute_label_set_metrics(logits, truth, list(LABELS))
    pred = (probs >= 0.5).astype(int)
    # rows 0, 1, 3 are exactly right at 0.5; rows 2 (fox missed), 4 (fox extra), 5 (owl missed) are not
    assert m.accuracy == pytest.approx(0.5) == accuracy_score(truth, pred)
    assert m.mean_average_precision == pytest.approx(average_precision_score(truth, probs, average="macro"))
    p, r, f1, support = precision_recall_fscore_support(truth, pred, zero_division=0)
    for j, row in enumerate(m.per_label):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[j], r[j], f1[j], support[j]))
        assert row["average_precision"] == pytest.approx(average_precision_score(truth[:, j], probs[:, j]))
    assert m.loss == pytest.approx(float(torch.nn.BCEWithLogitsLoss()(torch.tensor(logits), torch.tensor(truth, dtype=torch.float64))))
    # other thresholds: the same predictions scored again
    strict = m.at([0.95, 0.95, 0.95])
    assert strict.accuracy == 0.0 and all(row["recall"] == 0 for row in strict.per_label)
    assert strict.mean_average_precision == m.mean_average_precision  # threshold-free


def test_best_f1_threshold_on_known_scores():
    # cut after 0.9: F1 .5; 0.8: .8; 0.3: .667; 0.2: .857 (best); 0.1: .75
    threshold, detail = best_f1_threshold(np.array([0.9, 0.8, 0.3, 0.2, 0.1]), np.array([1, 1, 0, 1, 0]))
    assert threshold == pytest.approx(0.15)  # halfway to the next lower score
    assert detail["f1"] == pytest.approx(6 / 7) and detail["precision"] == 0.75 and detail["recall"] == 1.0
    assert best_f1_threshold(np.array([0.4, 0.6]), np.array([0, 0]))[0] == 0.5  # no positive: the default


def test_split_stratifies_label_sets_by_their_rarest_label_and_keeps_groups():
    records = [Record(Path(f"{i}.png"), "deer;fox", group=f"g{i // 2}", labels=("deer", "fox")) for i in range(20)]
    records += [Record(Path(f"r{i}.png"), "deer;owl", labels=("deer", "owl")) for i in range(4)]
    train, val = split_records(records, 0.25, seed=0)
    assert any("owl" in r.label_set for r in val) and any("owl" in r.label_set for r in train)  # rare label both sides
    side = {r.group: r in val for r in records if r.group}
    assert all((r in val) == side[r.group] for r in records if r.group)  # events stay whole


def test_task_resolution_and_label_parsing(tmp_path):
    records = [Record(Path("a.png"), "deer; fox"), Record(Path("b.png"), "owl;")]
    parsed = parse_label_sets({"all": records}, ";", tmp_path / "x.csv")["all"]
    assert [r.label_set for r in parsed] == [("deer", "fox"), ("owl",)]
    assert [r.label for r in parsed] == ["deer;fox", "owl"]  # the text, normalized
    with pytest.raises(UserError, match="no label"):
        parse_label_sets({"all": [Record(Path("c.png"), ";")]}, ";", tmp_path / "x.csv")
    assert resolve("auto", ";", parsed, 3) == "multilabel"
    assert resolve("auto", None, records, 3) == "multiclass"
    with pytest.raises(UserError, match="--task multilabel"):
        resolve("multiclass", ";", parsed, 3)
    with pytest.raises(UserError, match="exactly two"):
        resolve("binary-sigmoid", None, records, 3)
    with pytest.raises(UserError, match="folder"):
        parse_label_sets({"all": records}, ";", tmp_path)
    row = label_set_row(Record(Path("a.png")), np.array([0.7, 0.2, 0.55]), "", list(LABELS),
                        {"deer": 0.8, "fox": 0.1}, ";")
    assert row == {"path": "a.png", "prob_deer": 0.7, "prob_fox": 0.2, "prob_owl": 0.55, "labels": "fox;owl", "error": ""}


# --------------------------------------------------------------------------- multi-label end to end


def test_multilabel_train_writes_map_thresholds_and_the_task(multilabel_run):
    _, run, _, _ = multilabel_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "multilabel" and summary["classes"] == list(LABELS)
    assert summary["val_mAP"] >= 0.9  # the patches are easy: it must have learned them
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 8 and all(0 <= float(r["val_map"]) <= 1 for r in rows)
    # the kept epoch is the one with the best val mAP
    best = max(range(8), key=lambda i: float(rows[i]["val_map"]))
    assert summary["best_epoch"] == best + 1
    assert summary["class_balance"]["selection_metric"] == "mean_average_precision"
    val = json.loads((run / "val.json").read_text())
    assert val["mAP"] == pytest.approx(summary["val_mAP"]) and {r["label"] for r in val["per_label"]} == set(LABELS)
    stored = json.loads((run / "thresholds.json").read_text())
    assert set(stored["thresholds"]) == set(LABELS)
    assert all(stored["chosen"][label]["rule"] == "highest F1" for label in LABELS)
    assert [r["threshold"] for r in val["per_label"]] == pytest.approx([stored["thresholds"][x] for x in LABELS])
    meta = rundir.read_weights_meta(run / "model.safetensors")
    assert meta["task"] == "multilabel" and meta["label_sep"] == ";"
    props = {p.key: p.value for p in onnx.load(str(run / "model.onnx")).metadata_props}
    assert props["imgcls.task"] == "multilabel" and props["imgcls.label_sep"] == ";"
    # the tuned thresholds travel with both model files
    assert json.loads(props["imgcls.thresholds"]) == pytest.approx(stored["thresholds"])
    assert meta["thresholds"] == pytest.approx(stored["thresholds"])


def test_multilabel_eval_scores_label_sets(multilabel_run, capsys):
    _, run, _, unseen = multilabel_run
    assert main(["eval", str(run), str(unseen), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["task"] == "multilabel" and metrics["n"] == 21
    assert metrics["mAP"] >= 0.9 and 0 <= metrics["subset_accuracy"] <= 1
    assert [r["threshold"] for r in metrics["per_label"]] == pytest.approx(
        [load_thresholds(run)[x] for x in LABELS])  # the stored thresholds, not 0.5
    assert (run / "eval.json").exists() and (run / "eval_confusion_matrix.csv").read_text().startswith("label,tn,fp")
    # one class's review-budget threshold is a multiclass tool: refused, pointing at the tuned ones
    assert main(["thresholds", str(run), str(unseen), "--class", "deer"]) == 2
    assert "thresholds.json" in capsys.readouterr().err


def test_multilabel_predict_onnx_matches_torch_and_uses_the_thresholds(multilabel_run, tmp_path):
    _, run, _, unseen = multilabel_run
    images = unseen.parent / "img"
    by_backend = predict_rows_by_backend(run, images, tmp_path)
    onnx_rows, torch_rows = by_backend["onnx"], by_backend["torch"]
    assert list(onnx_rows[0]) == ["path", *(f"prob_{x}" for x in LABELS), "labels", "error"]
    thresholds = load_thresholds(run)
    for a, b in zip(onnx_rows, torch_rows):
        assert a["path"] == b["path"]
        for x in LABELS:
            assert float(a[f"prob_{x}"]) == pytest.approx(float(b[f"prob_{x}"]), abs=1e-5)
        assert a["labels"] == b["labels"]
        passing = [x for x in LABELS if float(a[f"prob_{x}"]) >= thresholds[x]]
        assert a["labels"] == ";".join(passing)
    truth = {Path(r["path"]).name: r["label"] for r in csv.DictReader(unseen.open())}
    right = sum(truth[Path(r["path"]).name] == r["labels"] for r in onnx_rows)
    assert right >= 0.8 * len(onnx_rows)
    # each model file alone knows its task (sigmoid) and its thresholds
    for name in ("model.onnx", "model.safetensors"):
        alone = tmp_path / f"{name}.csv"
        assert main(["-q", "predict", str(run / name), str(images), "--out", str(alone)]) == 0
        assert [r["labels"] for r in csv.DictReader(alone.open())] == [r["labels"] for r in onnx_rows]
    # --threshold 0 passes every label
    alone = tmp_path / "alone.csv"
    assert main(["-q", "predict", str(run / "model.onnx"), str(images), "--out", str(alone), "--threshold", "0"]) == 0
    rows = list(csv.DictReader(alone.open()))
    assert all(r["labels"] == "deer;fox;owl" for r in rows)
    assert [r["prob_fox"] for r in rows] == [r["prob_fox"] for r in onnx_rows]
    # resume recognises the label-set header
    assert main(["-q", "predict", str(run), str(images), "--out", str(tmp_path / "onnx.csv"), "--resume"]) == 0


def test_multilabel_export_command_keeps_the_task(multilabel_run, tmp_path):
    _, run, _, _ = multilabel_run
    out = tmp_path / "again.onnx"
    assert main(["-q", "export", str(run), "--out", str(out)]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["imgcls.task"] == "multilabel" and set(json.loads(props["imgcls.thresholds"])) == set(LABELS)
    assert main(["-q", "export", str(run), "--int8", "--out", str(tmp_path / "q.onnx")]) == 2


def test_features_strategy_fits_a_sigmoid_per_label(multilabel_run, tmp_path, capsys):
    _, run, data, unseen = multilabel_run
    out = tmp_path / "f"
    assert main(["-q", "train", str(data), "--out", str(out), "--label-sep", ";", "--weights", str(run),
                 "--strategy", "features", "--views", "2", *TRAIN]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "features" and summary["task"] == "multilabel" and summary["val_mAP"] >= 0.9
    assert set(load_thresholds(out)) == set(LABELS)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert graph.output[0].type.tensor_type.shape.dim[-1].dim_value == 3
    capsys.readouterr()
    assert main(["eval", str(out), str(unseen), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mAP"] >= 0.9
    # the tail strategy fine-tunes a softmax head: refused, with the way out
    code = main(["-q", "train", str(data), "--out", str(tmp_path / "t"), "--label-sep", ";", "--weights", str(run),
                 "--strategy", "tail", *TRAIN])
    assert code == 2 and "--strategy finetune" in capsys.readouterr().err


def test_a_two_class_softmax_head_folds_into_one_sigmoid_row():
    from imgcls.train.task_heads import fit_task_head

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    feats = (rng.normal(0, 1, (60, 1, 5)) + y[:, None, None] * np.array([1.5, 0, -1, 0, 0])).astype(np.float32)
    two = fit_task_head("multiclass", feats, y, 2, seed=0)
    one = fit_task_head("binary-sigmoid", feats, y, 2, seed=0)
    assert one.weight.shape == (1, 5) and one.bias.shape == (1,)
    x = torch.from_numpy(feats[:, 0])
    p_softmax = torch.softmax(x @ two.weight.T + two.bias, 1)[:, 1]
    p_sigmoid = torch.sigmoid(x @ one.weight.T + one.bias)[:, 0]
    assert torch.allclose(p_softmax, p_sigmoid, atol=1e-6)
    assert ((p_sigmoid > 0.5).numpy() == y).mean() >= 0.9
    # one-vs-rest: one row per label, each the binary fit of that label
    labels = np.stack([y, 1 - y, (rng.random(60) < 0.5).astype(int)], 1)
    rest = fit_task_head("multilabel", feats, labels, 3, seed=0)
    assert rest.weight.shape == (3, 5)
    assert torch.allclose(rest.weight[0], one.weight[0], atol=1e-6)


# --------------------------------------------------------------------------- binary as one sigmoid


def test_binary_sigmoid_end_to_end(tmp_path, capsys):
    make_class_tree(tmp_path / "data" / "train", {"empty": 20, "animal": 20}, seed=3)
    make_class_tree(tmp_path / "data" / "test", {"empty": 4, "animal": 4}, seed=4)
    run = tmp_path / "run"
    assert main(["-q", "train", str(tmp_path / "data"), "--out", str(run), "--task", "binary-sigmoid",
                 "--epochs", "4", *TRAIN]) == 0
    graph = onnx.load(str(run / "model.onnx")).graph
    assert graph.output[0].type.tensor_type.shape.dim[-1].dim_value == 1  # one logit
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "binary-sigmoid" and summary["test_accuracy"] >= 0.75
    assert rundir.read_weights_meta(run / "model.safetensors")["task"] == "binary-sigmoid"
    out = {b: tmp_path / f"{b}.csv" for b in ("onnx", "torch")}
    for backend, path in out.items():
        assert main(["-q", "predict", str(run), str(tmp_path / "data" / "test"), "--out", str(path), "--top-k", "2",
                     "--backend", backend]) == 0
    rows = {b: list(csv.DictReader(p.open())) for b, p in out.items()}
    for a, b in zip(rows["onnx"], rows["torch"]):
        assert float(a["prob"]) == pytest.approx(float(b["prob"]), abs=1e-5) and a["label"] == b["label"]
        assert float(a["prob_1"]) + float(a["prob_2"]) == pytest.approx(1.0, abs=2e-6)
    # P(second label, "empty") = sigmoid(the one logit)
    from imgcls.prediction.predict import load

    predictor = load(run, backend="onnx")
    write_image(tmp_path / "x.png", size=(32, 32), color=(90, 200, 30))
    image = np.ascontiguousarray(np.asarray(Image.open(tmp_path / "x.png").convert("RGB")).transpose(2, 0, 1)[None])
    z = predictor.engine(image)
    assert z.shape == (1, 1)
    positive = float(sigmoid(np.float64(z[0, 0])))
    assert predictor.predict_proba(image)[0].tolist() == pytest.approx([1 - positive, positive], abs=1e-12)
    assert predictor.labels == ["animal", "empty"]
    capsys.readouterr()
    assert main(["eval", str(run), str(tmp_path / "data"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert TASKS["binary-sigmoid"].outputs(2) == 1
