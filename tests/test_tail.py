"""The tail strategy: the last stage and the head fine-tuned on cached trunk maps."""

import json
import logging

import numpy as np
import pytest
import torch
from imagezoo import make_class_tree
from safetensors.torch import load_file

import imgcls
from imgcls.errors import UserError
from imgcls.models.registry import create_model, model_spec
from imgcls.models.tail import TAILS, split, split_problem
from imgcls.train import strategies

# int8 off: its gate has its own tests (test_int8.py), and every exported run here would pay for it
QUICK = dict(batch_size=8, workers=0, progress=False, input_size=32, views=2, int8="off")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    make_class_tree(root, {"cat": 10, "dog": 10, "fox": 10}, size=(48, 48), seed=4)
    return root


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A resnet18 weight file with a 1000-class head (as ImageNet weights would have)."""
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.manual_seed(0)
    net = create_model("resnet18", 1000, 32)
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


@pytest.fixture(scope="module")
def tail_run(tree, r18, tmp_path_factory):
    out = tmp_path_factory.mktemp("tail") / "run"
    return imgcls.train(tree, out, model="resnet18", weights=str(r18[0]), strategy="tail", epochs=2,
                        time_budget=600, export_onnx=True, **QUICK)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "convnextv2_atto"])
def test_the_last_stage_run_alone_equals_the_whole_network(name):
    torch.manual_seed(0)
    net = create_model(name, 3, 64).eval()
    for m in net.modules():  # a non-zero head, so that a wrong split shows in the logits
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight)
    trunk, tail = split(net, model_spec(name).family)
    x = torch.randn(2, 3, 64, 64)
    assert split_problem(net, trunk, tail, x) is None
    with torch.no_grad():
        assert trunk(x).ndim == 4 and tail.features(trunk(x)).ndim == 2
    # the tail holds the net's own modules: training one trains the other
    assert tail.parts[-1] is net.get_submodule(TAILS[model_spec(name).family][-1])


def test_a_wrong_split_is_caught():
    net = create_model("resnet18", 3, 64).eval()
    torch.nn.init.normal_(net.fc.weight)
    trunk, tail = split(net, "resnet")
    tail.parts = torch.nn.ModuleList([net.avgpool, net.fc])  # layer4 left out
    trunk.first = "avgpool"
    assert split_problem(net, trunk, tail, torch.randn(2, 3, 64, 64)) is None  # still consistent: trunk ends later
    trunk.first = "layer4"
    assert "cannot run on the trunk's output" in split_problem(net, trunk, tail, torch.randn(2, 3, 64, 64))
    tail.parts = torch.nn.ModuleList([net.layer4, net.fc])  # the pooling left out: flattened maps reach fc
    assert "cannot run on the trunk's output" in split_problem(net, trunk, tail, torch.randn(2, 3, 64, 64))


def test_a_tail_run_records_what_it_did(tail_run):
    run = tail_run.run_dir
    assert tail_run.summary["strategy"] == "tail"
    info = json.loads((run / "features.json").read_text())
    assert info["strategy"] == "tail" and info["epochs"] == 2 and info["views"] == 2
    assert info["map_shape"] == [256, 8, 8]  # resnet18 layer3 at 32 px (small-input stem: stride 1)
    assert info["engine"].startswith("onnxruntime")
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header + one row per epoch of the last stage


def test_only_the_last_stage_and_the_head_change(tail_run, r18):
    saved = load_file(str(tail_run.run_dir / "model.safetensors"))
    changed = {k for k, v in r18[1].items() if k in saved and saved[k].shape == v.shape and not torch.equal(saved[k], v)}
    assert changed and all(k.startswith(("layer4.", "fc.")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("layer4.") and k.endswith("weight") for k in changed)  # the stage did train
    assert any(k.endswith("running_mean") for k in changed if k.startswith("layer4."))  # its BatchNorm too


def test_the_saved_model_predicts_what_the_fit_measured(tail_run):
    from test_transfer import _val_batch

    run = tail_run.run_dir
    paths, batch, targets = _val_batch(run)
    predictor = imgcls.load(run, backend="onnx", precision="fp32")
    full = predictor.engine(batch)
    classifier, _ = imgcls.models.classifier.Classifier.from_file(run / "model.safetensors")
    trunk, tail = split(classifier.net, "resnet")
    with torch.no_grad():
        x = classifier.normalize(torch.from_numpy(batch))
        fit_logits = tail.eval()(trunk.eval()(x)).numpy()
    assert np.abs(fit_logits - full).max() <= 1e-4 * max(1.0, np.abs(full).max())
    val = json.loads((run / "val.json").read_text())
    assert val["accuracy"] == pytest.approx(tail_run.summary["best_val_accuracy"])
    assert np.mean(full.argmax(1) == targets) == pytest.approx(val["accuracy"])


def test_the_time_budget_plans_the_epochs(tree, r18, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="imgcls"):
        tight = imgcls.train(tree, tmp_path / "tight", model="resnet18", weights=str(r18[0]), strategy="tail", epochs=50,
                             time_budget=0.01, export_onnx=False, **QUICK)
    info = json.loads((tight.run_dir / "features.json").read_text())
    assert info["epochs"] == 1 and info["time_budget"] == 0.01  # the minimum: one epoch
    assert any("fine-tuning the last stage for 1 epoch(s)" in r.getMessage() for r in caplog.records)


def test_tail_needs_a_declared_stage(tree, tmp_path):
    torch.manual_seed(0)
    net = create_model("cifarnet", 3, 32)
    torch.save(net.state_dict(), tmp_path / "c.pth")
    with pytest.raises(UserError, match="--strategy tail cannot be used with this model: cifarnet declares no"):
        imgcls.train(tree, tmp_path / "run", model="cifarnet", weights=str(tmp_path / "c.pth"), strategy="tail",
                     export_onnx=False, **QUICK)


def test_strategy_table_choice():
    assert strategies.resolve_strategy("tail", pretrained=True, weights=None, device_type="cpu")[0] == "tail"
    assert strategies.resolve_strategy("auto", pretrained=True, weights=None, device_type="cpu")[0] == "features"
    with pytest.raises(UserError, match="cannot be used with this model: no stage"):
        strategies.resolve_strategy("tail", pretrained=True, weights=None, device_type="cpu", tail_problem="no stage")
    with pytest.raises(UserError, match="no checkpoint to resume"):
        strategies.resolve_strategy("tail", pretrained=True, weights=None, device_type="cpu", resume=True)
    with pytest.raises(UserError, match="--pretrained or --weights"):
        strategies.resolve_strategy("tail", pretrained=False, weights=None, device_type="cpu")
