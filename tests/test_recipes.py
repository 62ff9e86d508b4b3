"""Recipes (--recipe), counted training FLOPs, the weight EMA, gradient accumulation, channels-last,
host synchronisation of the loop and flip TTA for eval."""

import copy
import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from conftest import FAST
from safetensors.torch import load_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import imgcls
from imgcls import rundir
from imgcls.cli import build_parser, main
from imgcls.data.decode import load_uint8
from imgcls.data.preprocess import Augment, Preprocess
from imgcls.errors import UserError
from imgcls.models.classifier import Classifier
from imgcls.models.cost import count_macs
from imgcls.models.heads import head_prefix
from imgcls.models.registry import create_model
from imgcls.train import flops, loop
from imgcls.train.accel import WeightEma, training_layout
from imgcls.train.config import TrainConfig, options_from_args, validate
from imgcls.train.recipes import RECIPES, with_recipe
from imgcls.evaluation.tta import TTA, TTAEngine, with_tta


def _config(argv: list[str]) -> TrainConfig:
    """The TrainConfig a `train` command line resolves to (as imgcls.train builds it)."""
    options = options_from_args(build_parser().parse_args(["train", "d", "--out", "o", *argv]))
    cfg = TrainConfig.from_dict({"data": "d", "out": "o", **with_recipe(options)})
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- recipes


def test_a_recipe_fills_the_options_not_given_and_every_given_flag_wins():
    plain = _config([])
    speed = _config(["--recipe", "cifar10-speed"])
    recipe = RECIPES["cifar10-speed"].options
    assert speed.recipe == "cifar10-speed"
    for key, value in recipe.items():
        if key != "augment":
            assert getattr(speed, key) == value, key
    assert (speed.model, speed.batch_size, speed.schedule, speed.muon) == ("airbench94", 2000, "triangle", [0.24, 0.6])
    assert speed.model != plain.model and speed.batch_size != plain.batch_size
    # explicit flags override, the rest of the recipe stays
    given = _config(["--recipe", "cifar10-speed", "--epochs", "3", "--model", "cifarnet", "--no-norm-weight-decay"])
    assert (given.epochs, given.model, given.norm_weight_decay) == (3, "cifarnet", False)
    assert (given.batch_size, given.lr, given.label_smoothing) == (2000, recipe["lr"], recipe["label_smoothing"])
    # augmentation: the recipe's changes, and an augmentation flag changes only its own setting
    assert speed.augment == {**Augment().to_dict(), **recipe["augment"]}
    flipless = _config(["--recipe", "cifar10-speed", "--no-flip"])
    assert flipless.augment == {**Augment().to_dict(), **recipe["augment"], "hflip": False}
    # without a recipe nothing changes
    assert _config(["--epochs", "3"]) == TrainConfig(data="d", out="o", epochs=3)


def test_a_recipe_trains_end_to_end_from_the_command_line(tiny_tree, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_tree), "--out", str(run), "--recipe", "scratch-small", "--epochs", "3",
                 "--batch-size", "8", "--workers", "0", "--int8", "off"]) == 0
    saved = rundir.read_yaml(run / rundir.CONFIG)
    assert (saved["recipe"], saved["model"], saved["ema"], saved["epochs"]) == ("scratch-small", "airbench", 0.999, 3)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "airbench" and summary["best_val_accuracy"] > 0.5  # 3 classes: chance is 1/3
    assert "PFLOP" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_names_declared_options_with_valid_values(name):
    options = RECIPES[name].options
    assert set(options) <= {f.name for f in fields(TrainConfig)}
    assert set(options.get("augment", {})) <= set(Augment().to_dict())
    cfg = TrainConfig.from_dict({"data": "d", "out": "o", **with_recipe({"recipe": name})})
    validate(cfg)
    create_model(cfg.model, 10, cfg.input_size or 32)  # its model is registered and builds


def test_recipes_are_listed_and_an_unknown_one_is_refused(capsys):
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in RECIPES) and "--batch-size 2000" in listed
    assert "--muon 0.24 0.6" in listed and "--no-lookahead" in listed  # a list and a switch turned off
    assert main(["train", "--recipe", "list"]) == 0  # no data needed to list them
    assert capsys.readouterr().out == listed
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "d", "--out", "o", "--recipe", "nonsense"])
    with pytest.raises(UserError, match="unknown --recipe 'nonsense'"):
        with_recipe({"recipe": "nonsense"})


