"""Training on several processes: real gloo runs of 2 CPU processes (torch.distributed), no mocks.

Each run starts 2 Python processes that import torch; the data are 30 images of 32 px and the
model is cifarnet, so a run costs seconds of training and mostly start-up.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from imagezoo import make_class_tree
from safetensors.torch import load_file

import imgcls
from imgcls.cli import main
from imgcls.data.preprocess import Augment
from imgcls.errors import UserError
from imgcls.train import distributed

# no augmentation and no export: the runs compare weights, not pipelines
QUIET = dict(model="cifarnet", batch_size=8, workers=0, lr=3e-3, warmup_epochs=0, label_smoothing=0.0,
             export_onnx=False, int8="off", calibrate=False, progress=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    make_class_tree(root, {"cat": 10, "dog": 10, "fox": 10}, size=(32, 32), seed=3)
    return root


def _cli(*args):
    return [sys.executable, "-m", "imgcls.cli", "-q", *map(str, args)]


def test_the_ranks_batches_together_are_the_batches_of_one_process():
    """DistributedSampler's shares: rank r takes every 2nd row from r, so the ranks' k-th batches
    of 4 are together the k-th batch of 8 of one process, for a shuffled epoch and for the
    class-balanced draws alike; epochs are reseeded, and a share never repeats an image."""
    dataset = list(range(37))
    draws = list(np.random.default_rng(0).integers(0, 37, 37))
    for source in (None, draws):
        one = distributed.epoch_order(dataset, 5, 2, source, rank_=0, world_=1)
        shares = [distributed.epoch_order(dataset, 5, 2, source, rank_=r, world_=2) for r in range(2)]
        assert len(one) == 37 and all(len(s) == 18 for s in shares)
        for k in range(36 // 8):
            together = sorted(shares[0][4 * k:4 * k + 4] + shares[1][4 * k:4 * k + 4])
            assert together == sorted(one[8 * k:8 * k + 8])
    assert distributed.epoch_order(dataset, 5, 2, rank_=0, world_=1) != distributed.epoch_order(dataset, 5, 3, rank_=0,
                                                                                                world_=1)
    assert sorted(distributed.epoch_order(dataset, 5, 2, rank_=0, world_=1)) == dataset
    a, b = (distributed.epoch_order(dataset, 5, 2, rank_=r, world_=2) for r in range(2))
    assert not set(a) & set(b)


def test_two_processes_train_the_weights_of_one_with_the_same_global_batch(tree, tmp_path):
    """--batch-size is the global batch: 2 processes of 4 images per step train what 1 process of 8 does,
    with class-balanced draws too (--balance sampler: every rank draws the epoch's sequence, each
    takes its share).  Not bit for bit: DDP averages two half-batch gradient means where one process
    takes one mean of 8, and float sums in another order differ in the last bits (measured: 1e-7).
    SGD, because AdamW divides each step by the gradient's running size, which turns last-bit
    differences of near-zero gradients into visible ones (2e-5 measured)."""
    # augmentation draws differ per rank (each its own stream), so they are off here
    options = dict(QUIET, epochs=2, augment=Augment.off().to_dict(), balance="sampler", optimizer="sgd", lr=0.05)
    one = imgcls.train(tree, tmp_path / "one", **options)
    two = imgcls.train(tree, tmp_path / "two", nproc=2, **options)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], atol=1e-5, rtol=1e-4, msg=key)
    assert two.summary["best_val_accuracy"] == one.summary["best_val_accuracy"]
    rows = [list(csv.DictReader((tmp_path / run / "metrics.csv").open())) for run in ("one", "two")]
    assert [r["epoch"] for r in rows[1]] == ["1", "2"]  # rank 0 alone wrote its rows
    for r1, r2 in zip(*rows):  # train loss and accuracy over both ranks' shares; val over the whole val set
        for column in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert float(r2[column]) == pytest.approx(float(r1[column]), abs=1e-4), column
    assert yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["nproc"] == 2  # a resume takes 2 again


def test_two_processes_take_the_muon_steps_of_one(tree, tmp_path):
    """--muon under DDP: the ranks orthogonalise the same all-reduced gradients, so they train what one
    process does (the Newton-Schulz iterations carry the last-bit differences along, not more)."""
    options = dict(QUIET, epochs=2, augment=Augment.off().to_dict(), optimizer="sgd", lr=0.05, muon=[0.1, 0.6])
    imgcls.train(tree, tmp_path / "one", **options)
    imgcls.train(tree, tmp_path / "two", nproc=2, **options)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], atol=1e-4, rtol=1e-3, msg=key)
    muon_state = [s for s in b["optimizer"]["state"].values() if "muon_buffer" in s]
    assert muon_state and len(muon_state) == sum(v.ndim == 4 for v in a["model"].values())


EPOCHS = 12


def test_torchrun_ctrl_c_then_resume_on_two_processes_finishes_one_run_that_predicts(tree, tmp_path):
    """`torchrun ... -m imgcls train` (the launcher's variables in the environment), a Ctrl-C to the
    whole process group, then `imgcls train --resume RUN --nproc 2`: the run ends with one set of
    outputs written by rank 0 (no repeated epochs, no stray files), and it predicts."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "imgcls", "-q", "train", str(tree), "--out", str(run), "--model", "cifarnet", "--epochs",
                str(EPOCHS), "--batch-size", "8", "--workers", "0", "--int8", "off", "--warmup-epochs", "0"]
    proc = subprocess.Popen(torchrun, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.csv"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > 1:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the launcher and both workers
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0, output
    done = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= done < EPOCHS, output
    kept = metrics.read_text().splitlines()[1:done + 1]

    resumed = subprocess.run(_cli("train", "--resume", run, "--nproc", 2), env=env, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == EPOCHS and not summary["interrupted"]
    lines = metrics.read_text().splitlines()
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(1, EPOCHS + 1))  # each epoch once
    assert lines[1:done + 1] == kept  # the rows before the cut are the ones written then
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == EPOCHS
    names = sorted(p.name for p in run.iterdir())
    assert not [n for n in names if n.startswith(".")], names  # no temp file left by a second writer
    for name in ("model.safetensors", "model.onnx", "summary.json", "val.json", "report.html", "split.csv"):
        assert name in names

    rows_file = tmp_path / "rows.csv"
    assert main(["-q", "predict", str(run), str(tree), "--out", str(rows_file)]) == 0
    rows = list(csv.DictReader(rows_file.open()))
    assert len(rows) == 30
    right = sum(row["label"] == os.path.basename(os.path.dirname(row["path"])) for row in rows)
    assert right >= 24  # three colour-and-stripe classes: learned


def test_features_extracted_in_shares_fit_the_head_of_one_process(tree, tmp_path):
    """The features strategy on 2 processes: each extracts its half of the images' views, rank 0
    gathers them and fits the head; every image's views come from its own seed, so the head is the
    one a single process fits."""
    imgcls.train(tree, tmp_path / "source", epochs=1, **QUIET)
    options = dict(QUIET, weights=str(tmp_path / "source"), strategy="features", views=2)
    imgcls.train(tree, tmp_path / "one", **options)
    imgcls.train(tree, tmp_path / "two", nproc=2, **options)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=key)
    info = [json.loads((tmp_path / run / "features.json").read_text()) for run in ("one", "two")]
    assert (info[0]["processes"], info[1]["processes"]) == (1, 2)
    assert info[1]["n_train"] == info[0]["n_train"] and info[1]["n_val"] == info[0]["n_val"]
    assert info[1]["penalty"] == info[0]["penalty"]


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=7), "must split evenly between them; use a multiple of 2"),
    (dict(sync_bn=True), "--sync-bn needs GPUs"),
])
def test_what_several_processes_cannot_do_is_refused_before_they_start(tree, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        imgcls.train(tree, tmp_path / "run", nproc=2, **dict(QUIET, epochs=1, **change))
    assert not (tmp_path / "run").exists()


def test_a_worker_s_user_error_reaches_the_caller_with_its_message(tmp_path):
    make_class_tree(tmp_path / "one", {"cat": 6}, size=(32, 32))
    with pytest.raises(UserError, match="only one class"):
        imgcls.train(tmp_path / "one", tmp_path / "run", nproc=2, **dict(QUIET, epochs=1))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_tail_strategy_refuses_several_processes(monkeypatch):
    """Its last-stage epochs run on one cached set of maps: on 2 processes it says so and what to use."""
    from types import SimpleNamespace

    from imgcls.train import features, strategies, tail
    from imgcls.train.config import TrainConfig

    monkeypatch.setattr(features, "readout_problem", lambda session: None)  # a model the tail path can take
    monkeypatch.setattr(tail, "tail_problem", lambda session: None)
    cfg = TrainConfig(data="d", out="o", strategy="tail", pretrained=True)
    session = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), balance=None, world=2, strategy="")
    with pytest.raises(UserError, match="the tail strategy runs in one process.*--strategy features or finetune"):
        strategies.choose(session)
    session.world = 1
    assert strategies.choose(session) is strategies.STRATEGIES["tail"]
