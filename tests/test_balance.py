"""Imbalanced classes: --balance none|weights|sampler|auto, --select-by, and the former --class-weights."""

import csv
import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from conftest import FAST
from imagezoo import make_class_tree

import imgcls
from imgcls.cli import main
from imgcls.errors import UserError
from imgcls.train import head as solver
from imgcls.train import loop
from imgcls.train.balance import resolve_balance
from imgcls.train.config import read_aliases
from imgcls.train.head import class_weights

CLI_FAST = ["--model", "cifarnet", "--batch-size", "8", "--workers", "0", "--lr", "0.003", "--warmup-epochs", "0",
            "--label-smoothing", "0"]


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """30 : 8 : 4 images (about 7:1 in the training split): auto balances."""
    root = tmp_path_factory.mktemp("skewed")
    make_class_tree(root, {"empty": 30, "deer": 8, "stoat": 4}, size=(32, 32), seed=3)
    return root


def _train_counts(run_dir, classes):
    rows = list(csv.DictReader((run_dir / "split.csv").open()))
    return np.array([sum(r["split"] == "train" and r["label"] == c for r in rows) for c in classes])


def _metrics(run_dir):
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


# --------------------------------------------------------------------------- the sampler


def test_the_sampler_draws_classes_about_equally_and_reproducibly():
    targets = [0] * 20 + [1] * 2
    draws = [list(loop.class_balanced_sampler(targets, 2, loop.seed_epoch(0, epoch))) for epoch in range(40)]
    assert all(len(d) == len(targets) for d in draws)  # an epoch: as many draws as training images
    rare = [sum(targets[i] for i in d) for d in draws]  # draws of the 2-image class per epoch (11 expected)
    assert all(5 <= n <= 17 for n in rare), rare
    assert 0.45 < np.mean(rare) / len(targets) < 0.55
    # every image of a class alike: the two rare images share the rare draws
    flat = np.concatenate(draws)
    assert 0.4 < np.mean(flat[flat >= 20] == 20) < 0.6
    # seeded per epoch: a run (or a resume) draws the same epoch again
    assert list(loop.class_balanced_sampler(targets, 2, loop.seed_epoch(0, 3))) == draws[3]
    assert draws[3] != draws[4]


