"""Muon for the convolution filters (``--muon LR MOMENTUM``, issue 15): the orthogonalised step against
torch's own Muon, the parameter groups airbench94_muon trains with, and the cifar10-quick recipe
that uses it, end to end."""

import copy

import pytest
import torch
from torch import nn

from imgcls import rundir
from imgcls.cli import main
from imgcls.models.registry import create_model
from imgcls.train import loop
from imgcls.train.config import TrainConfig
from imgcls.train.muon import MuonSGD, orthogonalize


@pytest.mark.parametrize("shape", [(16, 72), (72, 16)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    # singular values spread over a factor of 30; the update's scale does not matter
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    gains = torch.logspace(0, -1.5, k)
    out = orthogonalize(u[:, :k] @ torch.diag(gains) @ v[:, :k].T * 1e-4)
    assert out.shape == shape
    # a matrix polynomial of the update: the same singular vectors, every value pulled to 0.5-1.5
    inner = u[:, :k].T @ out @ v[:, :k]
    assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=1e-4)
    assert torch.diagonal(inner).min() > 0.5 and torch.diagonal(inner).max() < 1.5


def test_orthogonalize_in_bf16_as_on_a_gpu_is_the_fp32_result_to_bf16_precision():
    torch.manual_seed(0)
    update = torch.randn(64, 576)
    exact = orthogonalize(update)
    half = orthogonalize(update, dtype=torch.bfloat16)  # what a CUDA update gets by default
    assert half.dtype == torch.float32 and half.shape == exact.shape
    rel = (half - exact).norm() / exact.norm()
    assert 1e-4 < rel < 0.05, rel  # bf16's 8 mantissa bits: near, and not the fp32 path by accident


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9 or newer")
def test_a_muon_step_on_a_conv_filter_bank_is_torch_s_muon_on_it_flattened_after_renormalising():
    torch.manual_seed(0)
    conv = nn.Parameter(torch.randn(8, 4, 3, 3))
    flat = nn.Parameter(conv.detach().reshape(8, -1).clone())
    ours = MuonSGD([{"params": [conv], "lr": 0.2, "muon": True, "muon_momentum": 0.6, "momentum": 0.0,
                     "nesterov": False, "weight_decay": 0.0}], lr=0.2)
    # torch's momentum is an average, ours (airbench's) a sum: the same direction, which is all Muon keeps
    theirs = torch.optim.Muon([flat], lr=0.2, momentum=0.6, nesterov=True, weight_decay=0.0, ns_steps=3)
    for _ in range(3):
        grad = torch.randn(8, 4, 3, 3)
        conv.grad, flat.grad = grad.clone(), grad.reshape(8, -1).clone()
        with torch.no_grad():  # airbench's Muon first scales each filter bank to norm sqrt(out channels)
            flat.mul_(8 ** 0.5 / flat.norm())
        ours.step()
        theirs.step()
        # torch's Newton-Schulz runs in bfloat16: agreement within 1.5% of the learning rate (0.9% measured;
        # torch without momentum misses by more)
        assert torch.allclose(conv.detach().reshape(8, -1), flat.detach(), atol=0.2 * 0.015)


def test_with_muon_the_filters_take_muon_steps_and_every_vector_the_bias_rate():
    net = create_model("airbench93", 10, 32)
    cfg = TrainConfig(data="d", out="o", optimizer="sgd", lr=6.0, weight_decay=6e-4, momentum=0.85,
                      norm_lr_mult=16, muon=[0.24, 0.6])
    optimizer = loop.make_optimizer(net, cfg)
    assert isinstance(optimizer, MuonSGD)
    by_name = {g["name"].strip(): g for g in optimizer.param_groups}
    filters = [p for p in net.parameters() if p.requires_grad and p.ndim == 4]
    vectors = [p for p in net.parameters() if p.requires_grad and p.ndim == 1]
    assert len(filters) == 6 and len(vectors) == 7  # the stem's bias and six BatchNorm shifts
    muon_group = by_name["backbone muon"]
    assert {id(p) for p in muon_group["params"]} == {id(p) for p in filters}
    assert (muon_group["lr"], muon_group["muon_momentum"], muon_group["momentum"], muon_group["weight_decay"]) \
        == (0.24, 0.6, 0.0, 0.0)
    norm_group = by_name["backbone norm"]
    assert {id(p) for p in norm_group["params"]} == {id(p) for p in vectors}
    assert (norm_group["lr"], norm_group["weight_decay"], norm_group["momentum"]) == (96.0, 6e-4 / 16, 0.85)
    assert [p is net.fc.weight for p in by_name["head"]["params"]] == [True]
    assert (by_name["head"]["lr"], by_name["head"]["nesterov"]) == (6.0, True)
    # one step: the filters move by lr x an orthogonal update after renormalising, the rest as SGD
    nn.functional.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.arange(8)).backward()
    conv = net.layers[0][0].weight
    renormed = conv.detach() * len(conv) ** 0.5 / conv.detach().norm()
    expected = renormed - 0.24 * orthogonalize(conv.grad.reshape(len(conv), -1) * 1.6).view_as(conv)
    head_before, head_grad = net.fc.weight.detach().clone(), net.fc.weight.grad.clone()
    optimizer.step()
    assert torch.allclose(conv.detach(), expected, atol=1e-5)
    sgd_step = head_grad + 6e-4 * head_before
    assert torch.allclose(net.fc.weight.detach(), head_before - 6.0 * (sgd_step + 0.85 * sgd_step), atol=1e-5)


