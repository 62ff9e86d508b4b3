"""Review budget: thresholds chosen on labelled data, stored in the run, applied by predict."""

import csv
import json

import numpy as np
import pytest
from conftest import FAST

import imgcls
from imgcls.evaluation import thresholds as th
from imgcls.cli import main
from imgcls.api import choose_thresholds
from imgcls.errors import UserError


def _binary(p_empty):
    p = np.asarray(p_empty, dtype=np.float64)
    return np.stack([p, 1 - p], 1)


# empties (truth 0) and animals (truth 1) with their P(empty); animals at 0.85 and 0.7 look empty
P_EMPTY = [0.99, 0.95, 0.90, 0.80, 0.60, 0.85, 0.70, 0.30, 0.20, 0.10]
TRUTH = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("target,threshold,pile,precision,other_recall", [
    (0.99, 0.90, 3, 1.0, 1.0),      # no animal may be set aside: stop above the 0.85 animal
    (0.80, 0.80, 5, 0.8, 0.8),      # one animal of five may: down to 0.8, before the second (0.7)
    (0.50, 0.60, 7, 5 / 7, 0.6),    # two may: every image predicted empty
])
def test_the_lowest_threshold_that_keeps_the_promise(target, threshold, pile, precision, other_recall):
    choice = th.choose_threshold(_binary(P_EMPTY), np.array(TRUTH), 0, target, "empty")
    assert choice.threshold == pytest.approx(threshold)
    assert (choice.pile, choice.review, choice.n) == (pile, 10 - pile, 10)
    assert choice.pile_precision == pytest.approx(precision)
    assert choice.other_recall == pytest.approx(other_recall) and choice.other_recall >= target
    assert choice.review_share == pytest.approx((10 - pile) / 10)


def test_ties_at_the_threshold_go_in_together_and_nothing_safe_means_no_pile():
    # an empty and an animal tie at 0.9: a threshold there takes both, so a promise of no animal stops above
    choice = th.choose_threshold(_binary([0.95, 0.9, 0.9, 0.2]), np.array([0, 0, 1, 1]), 0, 0.99)
    assert choice.threshold == pytest.approx(0.95) and choice.pile == 1
    worst = th.choose_threshold(_binary([0.9, 0.8]), np.array([1, 0]), 0, 0.99)  # the top one is an animal
    assert (worst.pile, worst.threshold, worst.review) == (0, 1.0, 2)
    curve = th.tradeoff(_binary(P_EMPTY), np.array(TRUTH), 0)
    assert len(curve["threshold"]) == 7 and curve["review_share"][-1] == pytest.approx(0.3)
    assert np.all(np.diff(curve["other_recall"]) <= 0)  # a lower threshold sets more animals aside


def test_decide():
    assert th.decide("empty", 0.95, {"empty": 0.9}) == "empty"
    assert th.decide("empty", 0.85, {"empty": 0.9}) == th.UNCERTAIN
    assert th.decide("deer", 0.3, {"empty": 0.9}) == "deer"  # no threshold: decided


@pytest.fixture(scope="module")
def run_with_data(tmp_path_factory):
    from imagezoo import make_class_tree

    root = tmp_path_factory.mktemp("thr")
    make_class_tree(root / "data", {"empty": 14, "deer": 14, "fox": 14}, size=(32, 32), seed=3)
    result = imgcls.train(root / "data", root / "run", epochs=4, progress=False,
                          **{**FAST, "export_onnx": True})
    return result.run_dir, root / "data"


def test_thresholds_command_stores_the_choice_and_predict_decides(run_with_data, tmp_path, capsys):
    run, data = run_with_data
    assert main(["thresholds", str(run), str(data), "--class", "empty", "--target-recall", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "share reviewed" in out and "stored: empty >=" in out
    stored = json.loads((run / "thresholds.json").read_text())
    t = stored["thresholds"]["empty"]
    assert 0.0 < t <= 1.0 and stored["chosen"]["empty"]["target_recall"] == 0.9
    assert stored["chosen"]["empty"]["other_recall"] >= 0.9
    assert (run / "thresholds_empty.png").stat().st_size > 1000

    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0]) == ["path", "label", "prob", "decision", "error"]
    for row in rows:
        if row["label"] == "empty":
            assert row["decision"] == ("empty" if float(row["prob"]) >= t - 1e-6 else "uncertain") or \
                abs(float(row["prob"]) - t) < 1e-6
        else:
            assert row["decision"] == row["label"]  # only empty has a threshold
    # the stored promise holds on the data it was chosen on
    animals = [r for r in rows if "/empty/" not in r["path"]]
    set_aside = [r for r in animals if r["decision"] == "empty"]
    assert len(set_aside) <= 0.1 * len(animals)

    # one threshold for every class replaces the stored ones; --resume reads the header with a decision column
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "q.csv"), "--threshold", "1.0"]) == 0
    rows = list(csv.DictReader((tmp_path / "q.csv").open()))
    assert all(r["decision"] == "uncertain" for r in rows if float(r["prob"]) < 1.0)
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "q.csv"), "--threshold", "1.0",
                 "--resume"]) == 0


def test_thresholds_errors_speak_to_the_user(run_with_data):
    run, data = run_with_data
    with pytest.raises(UserError, match="not a class of this model"):
        choose_thresholds(run, data, "badger")
    with pytest.raises(UserError, match="run directory"):
        choose_thresholds(run / "model.safetensors", data, "empty")
    with pytest.raises(UserError, match="target-recall"):
        choose_thresholds(run, data, "empty", 1.0)
    assert main(["predict", str(run), str(data), "--out", str(run.parent / "x.csv"), "--threshold", "2"]) == 2