def test_a_sampler_run_trains_end_to_end_through_the_cli(skewed, tmp_path, monkeypatch, caplog):
    seen: dict[str, list[int]] = {}
    real_epoch = loop.train_one_epoch

    def recording(model, loader, *args, **kwargs):  # the classes the training steps really get
        def batches():
            for images, targets in loader:
                seen.setdefault(run, []).extend(targets.tolist())
                yield images, targets
        return real_epoch(model, batches(), *args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", recording)
    for run in ("sampler", "none"):  # `recording` files the targets under the run going on
        with caplog.at_level(logging.INFO, logger="imgcls"):
            assert main(["train", str(skewed), "--out", str(tmp_path / run), "--epochs", "2", *CLI_FAST,
                         "--batch-size", "4", "--balance", run]) == 0  # batch 4: few draws dropped
    summary = json.loads((tmp_path / "sampler" / "summary.json").read_text())
    classes = summary["classes"]
    counts = _train_counts(tmp_path / "sampler", classes)
    assert counts.max() / counts.min() > 5
    drawn = np.bincount(seen["sampler"], minlength=len(classes))
    assert drawn.min() / drawn.max() > 0.5, drawn  # about equal, where the data are 7:1
    as_counted = np.bincount(seen["none"], minlength=len(classes))
    assert as_counted.min() / as_counted.max() < 0.25, as_counted
    balance = summary["class_balance"]
    assert balance["balance"] == "sampler" and "draws as many images" in balance["sampler"]
    assert balance["selection_metric"] == "balanced_accuracy"
    assert "balance sampler (asked for)" in caplog.text and "balance sampler on the finetune strategy" in caplog.text
    assert "balance: sampler" in (tmp_path / "sampler" / "config.yaml").read_text()
    assert (tmp_path / "sampler" / "model.onnx").exists() and 0 <= summary["val_balanced_accuracy"] <= 1


def test_a_seeded_sampler_run_reproduces(skewed, tmp_path):
    from safetensors.torch import load_file

    runs = [imgcls.train(skewed, tmp_path / name, epochs=2, balance="sampler", seed=seed, progress=False, **FAST)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    weights = [load_file(str(r.run_dir / "model.safetensors")) for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    losses = [[row["train_loss"] for row in _metrics(r.run_dir)] for r in runs]
    assert losses[0] == losses[1] and losses[0] != losses[2]


# --------------------------------------------------------------------------- weights


def test_balance_weights_uses_the_balanced_class_weights(skewed, tmp_path, monkeypatch):
    asked = []

    def recording(targets, num_classes, mode):
        weight = class_weights(targets, num_classes, mode)
        asked.append((mode, weight))
        return weight

    from imgcls.train import objectives

    monkeypatch.setattr(objectives, "class_weights", recording)  # the criterion's, built first
    monkeypatch.setattr(loop, "class_weights", recording)  # the sampler's
    runs, loss_weight = {}, {}
    for name, options in (("weights", {"balance": "weights"}), ("sampler", {"balance": "sampler"}),
                          ("old", {"class_weights": "balanced"})):
        asked.clear()
        runs[name] = imgcls.train(skewed, tmp_path / name, epochs=1, progress=False, **options, **FAST)
        loss_weight[name] = asked[0]  # the criterion's (the sampler's own weights come after)
    mode, weight = loss_weight["weights"]
    counts = _train_counts(runs["weights"].run_dir, runs["weights"].summary["classes"])
    assert mode == "balanced"
    assert torch.allclose(weight, torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32))
    # the sampler balances by its draws: the loss over them is unweighted
    assert loss_weight["sampler"] == ("none", None)
    # the former spelling trains the same run
    assert torch.equal(loss_weight["old"][1], weight)
    assert _metrics(runs["old"].run_dir)[0]["train_loss"] == _metrics(runs["weights"].run_dir)[0]["train_loss"]


def test_auto_switches_on_past_five_to_one_and_not_below():
    at = resolve_balance("auto", {"a": 50, "b": 10})
    assert (at.mode, at.selection_metric) == ("none", "accuracy")
    past = resolve_balance("auto", {"a": 51, "b": 10})
    assert (past.mode, past.selection_metric) == ("weights", "balanced_accuracy")
    assert "5:1 (a 51, b 10)" in past.reason and "--select-by accuracy" in past.selection_reason
    # the two choices are independent
    assert resolve_balance("sampler", {"a": 20, "b": 2}, "accuracy").selection_metric == "accuracy"
    assert resolve_balance("none", {"a": 20, "b": 2}).selection_metric == "balanced_accuracy"
    assert resolve_balance("weights", {"a": 5, "b": 5}, "balanced_accuracy").selection_metric == "balanced_accuracy"
    # what each mode puts in a loss, with and without draws
    resolved = {m: resolve_balance(m, {"a": 20, "b": 2}) for m in ("none", "weights", "sampler")}
    table = {m: (b.loss_weights(draws=True), b.loss_weights(draws=False)) for m, b in resolved.items()}
    assert table == {"none": ("none", "none"), "weights": ("balanced", "balanced"), "sampler": ("none", "balanced")}


# --------------------------------------------------------------------------- --select-by


def test_select_by_picks_the_epoch_that_maximises_its_metric(skewed, tmp_path, monkeypatch):
    # a scripted validation where the two metrics disagree: accuracy peaks at epoch 1, balanced at 2
    script = {1: (0.9, 0.5), 2: (0.8, 0.7), 3: (0.85, 0.6)}
    from imgcls import tasks

    real = tasks.compute_metrics  # what the multiclass task's per-epoch val metrics call
    calls = []

    def scripted(logits, targets, labels):
        calls.append(1)
        accuracy, balanced = script[len(calls)]
        return dataclasses.replace(real(logits, targets, labels), accuracy=accuracy, balanced_accuracy=balanced)

    monkeypatch.setattr(tasks, "compute_metrics", scripted)
    best = {}
    for metric in ("accuracy", "balanced_accuracy"):
        calls.clear()
        run = imgcls.train(skewed, tmp_path / metric, epochs=3, select_by=metric, progress=False, **FAST)
        rows = _metrics(run.run_dir)
        column = [float(r[f"val_{metric}"]) for r in rows]
        assert run.summary["class_balance"]["selection_metric"] == metric
        assert run.summary["best_epoch"] == 1 + int(np.argmax(column))
        best[metric] = run.summary["best_epoch"]
    assert best == {"accuracy": 1, "balanced_accuracy": 2}


def test_with_real_metrics_the_best_epoch_maximises_the_selection_metric(skewed, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="imgcls"):
        run = imgcls.train(skewed, tmp_path / "run", epochs=3, balance="sampler", progress=False, **FAST)
    balance = run.summary["class_balance"]
    assert balance["selection_metric"] == "balanced_accuracy" and "auto: classes differ" in balance["selection_reason"]
    assert "model selection by balanced_accuracy (auto" in caplog.text
    column = [float(r["val_balanced_accuracy"]) for r in _metrics(run.run_dir)]
    assert run.summary["best_epoch"] == 1 + int(np.argmax(column))


def test_the_heads_cross_validation_scores_classes_alike_when_selecting_by_balanced_accuracy():
    rng = np.random.default_rng(0)
    y = np.array([0] * 60 + [1] * 6)
    feats = rng.normal(size=(len(y), 1, 8)).astype(np.float32)
    feats[y == 1, 0, 0] += 1.0
    plain = solver.fit_head(feats, y, 2, None, cv_weight=None)
    balanced = solver.fit_head(feats, y, 2, None, cv_weight=class_weights(y, 2, "balanced"))
    same = solver.fit_head(feats, y, 2, None, weight=class_weights(y, 2, "balanced"))  # default: as the fit
    weighted = solver.fit_head(feats, y, 2, None, weight=class_weights(y, 2, "balanced"),
                               cv_weight=class_weights(y, 2, "balanced"))
    # the held-out loss of the rare class counts 10x per image when classes count alike
    assert [c["loss"] for c in plain.cv] != [c["loss"] for c in balanced.cv]
    assert [c["loss"] for c in same.cv] == [c["loss"] for c in weighted.cv]


# --------------------------------------------------------------------------- sampler where a fit draws nothing


def test_features_strategy_sampler_weighs_the_images_and_says_so(skewed, tmp_path, monkeypatch, caplog):
    import imgcls.export
    from imgcls.train import task_heads

    start = imgcls.train(skewed, tmp_path / "start", epochs=1, progress=False, **FAST)
    asked = []

    def recording(targets, num_classes, mode):
        asked.append(mode)
        return class_weights(targets, num_classes, mode)

    monkeypatch.setattr(task_heads, "class_weights", recording)
    monkeypatch.setattr(imgcls.export, "export_onnx", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("skip")))
    with caplog.at_level(logging.INFO, logger="imgcls"):
        run = imgcls.train(skewed, tmp_path / "features", weights=str(start.run_dir), strategy="features", views=2,
                           balance="sampler", select_by="accuracy", progress=False, **FAST)
    assert run.summary["strategy"] == "features"
    assert asked == ["balanced", "none"]  # the fit: the sampler's expected draws; the cross-validation: accuracy
    note = run.summary["class_balance"]["sampler"]
    assert "no draws" in note and "--balance weights" in note
    assert "balance sampler on the features strategy" in caplog.text
    info = json.loads((run.run_dir / "features.json").read_text())
    assert info["cv_selection"] == "accuracy"
    row = _metrics(run.run_dir)[0]
    assert 0 <= float(row["val_balanced_accuracy"]) <= 1 and set(run.summary["val_recall"]) == {"deer", "empty",
                                                                                                "stoat"}



def test_tail_strategy_sampler_draws_cached_views_and_weighs_the_probe(skewed, tmp_path, monkeypatch, caplog):
    from imgcls.models.registry import create_model
    from imgcls.train import tail

    torch.manual_seed(0)
    torch.save(create_model("resnet18", 1000, 32).state_dict(), tmp_path / "r18.pth")
    asked, drawn = [], []
    real_sampler = tail.class_balanced_sampler

    def recording_weights(targets, num_classes, mode):
        asked.append(mode)
        return class_weights(targets, num_classes, mode)

    class Recorded:  # the rows an epoch draws, with their classes
        def __init__(self, targets, num_classes, generator=None):
            self.sampler, self.targets = real_sampler(targets, num_classes, generator), np.asarray(targets)

        def __iter__(self):
            rows = list(self.sampler)
            drawn.append(self.targets[rows])
            return iter(rows)

    monkeypatch.setattr(tail, "class_weights", recording_weights)
    monkeypatch.setattr(tail, "class_balanced_sampler", Recorded)
    with caplog.at_level(logging.INFO, logger="imgcls"):
        run = imgcls.train(skewed, tmp_path / "run", model="resnet18", weights=str(tmp_path / "r18.pth"),
                           strategy="tail", epochs=2, time_budget=600, balance="sampler", batch_size=8, workers=0,
                           progress=False, input_size=32, views=2, export_onnx=False)
    assert run.summary["strategy"] == "tail" and run.summary["epochs"] == 2
    # the probe (one fit over every view) weighs the images; the last-stage epochs draw and do not weigh
    assert asked == ["balanced", "balanced", "none"]
    assert len(drawn) == 2  # one epoch of draws each
    counts = np.bincount(np.concatenate(drawn), minlength=3)
    assert counts.min() / counts.max() > 0.6, counts
    assert "balance sampler on the tail strategy" in caplog.text
    assert "last-stage epochs draw" in run.summary["class_balance"]["sampler"]


# --------------------------------------------------------------------------- the former --class-weights


def test_the_former_class_weights_spelling_still_works_with_a_warning(skewed, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="imgcls"):
        assert main(["train", str(skewed), "--out", str(tmp_path / "run"), "--epochs", "1", *CLI_FAST,
                     "--class-weights", "none"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warnings == ["--class-weights none is deprecated: read as --balance none --select-by accuracy"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["class_balance"]["balance"], summary["class_balance"]["selection_metric"]) == ("none", "accuracy")
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "balance: none" in config and "class_weights:" not in config


def test_an_old_config_yaml_with_class_weights_resumes(skewed, tmp_path, caplog):
    run = imgcls.train(skewed, tmp_path / "run", epochs=1, progress=False, **FAST)
    config = run.run_dir / "config.yaml"
    text = config.read_text()
    assert "balance: auto\n" in text and "select_by: auto\n" in text
    config.write_text(text.replace("balance: auto\n", "class_weights: balanced\n").replace("select_by: auto\n", ""))
    with caplog.at_level(logging.WARNING, logger="imgcls"):
        resumed = imgcls.train(None, run.run_dir, resume=True, epochs=2, progress=False)
    assert resumed.summary["epochs"] == 2 and len(_metrics(run.run_dir)) == 2
    assert "--class-weights balanced is deprecated: read as --balance weights" in caplog.text
    assert resumed.summary["class_balance"]["balance"] == "weights"
    assert "balance: weights" in config.read_text() and "class_weights:" not in config.read_text()


def test_invalid_combinations_are_one_line_user_errors(skewed, tmp_path, capsys):
    base = ["train", str(skewed), "--out", str(tmp_path / "x"), *CLI_FAST]
    assert main(base + ["--balance", "sampler", "--class-weights", "balanced"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--class-weights balanced means --balance weights" in err
    assert "contradicts --balance sampler" in err
    assert main(base + ["--select-by", "accuracy", "--class-weights", "balanced"]) == 2
    assert "contradicts --select-by accuracy" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written
    # the same said twice is no contradiction
    assert read_aliases({"balance": "weights", "class_weights": "balanced"}) == {
        "balance": "weights", "select_by": "balanced_accuracy"}
    with pytest.raises(UserError, match="unknown --class-weights 'inverse'.*--balance"):
        imgcls.train(skewed, tmp_path / "y", class_weights="inverse", **FAST)
    with pytest.raises(UserError, match="unknown --balance 'resample'; use one of auto, none, weights, sampler"):
        imgcls.train(skewed, tmp_path / "y", balance="resample", **FAST)
    with pytest.raises(UserError, match="unknown --select-by 'f1'"):
        imgcls.train(skewed, tmp_path / "y", select_by="f1", **FAST)
    with pytest.raises(SystemExit):  # argparse: invalid choice, exit 2
        main(base + ["--balance", "oversample"])