def test_muon_asks_for_sgd_beside_it_before_any_data_is_read(tiny_tree, tmp_path, capsys):
    assert main(["train", str(tiny_tree), "--out", str(tmp_path / "run"), "--model", "airbench93",
                 "--muon", "0.24", "0.6"]) != 0
    assert "--muon trains the parameters it does not take with SGD, not adamw: add --optimizer sgd" \
        in capsys.readouterr().err
    assert main(["train", str(tiny_tree), "--out", str(tmp_path / "run"), "--model", "airbench93",
                 "--optimizer", "sgd", "--muon", "0", "0.6"]) != 0
    assert "give a learning rate > 0" in capsys.readouterr().err


def test_the_muon_momentum_travels_in_the_state_dict_so_a_resumed_run_steps_alike():
    torch.manual_seed(0)
    grads = [torch.randn(8, 4, 3, 3) for _ in range(3)]

    def make(weight):
        p = nn.Parameter(weight.clone())
        return p, MuonSGD([{"params": [p], "lr": 0.1, "muon": True, "muon_momentum": 0.6, "momentum": 0.0,
                            "nesterov": False, "weight_decay": 0.0}], lr=0.1)

    p, optimizer = make(torch.randn(8, 4, 3, 3))
    p.grad = grads[0].clone()
    optimizer.step()
    saved = optimizer.state_dict()
    assert "muon_buffer" in saved["state"][0]
    q, resumed = make(p.detach())
    resumed.load_state_dict(copy.deepcopy(saved))  # as read back from a checkpoint: its own tensors
    r, fresh = make(p.detach())  # the same weights without the momentum
    for grad in grads[1:]:
        for param, opt in ((p, optimizer), (q, resumed), (r, fresh)):
            param.grad = grad.clone()
            opt.step()
    assert torch.equal(p, q)
    assert not torch.allclose(p, r, atol=1e-3)
    # a closure's gradients are the ones a step orthogonalises, and its loss is returned
    before = q.detach().clone()

    def closure():
        q.grad = grads[0].clone()
        return torch.tensor(1.5)

    q.grad = None
    assert resumed.step(closure) == 1.5 and not torch.equal(q, before)


def test_the_quick_recipe_trains_with_muon_end_to_end(tiny_tree, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(tiny_tree), "--out", str(run), "--recipe", "cifar10-quick", "--batch-size", "13",
                 "--epochs", "3", "--cache", "array", "--int8", "off", "--no-calibrate"]) == 0
    saved = rundir.read_yaml(run / rundir.CONFIG)
    assert (saved["model"], saved["optimizer"], saved["muon"], saved["lookahead"]) == \
        ("airbench93", "sgd", [0.24, 0.6], False)
    state = torch.load(run / rundir.CHECKPOINT, weights_only=True)
    assert sum("muon_buffer" in s for s in state["optimizer"]["state"].values()) == 6  # one per filter bank
    assert rundir.read_json(run / rundir.SUMMARY)["best_val_accuracy"] > 0.5  # 3 classes: chance is 1/3


def test_the_newton_schulz_flops_are_counted_as_torch_counts_them(tiny_tree, tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    convs = [nn.Parameter(torch.randn(8, 4, 3, 3)), nn.Parameter(torch.randn(16, 8, 3, 3))]
    optimizer = MuonSGD([{"params": convs, "lr": 0.1, "muon": True, "muon_momentum": 0.6, "momentum": 0.0,
                          "nesterov": False, "weight_decay": 0.0}], lr=0.1)
    with FlopCounterMode(display=False) as counter:
        for p in convs:
            orthogonalize(torch.randn(len(p), p[0].numel()))
    assert optimizer.step_flops() == counter.get_total_flops() > 0
    # a run counts them once per optimizer step, on top of the forward and backward passes
    flops = {}
    for name, extra in (("sgd", []), ("muon", ["--muon", "0.24", "0.6"])):
        run = tmp_path / name
        assert main(["train", str(tiny_tree), "--out", str(run), "--model", "airbench93", "--optimizer", "sgd",
                     "--epochs", "1", "--batch-size", "13", "--workers", "0", "--int8", "off",
                     "--no-calibrate", *extra]) == 0
        flops[name] = rundir.read_json(run / rundir.SUMMARY)["train_flops"]
    net = create_model("airbench93", 3, 32)
    per_step = loop.make_optimizer(net, TrainConfig(data="d", out="o", optimizer="sgd", muon=[0.24, 0.6])).step_flops()
    assert flops["muon"] - flops["sgd"] == per_step * 3  # 3 batches of 13 of the 39 training images
