"""airbench94 as published (issue 15): the whitening stem set from the data, shift-only BatchNorm,
BatchNorm shifts at a multiple of the learning rate, airbench's triangle, lookahead, alternating
flips and the six-view flip-shift TTA; and the cifar10-speed recipe (airbench94_muon's training of
the net), end to end."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from imgcls import rundir
from imgcls.cli import main
from imgcls.data.batch_augment import BatchAugment, fixed_half
from imgcls.data.decode import load_uint8
from imgcls.data.preprocess import Augment, Preprocess
from imgcls.models.classic import ShiftOnlyBatchNorm, WhiteningConv
from imgcls.models.registry import create_model
from imgcls.train import loop
from imgcls.train.accel import Lookahead
from imgcls.train.config import TrainConfig
from imgcls.train.optim import SCHEDULES
from imgcls.evaluation.tta import with_tta


def _patch_covariance(images: torch.Tensor, k: int = 2) -> torch.Tensor:
    c = images.shape[1]
    patches = images.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c * k * k)
    return patches.T @ patches / len(patches)


# --------------------------------------------------------------------------- the net


def test_the_whitening_stem_decorrelates_the_patches_it_was_set_from():
    torch.manual_seed(0)
    mix = torch.randn(3, 3)
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 16, 16))  # correlated channels
    images = images + 0.5 * images.roll(1, dims=3)  # and correlated neighbours
    stem = WhiteningConv(3, 2)
    assert "weight" not in dict(stem.named_parameters()) and "weight" in stem.state_dict()  # fixed, but saved
    stem.init_from_data(images)
    w = stem.weight.reshape(24, 12).double()
    cov = _patch_covariance(images).double()
    values = torch.linalg.eigvalsh(cov).flip(0)
    # the first 12 filters map the patches to unit variance and no correlation (up to eps); the rest are negatives
    assert torch.allclose(w[:12] @ cov @ w[:12].T, torch.diag(values / (values + stem.eps)), atol=1e-4)
    assert torch.equal(stem.weight[12:], -stem.weight[:12])


def test_shift_only_batchnorm_keeps_its_scale_at_one_and_trains_its_shift():
    bn = ShiftOnlyBatchNorm(4)
    assert [name for name, _ in bn.named_parameters()] == ["bias"]
    assert bn.weight.tolist() == [1.0] * 4 and bn.momentum == 0.4 and bn.eps == 1e-12
    x = torch.randn(8, 4, 5, 5)
    with torch.no_grad():
        bn.bias.fill_(0.3)
    expected = F.batch_norm(x, None, None, torch.ones(4), torch.full((4,), 0.3), True, 0.0, 1e-12)
    assert torch.allclose(bn(x), expected, atol=1e-5)


def test_airbench94_is_the_published_net():
    net = create_model("airbench94", 10, 32)
    assert isinstance(net.stem[0], WhiteningConv) and net.fc.bias is None and net.feature_scale == pytest.approx(1 / 9)
    assert all(isinstance(m, ShiftOnlyBatchNorm) for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    conv = net.layers[1][0]  # 64 -> 256: the first 64 filters start as identities
    assert torch.equal(conv.weight[:64, :, 1, 1], torch.eye(64)) and conv.weight[:64, :, 0, 0].abs().sum() == 0
    # the parameter count of the published net (1.97 M)
    assert sum(p.numel() for p in net.parameters()) == 1_971_352
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --------------------------------------------------------------------------- optimizer, schedule, lookahead


def test_norm_lr_mult_speeds_up_norm_layers_but_decays_them_as_much_per_step():
    net = create_model("airbench94", 10, 32)
    cfg = TrainConfig(data="d", out="o", optimizer="sgd", lr=1.5, weight_decay=1e-3, momentum=0.85, norm_lr_mult=64)
    optimizer = loop.make_optimizer(net, cfg)
    norm_ids = {id(m.bias) for m in net.modules() if isinstance(m, nn.BatchNorm2d)}
    for group in optimizer.param_groups:
        is_norm = {id(p) in norm_ids for p in group["params"]}
        assert len(is_norm) == 1
        assert (group["lr"], group["weight_decay"]) == ((96.0, 1e-3 / 64) if is_norm.pop() else (1.5, 1e-3))
    # with zero gradients a step is pure decay, the same fraction of every weight
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with torch.no_grad():
        for p in params:
            p.fill_(1.0)
            p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.allclose(torch.cat([p.detach().flatten() for p in params]), torch.tensor(1 - 1.5 * 1e-3 * 1.85))


def test_the_airbench_schedule_climbs_from_a_fifth_and_ends_at_seven_hundredths():
    tri = SCHEDULES["airbench"]
    values = [tri(s, 100, 23, 10, None) for s in range(101)]
    assert values[0] == pytest.approx(0.2) and values[23] == pytest.approx(1.0) and values[100] == pytest.approx(0.07)
    assert all(a < b for a, b in zip(values[:23], values[1:24])) and all(a > b for a, b in zip(values[23:],
                                                                                               values[24:]))


def test_lookahead_pulls_the_weights_to_a_slow_average_that_grows_stronger():
    torch.manual_seed(0)
    fast = nn.Linear(3, 2)
    plain = nn.Linear(3, 2)
    plain.load_state_dict(fast.state_dict())
    total = 40
    look = Lookahead(fast, total)
    grads = [torch.randn(2, 3) for _ in range(total)]
    slow = None
    with torch.no_grad():
        for step in range(1, total + 1):
            for net in (fast, plain):
                net.weight -= 0.1 * grads[step - 1]
            look.update()
            # the rule written out: from 30% of the steps, every 5th step
            if step >= 0.3 * total and step % 5 == 0:
                if slow is None:
                    slow = plain.weight.clone()
                else:
                    decay = 0.95 ** 5 * (step / total) ** 3
                    slow = decay * slow + (1 - decay) * plain.weight
                    plain.weight.copy_(slow)
            assert torch.allclose(fast.weight, plain.weight, atol=1e-6), step
            if step == total // 2:  # an epoch ends on the slow weights
                look.end_epoch()
                plain.weight.copy_(slow)
                assert torch.equal(fast.weight, look.slow["weight"])
    assert slow is not None and not torch.allclose(slow, fast.weight - 0.1 * grads[-1])
    # resuming from its state continues the same way
    again = Lookahead(fast, total)
    again.load_state_dict(look.state_dict())
    assert again.steps == total and torch.equal(again.slow["weight"], look.slow["weight"])


# --------------------------------------------------------------------------- alternating flips, TTA


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
    spec = Preprocess(input_size=8, resize="squash", crop_pct=1.0)
    augment = Augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), color_jitter=0.0, alternate_flip=True)
    images = torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8)
    index = torch.arange(1000, 1200)

    def flipped(epoch):
        out = BatchAugment(spec, augment)(images, torch.Generator().manual_seed(epoch), index=index, epoch=epoch)
        same = (out == images.float()).flatten(1).all(1)
        mirror = (out == images.float().flip(3)).flatten(1).all(1)
        assert (same | mirror).all()
        return mirror

    first, second, third = flipped(0), flipped(1), flipped(2)
    assert torch.equal(first, ~second) and torch.equal(first, third)  # each image both ways in two epochs
    assert 0.4 < first.float().mean() < 0.6
    assert torch.equal(fixed_half(index), first)
    # class-ordered rows are not split by parity
    assert 0.4 < fixed_half(torch.arange(0, 1000, 2)).float().mean() < 0.6


def test_flip_shift_tta_weights_the_six_views_as_airbench94():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(3 * 6 * 6, 4))

    def linear(batch):
        return np.asarray(batch, np.float64).reshape(len(batch), -1) @ weights

    x = rng.integers(0, 256, (5, 3, 6, 6)).astype(np.uint8)
    t = torch.from_numpy(x).double()
    padded = F.pad(t, (1,) * 4, mode="reflect")
    up_left, down_right = padded[..., 2:8, 2:8], padded[..., 0:6, 0:6]

    def mirror(v):
        return 0.5 * linear(v.numpy()) + 0.5 * linear(v.flip(3).numpy())

    expected = 0.5 * mirror(t) + 0.25 * mirror(up_left) + 0.25 * mirror(down_right)
    assert np.allclose(with_tta(linear, "flip-shift")(x), expected, atol=1e-3)


# --------------------------------------------------------------------------- the recipe, end to end


def test_the_speed_recipe_trains_whitens_exports_and_scores_with_six_views(tiny_tree, tmp_path, capsys):
    run = tmp_path / "run"
    # --no-augment: epoch 0's batches are then exactly the training images, so the stem can be checked
    assert main(["train", str(tiny_tree), "--out", str(run), "--recipe", "cifar10-speed", "--epochs", "3",
                 "--batch-size", "13", "--warmup-epochs", "1", "--cache", "array", "--no-augment",
                 "--int8", "off"]) == 0
    saved = rundir.read_yaml(run / rundir.CONFIG)
    assert (saved["model"], saved["muon"], saved["norm_lr_mult"]) == ("airbench94", [0.24, 0.6], 64.0)
    weights = load_file(str(run / rundir.WEIGHTS))
    spec = Preprocess.from_dict(rundir.read_json(run / "preprocess.json"))
    train_paths = [r["path"] for r in rundir.read_split(run / rundir.SPLIT) if r["split"] == "train"]
    assert len(train_paths) == 39  # 3 whole batches of 13: the init saw every training image
    images = torch.from_numpy(np.stack([load_uint8(p, spec) for p in train_paths])).float()
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    cov = _patch_covariance((images / 255 - mean) / std).double()
    w = weights["stem.0.weight"].reshape(24, 12).double()
    values = torch.linalg.eigvalsh(cov).flip(0)
    assert torch.allclose(w[:12] @ cov @ w[:12].T, torch.diag(values / (values + 5e-4)), atol=1e-3)
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in weights.items() if k.endswith(".weight") and v.ndim == 1)
    summary = rundir.read_json(run / rundir.SUMMARY)
    assert summary["best_val_accuracy"] > 0.5  # 3 learnable classes: chance is 1/3
    capsys.readouterr()
    scores = {}
    for backend in ("onnx", "torch"):
        assert main(["eval", str(run), str(tiny_tree), "--tta", "flip-shift", "--backend", backend, "--json",
                     "--no-report"]) == 0
        scores[backend] = json.loads(capsys.readouterr().out)
    assert scores["onnx"]["accuracy"] == pytest.approx(scores["torch"]["accuracy"])
    assert scores["onnx"]["loss"] == pytest.approx(scores["torch"]["loss"], abs=1e-3)


def test_the_whitening_bias_trains_in_the_first_three_epochs_only_and_its_gradient_is_then_not_counted(
        tiny_tree, tmp_path):
    net = create_model("airbench94", 3, 32)
    bias = net.stem[0].bias
    for epoch, trains in ((0, True), (2, True), (3, False), (9, False)):
        net.start_epoch(epoch)
        assert bias.requires_grad is trains
    # it only freezes: a backbone frozen by the loop stays frozen in the first epochs
    bias.requires_grad_(False)
    net.start_epoch(0)
    assert not bias.requires_grad
    # frozen, an SGD step with weight decay leaves it as it is, while the rest of the net moves
    before, conv = bias.detach().clone(), net.layers[0][0].weight.detach().clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    F.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    assert torch.equal(bias, before) and not torch.equal(net.layers[0][0].weight, conv)
    # a run: the 4th epoch runs no gradient into the stem, and its step counts fewer FLOPs
    run = tmp_path / "run"
    assert main(["train", str(tiny_tree), "--out", str(run), "--model", "airbench94", "--epochs", "4",
                 "--batch-size", "8", "--workers", "0", "--int8", "off", "--no-calibrate"]) == 0
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    column = rows[0].index("train_flops")
    totals = [0] + [int(r[column]) for r in rows[1:]]
    per_epoch = [b - a for a, b in zip(totals, totals[1:])]
    assert per_epoch[0] == per_epoch[1] == per_epoch[2] > per_epoch[3]
    # what the 4th epoch spares: the first group's input gradient, 24 -> 64 channels on 31 x 31 maps
    images = json.loads((run / "summary.json").read_text())["n_train"] // 8 * 8  # full batches
    assert per_epoch[2] - per_epoch[3] == 2 * 24 * 64 * 9 * 31 * 31 * images