def test_ema_flag_alone_takes_its_default_decay():
    assert _config(["--ema"]).ema == 0.999
    assert _config(["--ema", "0.9"]).ema == 0.9
    assert _config([]).ema is None
    with pytest.raises(UserError, match="--ema 1.5 is out of range"):
        _config(["--ema", "1.5"])


def test_ema_alone_before_the_data_leaves_the_data_positional():
    from imgcls.train.config import complete_optional_values

    argv = ["train", "--ema", "my_images", "--out", "run", "--ema", "0.99", "--ema"]
    assert complete_optional_values(argv) == ["train", "--ema", "0.999", "my_images", "--out", "run", "--ema", "0.99",
                                              "--ema"]
    args = build_parser().parse_args(complete_optional_values(["train", "--ema", "my_images", "--out", "run"]))
    assert args.data == "my_images" and args.ema == 0.999
    with pytest.raises(SystemExit):  # what argparse alone does with it
        build_parser().parse_args(["train", "--ema", "my_images", "--out", "run"])


def test_triangle_schedule_rises_over_the_warmup_and_falls_to_zero():
    from imgcls.train.optim import SCHEDULES

    tri = SCHEDULES["triangle"]
    values = [tri(s, 100, 20, 10, None) for s in range(101)]
    assert values[0] == pytest.approx(1 / 20) and values[19] == 1.0 and values[100] == 0.0
    assert values[60] == pytest.approx(0.5)  # halfway down the 80 decaying steps
    assert all(a <= b for a, b in zip(values[:20], values[1:20])) and all(a >= b for a, b in zip(values[19:],
                                                                                                 values[20:]))


def test_no_norm_weight_decay_leaves_vectors_undecayed():
    net = create_model("airbench", 10, 32)
    cfg = TrainConfig(data="d", out="o", optimizer="sgd", weight_decay=5e-4, norm_weight_decay=False)
    groups = loop.make_optimizer(net, cfg).param_groups
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    free = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    bn = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(p) for p in free} == {id(m.weight) for m in bn} | {id(m.bias) for m in bn} | {id(net.fc.bias)}
    assert all(p.ndim > 1 for p in decayed) and len(decayed) + len(free) == len(list(net.parameters()))
    cfg.norm_weight_decay = True
    assert all(g["weight_decay"] == 5e-4 for g in loop.make_optimizer(net, cfg).param_groups)


# --------------------------------------------------------------------------- FLOPs


def _one_step_flops(net: nn.Module, preprocess: Preprocess, batch: int, classes: int) -> int:
    """FLOPs of one real training step (CPU tensors, not the meta device the run counts on)."""
    model = Classifier(copy.deepcopy(net), preprocess).train()
    images = torch.randint(0, 256, (batch, 3, preprocess.input_size, preprocess.input_size), dtype=torch.uint8)
    targets = torch.randint(0, classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(images), targets).backward()
    return counter.get_total_flops()


def test_train_flops_are_the_steps_times_one_counted_step(tiny_tree, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_tree), "--out", str(run), "--model", "cifarnet", "--epochs", "2",
                 "--batch-size", "8", "--workers", "0", "--lr", "3e-3", "--int8", "off"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    preprocess = Preprocess.from_dict(rundir.read_json(run / "preprocess.json"))
    per_step = _one_step_flops(create_model("cifarnet", 3, 32), preprocess, 8, 3)
    steps_per_epoch = summary["n_train"] // 8  # full batches only (drop_last)
    assert summary["train_flops"] == 2 * steps_per_epoch * per_step
    # the analytic estimate: 3 x the forward multiply-adds x 2 FLOPs, per image trained on
    analytic = 3 * 2 * count_macs(create_model("cifarnet", 3, 32), 32) * 2 * steps_per_epoch * 8
    assert 0.5 < summary["train_flops"] / analytic < 2
    assert summary["eval_flops"] == 2 * summary["n_val"] * 2 * count_macs(create_model("cifarnet", 3, 32), 32,
                                                                           include_bias=False)
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    column = rows[0].index("train_flops")
    assert [int(r[column]) for r in rows[1:]] == [steps_per_epoch * per_step, 2 * steps_per_epoch * per_step]
    out = capsys.readouterr().out
    assert f"{summary['train_flops'] / 1e15:.3g} PFLOP" in out.splitlines()[0]


