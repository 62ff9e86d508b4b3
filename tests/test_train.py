"""Training end to end on tiny generated datasets."""

import csv
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST
from imagezoo import make_class_tree, write_bad_file_zoo
from safetensors.torch import load_file

import imgcls
from imgcls import rundir
from imgcls.errors import UserError


def test_train_writes_a_complete_run_dir(tiny_tree, tmp_path):
    result = imgcls.train(tiny_tree, tmp_path / "run", epochs=4, progress=False, **FAST)
    run = result.run_dir
    for name in ("config.yaml", "labels.json", "preprocess.json", "model.safetensors", "checkpoint.pt",
                 "metrics.csv", "summary.json", "scan.json", "split.csv", "training_curves.png",
                 "val_confusion_matrix.png", "val_confusion_matrix.csv"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["train_seconds"] > 0
    assert summary["best_val_accuracy"] >= 0.8  # the classes are easy: it must have learned
    assert json.loads((run / "labels.json").read_text()) == ["cat", "dog", "fox"]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    # trained from scratch: normalization computed from the training images, not ImageNet's
    pre = json.loads((run / "preprocess.json").read_text())
    assert pre["mean"] != [0.485, 0.456, 0.406]
    # the weights file alone carries what prediction needs
    meta = rundir.read_weights_meta(run / "model.safetensors")
    assert meta["labels"] == ["cat", "dog", "fox"] and meta["model"] == "cifarnet"
    assert meta["preprocess"] == pre


def _interrupt_when(path, rows):
    """Send this process SIGINT (a Ctrl-C) once ``path`` has ``rows`` data rows."""
    import threading

    def watch():
        for _ in range(600):
            if path.exists() and len(path.read_text().splitlines()) > rows:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_keeps_a_checkpoint_and_resume_is_bit_exact(tiny_tree, tmp_path):
    imgcls.train(tiny_tree, tmp_path / "full", epochs=3, progress=False, **FAST)  # the uninterrupted reference
    watcher = _interrupt_when(tmp_path / "cut" / "metrics.csv", 1)
    cut = imgcls.train(tiny_tree, tmp_path / "cut", epochs=3, progress=False, **FAST)
    watcher.join()
    assert cut.summary["interrupted"] and cut.summary["epochs"] < 3
    assert (tmp_path / "cut" / "model.safetensors").exists()
    resumed = imgcls.train(None, tmp_path / "cut", resume=True, progress=False)
    assert resumed.summary["epochs"] == 3 and not resumed.summary["interrupted"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["best_val_accuracy"] == b["best_val_accuracy"]
    assert len((tmp_path / "cut" / "metrics.csv").read_text().splitlines()) == 4


def test_bad_files_are_listed_and_skipped(tmp_path):
    make_class_tree(tmp_path / "data", {"a": 10, "b": 10})
    zoo = write_bad_file_zoo(tmp_path / "data" / "a")
    result = imgcls.train(tmp_path / "data", tmp_path / "run", epochs=1, progress=False, **FAST)
    scan = json.loads((result.run_dir / "scan.json").read_text())
    reasons = {os.path.basename(u["path"]): u["reason"] for u in scan["unreadable"]}
    expected_bad = {e.path.name for e in zoo.values() if e.reason}
    assert set(reasons) == expected_bad
    assert result.summary["n_train"] + result.summary["n_val"] == 20 + len(zoo) - len(expected_bad)


def test_identical_files_are_reported_with_their_splits_and_labels(tmp_path, caplog):
    make_class_tree(tmp_path / "data" / "train", {"a": 6, "b": 6})
    make_class_tree(tmp_path / "data" / "val", {"a": 2, "b": 2}, seed=1)
    train_a = tmp_path / "data" / "train" / "a"
    shutil.copy(train_a / "a_0000.png", tmp_path / "data" / "val" / "b" / "copy.png")  # leak + conflicting label
    shutil.copy(train_a / "a_0001.png", train_a / "again.png")                        # harmless copy
    with caplog.at_level("WARNING", logger="imgcls"):
        result = imgcls.train(tmp_path / "data", tmp_path / "run", epochs=1, progress=False, **FAST)
    groups = json.loads((result.run_dir / "scan.json").read_text())["duplicates"]
    as_sets = sorted((sorted(os.path.basename(p) for p in g["paths"]), sorted(g["splits"]), sorted(g["labels"]))
                     for g in groups)
    assert as_sets == [(["a_0000.png", "copy.png"], ["train", "val"], ["a", "b"]),
                       (["a_0001.png", "again.png"], ["train", "train"], ["a", "a"])]
    assert "2 group(s) of repeated or identical files: 1 across splits" in caplog.text and "1 with different labels" in caplog.text


def test_decoding_on_the_fly_trains_exactly_like_the_ram_cache(tmp_path):
    # large datasets skip the RAM cache and decode in DataLoader workers every epoch
    make_class_tree(tmp_path / "data", {"cat": 12, "dog": 12, "fox": 12}, size=(40, 36))
    cached = imgcls.train(tmp_path / "data", tmp_path / "ram", epochs=2, progress=False, **{**FAST, "cache": "ram"})
    streamed = imgcls.train(tmp_path / "data", tmp_path / "none", epochs=2, progress=False,
                            **{**FAST, "cache": "none"})
    assert json.loads((streamed.run_dir / "scan.json").read_text())["ram_cache"] is False
    a, b = load_file(cached.run_dir / "model.safetensors"), load_file(streamed.run_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # worker processes, with unreadable files among the images
    write_bad_file_zoo(tmp_path / "data" / "cat")
    workers = imgcls.train(tmp_path / "data", tmp_path / "workers", epochs=3, progress=False,
                           **{**FAST, "cache": "none", "workers": 2})
    assert workers.summary["best_val_accuracy"] >= 0.8
    assert json.loads((workers.run_dir / "scan.json").read_text())["unreadable"]


def test_a_class_with_no_readable_image_is_refused(tmp_path):
    make_class_tree(tmp_path / "data", {"a": 6, "b": 3})
    for path in (tmp_path / "data" / "b").iterdir():
        path.write_bytes(b"")  # every file of class b is empty
    with pytest.raises(UserError, match=r"no readable training images left for class\(es\) b; see .*scan.json"):
        imgcls.train(tmp_path / "data", tmp_path / "run", epochs=1, progress=False, **FAST)
    reasons = {u["reason"] for u in json.loads((tmp_path / "run" / "scan.json").read_text())["unreadable"]}
    assert reasons == {"zero bytes"}


def test_early_stopping(tiny_tree, tmp_path):
    result = imgcls.train(tiny_tree, tmp_path / "run", epochs=10, patience=1, progress=False,
                          **{**FAST, "lr": 1e-9})
    assert result.summary["stopped_early"] and result.summary["epochs"] < 10


@pytest.mark.parametrize("change, message", [
    ({"model": "resnet19"}, "unknown model 'resnet19'. Did you mean"),
    ({"optimizer": "lbfgs"}, "unknown --optimizer"),
])
def test_user_errors(tiny_tree, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        imgcls.train(tiny_tree, tmp_path / "run", epochs=1, progress=False, **{**FAST, **change})


def test_single_class_is_refused(tmp_path):
    make_class_tree(tmp_path / "data", {"only": 5})
    with pytest.raises(UserError, match="only one class"):
        imgcls.train(tmp_path / "data", tmp_path / "run", epochs=1, progress=False, **FAST)


def test_existing_run_is_not_overwritten(tiny_tree, tmp_path):
    imgcls.train(tiny_tree, tmp_path / "run", epochs=1, progress=False, **FAST)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(UserError, match="already holds a trained model"):
        imgcls.train(tiny_tree, tmp_path / "run", epochs=1, progress=False, **FAST)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_fine_tune_from_another_run_replaces_the_head(tiny_tree, tmp_path):
    from imagezoo import make_class_tree

    first = imgcls.train(tiny_tree, tmp_path / "a", epochs=1, progress=False, **FAST)
    make_class_tree(tmp_path / "site2", {"elk": 8, "emu": 8}, seed=3)
    second = imgcls.train(tmp_path / "site2", tmp_path / "b", epochs=1, weights=str(first.run_dir), progress=False,
                          **{**FAST, "lr": 1e-12})
    assert "head replaced" in second.summary["initial_weights"]
    a = load_file(first.run_dir / "model.safetensors")
    b = load_file(second.run_dir / "model.safetensors")
    assert b["classifier.5.weight"].shape == (2, 84) and a["classifier.5.weight"].shape == (3, 84)
    # lr ~ 0: the backbone is still the first run's
    assert torch.allclose(a["features.0.weight"], b["features.0.weight"], atol=1e-6)
    # normalization travels with the weights
    assert json.loads((second.run_dir / "preprocess.json").read_text())["mean"] == \
        json.loads((first.run_dir / "preprocess.json").read_text())["mean"]


def test_weights_of_another_architecture_are_refused_before_the_scan(tiny_tree, tmp_path):
    first = imgcls.train(tiny_tree, tmp_path / "a", epochs=1, progress=False, **FAST)
    with pytest.raises(UserError, match="holds a cifarnet, not a resnet18; add --model cifarnet"):
        imgcls.train(tiny_tree, tmp_path / "b", epochs=1, weights=str(first.run_dir), progress=False,
                     **{**FAST, "model": "resnet18"})
    assert not (tmp_path / "b" / "scan.json").exists()


def test_freeze_backbone_trains_only_the_head(tiny_tree, tmp_path):
    first = imgcls.train(tiny_tree, tmp_path / "a", epochs=1, progress=False, **FAST)
    probe = imgcls.train(tiny_tree, tmp_path / "b", epochs=2, weights=str(first.run_dir), freeze="backbone",
                         strategy="finetune",
                         progress=False, **FAST)
    a = load_file(first.run_dir / "model.safetensors")
    b = torch.load(probe.run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert torch.equal(a["features.0.weight"], b["features.0.weight"])
    assert not torch.equal(a["classifier.5.weight"], b["classifier.5.weight"])


def test_amp_policy():
    from imgcls.system import cpu_has_native_bf16
    from imgcls.train.prepare import resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    with pytest.raises(UserError, match="needs a GPU"):
        resolve_amp("fp16", cpu)
    if cpu_has_native_bf16():
        assert resolve_amp("bf16", cpu) == torch.bfloat16
    else:
        with pytest.raises(UserError, match="no native bf16"):
            resolve_amp("bf16", cpu)


def test_schedules_follow_their_formulas():
    import math

    from imgcls.train.config import TrainConfig
    from imgcls.train.optim import SCHEDULES

    cfg = TrainConfig(data="", out="", step_size=2, gamma=0.1)
    cosine, step = SCHEDULES["cosine"], SCHEDULES["step"]
    # 10 epochs of 5 steps, 1 warm-up epoch
    assert cosine(0, 50, 5, 5, cfg) == pytest.approx(1 / 5)
    assert cosine(4, 50, 5, 5, cfg) == pytest.approx(1.0)
    assert cosine(5, 50, 5, 5, cfg) == pytest.approx(1.0)
    assert cosine(27, 50, 5, 5, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 45)))
    assert step(9, 50, 0, 5, cfg) == pytest.approx(1.0) and step(10, 50, 0, 5, cfg) == pytest.approx(0.1)
    assert step(20, 50, 0, 5, cfg) == pytest.approx(0.01)


def test_sgd_step_schedule_and_clipping_run(tiny_tree, tmp_path):
    result = imgcls.train(tiny_tree, tmp_path / "run", epochs=3, progress=False,
                          **{**FAST, "optimizer": "sgd", "lr": 0.05, "schedule": "step", "step_size": 1,
                             "gamma": 0.5, "clip_grad": 1.0, "label_smoothing": 0.1})
    lrs = [float(r["lr"]) for r in csv.DictReader((result.run_dir / "metrics.csv").open())]
    assert lrs == pytest.approx([0.05, 0.025, 0.0125])


def test_input_size_follows_small_images_when_training_from_scratch(tiny_tree, tmp_path):
    opts = {**FAST, "model": "resnet18"}
    # 32 px images: ResNet-18's default 224 would only upsample them; it trains at 32 with its small-image stem
    small = imgcls.train(tiny_tree, tmp_path / "a", epochs=1, progress=False, **opts)
    pre = json.loads((small.run_dir / "preprocess.json").read_text())
    assert (pre["input_size"], pre["crop_pct"]) == (32, 1.0)
    assert load_file(small.run_dir / "model.safetensors")["conv1.weight"].shape[-1] == 3  # 3x3 stem below 64 px
    # fine-tuning from that run keeps its geometry, whatever the new images' size
    make_class_tree(tmp_path / "big", {"elk": 6, "emu": 6}, size=(80, 96), seed=3)
    tuned = imgcls.train(tmp_path / "big", tmp_path / "b", epochs=1, weights=str(small.run_dir), progress=False,
                         **opts)
    assert json.loads((tuned.run_dir / "preprocess.json").read_text())["input_size"] == 32
    # an explicit size wins, and so do pretrained weights' preprocessing
    from imgcls.data.sources import load_dataset
    from imgcls.train.config import TrainConfig
    from imgcls.train.prepare import resolve_geometry, resolve_source

    records = load_dataset(tiny_tree).splits["all"]

    def geometry(**options):
        cfg = TrainConfig(data=str(tiny_tree), out="x", **options)
        return resolve_geometry(cfg, resolve_source(cfg), records)

    explicit = geometry(model="resnet18", input_size=64)
    assert (explicit.input_size, explicit.crop_pct) == (64, 0.875)
    assert geometry(model="efficientnet_lite0", pretrained=True).input_size == 224
    assert geometry(model="resnet18", weights=str(small.run_dir)).input_size == 32


def test_typical_short_side_reads_headers(tmp_path):
    from imgcls.data.scan import typical_short_side

    make_class_tree(tmp_path / "t", {"a": 3}, size=(40, 30), seed=0)
    make_class_tree(tmp_path / "u", {"a": 2}, size=(100, 90), seed=0)
    (tmp_path / "u" / "a" / "junk.jpg").write_text("not an image")
    paths = sorted((tmp_path).rglob("*.*"))
    assert typical_short_side(paths) == 30  # median of 30, 30, 30, 90, 90; the text file is ignored
    assert typical_short_side([tmp_path / "u" / "a" / "junk.jpg"]) is None


def test_class_weights_formula():
    from imgcls.train.head import class_weights

    assert class_weights([0, 0, 0, 1], 2, "none") is None
    w = class_weights([0, 0, 0, 1, 2, 2], 3, "balanced")
    assert torch.allclose(w, torch.tensor([6 / 9, 6 / 3, 6 / 6]))
    assert torch.isclose(w[torch.tensor([0, 0, 0, 1, 2, 2])].mean(), torch.tensor(1.0))  # the loss keeps its scale


def test_balanced_class_weights_change_the_training_loss(tmp_path):
    make_class_tree(tmp_path / "data", {"common": 24, "rare": 4})
    runs = {mode: imgcls.train(tmp_path / "data", tmp_path / mode, epochs=1, balance=mode, progress=False,
                               **FAST) for mode in ("none", "weights")}
    loss = {mode: float(next(csv.DictReader((r.run_dir / "metrics.csv").open()))["train_loss"])
            for mode, r in runs.items()}
    assert loss["none"] != pytest.approx(loss["weights"], rel=1e-3)
    assert "balance: weights" in (runs["weights"].run_dir / "config.yaml").read_text()
    # selection follows the class counts (19:3 here), not the loss weighting (--select-by auto)
    assert {r.summary["class_balance"]["selection_metric"] for r in runs.values()} == {"balanced_accuracy"}


def test_auto_balances_past_five_to_one_and_none_switches_it_off():
    from imgcls.train.balance import resolve_balance

    assert resolve_balance("auto", {"a": 50, "b": 10}).mode == "none"        # 5:1 exactly: as counted
    auto = resolve_balance("auto", {"empty": 166, "rodent": 39, "stoat": 2})
    assert auto.mode == "weights" and "83:1" in auto.reason and "--balance none" in auto.reason
    assert auto.tiny == {"stoat": 2}
    assert resolve_balance("none", {"empty": 166, "stoat": 2}).mode == "none"
    assert resolve_balance("weights", {"a": 5, "b": 5}).mode == "weights"


def test_imbalanced_data_train_balanced_by_default_and_warn_about_tiny_classes(tmp_path, caplog):
    make_class_tree(tmp_path / "data", {"empty": 40, "deer": 12, "stoat": 3}, size=(32, 32), seed=3)
    with caplog.at_level("INFO", logger="imgcls"):
        auto = imgcls.train(tmp_path / "data", tmp_path / "auto", epochs=2, progress=False, val_fraction=0.25,
                            **FAST)
    balance = auto.summary["class_balance"]
    train_counts = json.loads((auto.run_dir / "scan.json").read_text())["counts"]["train"]
    assert balance["balance"] == "weights" and balance["imbalance_ratio"] == round(
        max(train_counts.values()) / min(train_counts.values()), 2)
    assert balance["selection_metric"] == "balanced_accuracy" and balance["tiny_classes"] == {"stoat": 2}
    assert "balance weights (auto: classes differ" in caplog.text
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "stoat (2 images)" in r.getMessage()]
    assert warning and "fewer than 5 training images" in warning[0]
    # accuracy, balanced accuracy and per-class recall side by side: in summary.json and in metrics.csv
    val = json.loads((auto.run_dir / "val.json").read_text())
    assert auto.summary["val_balanced_accuracy"] == pytest.approx(val["balanced_accuracy"])
    assert set(auto.summary["val_recall"]) == {"deer", "empty", "stoat"}
    rows = list(csv.DictReader((auto.run_dir / "metrics.csv").open()))
    assert all(0 <= float(r["val_balanced_accuracy"]) <= 1 for r in rows)
    off = imgcls.train(tmp_path / "data", tmp_path / "off", epochs=1, progress=False, val_fraction=0.25,
                       balance="none", **FAST)
    assert off.summary["class_balance"]["balance"] == "none"
    with pytest.raises(UserError, match="unknown --balance"):
        imgcls.train(tmp_path / "data", tmp_path / "bad", epochs=1, balance="inverse", progress=False, **FAST)


def test_paths_with_commas_quotes_and_newlines_survive_split_csv_eval_and_export(tmp_path):
    from imgcls import rundir
    from imgcls.export import export_run

    written = make_class_tree(tmp_path / "data", {"cat, the \"striped\" one": 12, "dog": 12}, seed=4)
    odd = []
    for i, path in enumerate(p for paths in written.values() for p in paths):
        name = path.with_name(f'{path.stem}, copy "{i}"\n{path.suffix}' if i % 5 == 0 else f"{path.stem},{i}{path.suffix}")
        path.rename(name)
        odd.append(name)
    result = imgcls.train(tmp_path / "data", tmp_path / "run", epochs=1, progress=False,
                          **{**FAST, "export_onnx": True})
    rows = rundir.read_split(result.run_dir)
    assert sorted(Path(r["path"]) for r in rows) == sorted(odd)
    assert {r["label"] for r in rows} == {"cat, the \"striped\" one", "dog"}
    assert {r["split"] for r in rows} == {"train", "val"}
    metrics = imgcls.evaluate(result.run_dir, tmp_path / "data")
    assert metrics.n == len(odd)
    export_run(result.run_dir, int8=True, max_int8_loss=1.0)
    report = json.loads((result.run_dir / rundir.EXPORT).read_text())
    assert report["n_val"] == sum(r["split"] == "val" for r in rows) > 0