class _DepthwiseNet(nn.Module):
    """A full convolution, then a depthwise one (groups = channels), as in EfficientNet's blocks."""

    def __init__(self):
        super().__init__()
        self.full = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)

    def forward(self, x):
        return self.depthwise(self.full(x.float())).mean((2, 3))


def test_a_depthwise_convolution_s_backward_counts_its_own_multiply_adds():
    batch, size = 4, 8
    full = 2 * batch * 16 * 3 * 9 * size * size      # 2 FLOPs per multiply-add
    depthwise = 2 * batch * 16 * 1 * 9 * size * size  # one input channel per output channel
    counted = flops.step_flops(_DepthwiseNet(), nn.CrossEntropyLoss(), batch, size, np.int64(0))
    # the full conv: forward + weight gradient (its input needs no gradient); the depthwise one: forward +
    # input gradient + weight gradient, each as dear as its forward pass
    assert counted == 2 * full + 3 * depthwise
    # torch's own count of the same step makes the depthwise weight gradient 16x too dear
    net = _DepthwiseNet()
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(net(torch.zeros(batch, 3, size, size)), torch.zeros(batch, dtype=torch.long)).backward()
    assert counter.get_total_flops() == 2 * full + 2 * depthwise + 16 * depthwise


def test_efficientnet_s_training_step_is_about_three_forward_passes():
    model = Classifier(create_model("efficientnet_lite0", 4), Preprocess(input_size=224))
    forward = flops.forward_flops(model, 1, 224)
    step = flops.step_flops(model, nn.CrossEntropyLoss(), 2, 224, np.int64(0)) / 2
    assert 0.76e9 < forward < 0.78e9   # 0.385 G multiply-adds, the published 390 M
    assert 2.9 < step / forward <= 3.0   # the stem's input gradient is the only pass not run


def test_the_head_only_epochs_count_no_backward_through_the_backbone(tiny_tree, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(tiny_tree), "--out", str(run), "--model", "cifarnet", "--epochs", "2",
                 "--head-epochs", "1", "--batch-size", "8", "--workers", "0", "--int8", "off"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    preprocess = Preprocess.from_dict(rundir.read_json(run / "preprocess.json"))
    steps = summary["n_train"] // 8
    net = create_model("cifarnet", 3, 32)
    everything = _one_step_flops(net, preprocess, 8, 3)
    for name, p in net.named_parameters():
        p.requires_grad = name.startswith(head_prefix(net))  # the head alone, as the first epoch trains it
    head_only = _one_step_flops(net, preprocess, 8, 3)
    assert head_only < everything / 2
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    column = rows[0].index("train_flops")
    assert [int(r[column]) for r in rows[1:]] == [steps * head_only, steps * (head_only + everything)]


def test_a_resumed_run_keeps_counting_from_its_checkpoint(tiny_tree, tmp_path):
    run = tmp_path / "run"
    first = imgcls.train(tiny_tree, run, epochs=1, progress=False, ema=0.9, **FAST).summary
    second = imgcls.train(None, run, resume=True, epochs=2, progress=False).summary
    assert second["train_flops"] == 2 * first["train_flops"] and second["eval_flops"] == 2 * first["eval_flops"]
    state = loop.load_checkpoint(run / rundir.CHECKPOINT)
    assert state["flops"]["train"] == second["train_flops"] and state["ema"]["steps"] == 2 * (first["n_train"] // 8)


# --------------------------------------------------------------------------- EMA


def test_weight_ema_follows_its_warmed_up_decay():
    net = nn.Linear(2, 1, bias=False)
    ema = WeightEma(net, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
        ema.update()  # the first step copies the weights
        assert ema.model.weight.tolist() == [[1.0, 1.0]]
        net.weight.fill_(3.0)
        ema.update()  # second step: decay min(0.5, 1 - 2 ** -0.75) = 0.4054...
        d = 1 - 2 ** -0.75
        assert ema.model.weight[0, 0].item() == pytest.approx(d * 1.0 + (1 - d) * 3.0, abs=1e-6)
        for _ in range(20):
            ema.update()  # the decay reaches its cap
        net.weight.fill_(5.0)
        before = ema.model.weight[0, 0].item()
        ema.update()
        assert ema.model.weight[0, 0].item() == pytest.approx(0.5 * before + 0.5 * 5.0, abs=1e-6)


def test_ema_weights_are_validated_and_saved_not_the_raw_ones(tiny_tree, tmp_path):
    result = imgcls.train(tiny_tree, tmp_path / "run", epochs=1, progress=False, ema=0.9, norm="batch",
                          **{**FAST, "lr": 0.05})
    run = result.run_dir
    state = loop.load_checkpoint(run / rundir.CHECKPOINT)
    saved = load_file(str(run / rundir.WEIGHTS))
    averaged = {k.removeprefix("net."): v for k, v in state["ema"]["state"].items()}
    assert state["ema"]["steps"] > 1 and set(saved) == set(averaged) == set(state["model"])
    for key, value in saved.items():
        assert torch.equal(value, averaged[key]), key  # the one epoch is the best: its EMA weights are saved
    assert any(not torch.allclose(value, state["model"][key]) for key, value in saved.items()
               if value.is_floating_point())
    # BatchNorm statistics are averaged too
    assert not torch.allclose(saved["features.1.running_mean"], state["model"]["features.1.running_mean"])


# --------------------------------------------------------------------------- the loop


def _batches(seed: int, sizes: list[int], classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, classes, (n,), generator=g)) for n in sizes]


def _train(batches, accum_steps: int, layout=torch.contiguous_format, norm=None):
    torch.manual_seed(0)
    model = Classifier(create_model("cifarnet", 3, 32, norm=norm), Preprocess(input_size=32))
    model.to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    row = loop.train_one_epoch(model, batches, nn.CrossEntropyLoss(), optimizer, scheduler, torch.device("cpu"),
                               None, None, scaler, accum_steps=accum_steps, memory_format=layout)
    return model, scheduler.last_epoch, row


def test_k_accumulated_batches_make_the_step_of_one_batch_k_times_larger():
    small = _batches(0, [4] * 10)  # 10 batches of 4 with K=4: groups of 4, 4 and the last 2
    merged = [(torch.cat([x for x, _ in small[a:b]]), torch.cat([y for _, y in small[a:b]]))
              for a, b in ((0, 4), (4, 8), (8, 10))]
    accumulated, steps_a, row_a = _train(small, accum_steps=4)
    one_step, steps_b, row_b = _train(merged, accum_steps=1)
    assert steps_a == steps_b == 3  # the scheduler counts optimizer steps
    for (name, a), b in zip(accumulated.state_dict().items(), one_step.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert row_a["train_loss"] == pytest.approx(row_b["train_loss"], rel=1e-4)
    assert row_a["images"] == row_b["images"] == 40
    without, _, _ = _train(small, accum_steps=1)  # and it is not what ten separate steps give
    assert not torch.allclose(without.net.classifier[5].weight, one_step.net.classifier[5].weight, atol=1e-3)


def test_channels_last_trains_the_same_model():
    batches = _batches(1, [8, 8, 8])
    plain, _, _ = _train(batches, 1, norm="batch")
    last, _, _ = _train(batches, 1, torch.channels_last, norm="batch")
    assert last.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    for (name, a), b in zip(plain.state_dict().items(), last.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert training_layout("auto", cpu, "cnn") == training_layout("on", cpu, "linear") == torch.channels_last
    assert training_layout("auto", cpu, "linear") == training_layout("off", gpu, "cnn") == torch.contiguous_format
    assert training_layout("auto", gpu, "convnext") == torch.channels_last
    # measured per family on CPUs (benchmarks/layout.py): EfficientNet's depthwise convs gain, ConvNeXt does not
    assert training_layout("auto", cpu, "efficientnet") == torch.channels_last
    assert training_layout("auto", cpu, "convnext") == torch.contiguous_format


def test_the_loop_reads_figures_from_the_device_once_per_epoch(monkeypatch):
    reads = []
    real = torch.Tensor.item

    def counted(self):
        reads.append(1)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    _, _, row = _train(_batches(2, [4] * 12), accum_steps=1)
    assert len(reads) == 2  # the epoch's loss and hits, after the last of 12 steps
    assert 0 <= row["train_accuracy"] <= 1 and row["train_loss"] > 0


# --------------------------------------------------------------------------- TTA


def test_flip_tta_averages_the_logits_of_an_image_and_its_mirror():
    def left_minus_right(batch):  # logit 0: the left half's mean; logit 1: the right half's
        x = np.asarray(batch, dtype=np.float32)
        return np.stack([x[..., :2].mean((1, 2, 3)), x[..., 2:].mean((1, 2, 3))], 1)

    image = np.zeros((1, 3, 4, 4), np.uint8)
    image[..., :2] = 200  # bright on the left
    assert left_minus_right(image).tolist() == [[200.0, 0.0]]
    assert with_tta(left_minus_right, "flip")(image).tolist() == [[100.0, 100.0]]
    assert with_tta(left_minus_right, "none") is left_minus_right
    assert set(TTA) == {"none", "flip", "flip-shift"}
    with pytest.raises(UserError, match="unknown --tta"):
        with_tta(left_minus_right, "rotate")


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_eval_tta_flip_scores_the_mean_logits_of_each_image_and_its_mirror(tiny_tree, tmp_path_factory, backend,
                                                                           capsys):
    run = tmp_path_factory.getbasetemp() / "tta-run"
    if not (run / rundir.SUMMARY).exists():
        imgcls.train(tiny_tree, run, epochs=2, progress=False, **{**FAST, "export_onnx": True})
    from imgcls.api import evaluate
    from imgcls.prediction.predict import load

    kept_plain, kept_tta = [], []
    evaluate(run, tiny_tree, backend=backend, write=False, keep=kept_plain)
    metrics = evaluate(run, tiny_tree, backend=backend, write=False, keep=kept_tta, tta="flip")
    engine = load(run, backend=backend).engine
    assert not isinstance(engine, TTAEngine)
    paths, expected = kept_tta[0].paths, []
    for path in paths:
        x = load_uint8(path, Preprocess.from_dict(rundir.read_json(run / "preprocess.json")))[None]
        expected.append((engine(x)[0].astype(np.float64) + engine(np.ascontiguousarray(x[..., ::-1]))[0]) / 2)
    assert np.allclose(kept_tta[0].logits, np.stack(expected), atol=1e-4)
    assert not np.allclose(kept_tta[0].logits, kept_plain[0].logits, atol=1e-3)  # the mirror changes them
    assert 0 <= metrics.accuracy <= 1
    assert main(["eval", str(run), str(tiny_tree), "--tta", "flip", "--backend", backend, "--json",
                 "--no-report"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(metrics.accuracy)


def test_the_speed_net_has_its_cost_table_and_airbench94s_budget():
    from imgcls.models.cost import layer_table

    table = layer_table(create_model("airbench", 10, 32), 32)
    convs = [r for r in table.rows if r.layer.startswith("conv")]
    assert len(convs) == 7 and [r.filters for r in convs] == [24, 64, 64, 256, 256, 256, 256]
    assert table.macs == count_macs(create_model("airbench", 10, 32), 32)
    # airbench94's budget: about 0.36 PFLOP for its ~10 epochs of 50,000 images, 3 x forward FLOPs per image
    assert 0.3e15 < 10 * 50_000 * 3 * 2 * table.macs < 0.4e15


def test_compile_trains_through_the_compiled_module(tiny_tree, tmp_path, monkeypatch):
    from imgcls.train import accel

    compiled = []
    real = torch.compile

    def eager_compile(model, **kwargs):  # dynamo traces the step; the eager backend skips the C++ build
        compiled.append(model)
        return real(model, backend="eager", **kwargs)

    monkeypatch.setattr(accel.torch, "compile", eager_compile)
    from torch._dynamo.utils import counters

    counters.clear()
    result = imgcls.train(tiny_tree, tmp_path / "run", epochs=1, progress=False, compile=True, **FAST)
    assert len(compiled) == 1 and isinstance(compiled[0], Classifier)
    assert counters["stats"]["unique_graphs"] >= 1  # the training steps ran through dynamo
    assert result.summary["best_val_accuracy"] > 0 and (result.run_dir / rundir.WEIGHTS).exists()
    assert accel.training_model(compiled[0], False) is compiled[0]


def test_loop_options_on_a_strategy_without_the_loop_are_named_in_a_warning(caplog, monkeypatch):
    import logging
    from types import SimpleNamespace

    from imgcls.train.strategies import choose

    cfg = TrainConfig(data="d", out="o", pretrained=True, ema=0.99, accum_steps=2)
    session = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), balance=None, strategy="", world=1)
    with caplog.at_level(logging.WARNING, logger="imgcls"):
        choose(session, resume=True)  # resuming: finetune, which runs them
        assert not caplog.records
        cfg.strategy = "features"
        import imgcls.train.features as features

        monkeypatch.setattr(features, "readout_problem", lambda s: None)  # a linear head: no model to build
        choose(session)
    assert session.strategy == "features" and "--ema, --accum-steps" in caplog.text
