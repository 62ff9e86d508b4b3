"""Progressive resizing (--progressive MIN_PX SHARE): the sides of the epochs, the shrunk batches, the checks,
and a run whose early epochs train (and are counted) at the smaller side."""

import json

import numpy as np
import pytest
import torch
from conftest import FAST
from torch import nn

import imgcls
from imgcls import rundir
from imgcls.data.preprocess import Preprocess
from imgcls.errors import UserError
from imgcls.models.classifier import Classifier
from imgcls.models.registry import create_model
from imgcls.train import flops
from imgcls.train.progressive import check, epoch_size, shrink


def test_the_side_grows_in_eighths_of_the_full_size_until_the_share_of_the_epochs():
    assert [epoch_size(32, None, e, 5) for e in range(5)] == [32] * 5
    # 13 epochs, full size from epoch 0.7 x 13 = 9.1 -> 9 on (0-based); steps of 4 px
    assert [epoch_size(32, [24, 0.7], e, 13) for e in range(13)] == [24] * 5 + [28] * 4 + [32] * 4
    # 224 px grows in steps of 28 px: 168 + 56 x e / 5 floored to 28s
    assert [epoch_size(224, [168, 0.5], e, 10) for e in range(10)] == [168] * 3 + [196] * 2 + [224] * 5
    # a first side off the steps stays as given until the steps pass it
    assert [epoch_size(32, [18, 1.0], e, 4) for e in range(4)] == [18, 20, 24, 28]


def test_a_batch_is_shrunk_with_antialiasing_and_left_alone_at_its_size():
    flat = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    small = shrink(flat, 24)
    assert small.shape == (2, 3, 24, 24) and small.dtype == torch.float32
    assert torch.allclose(small, torch.full_like(small, 77.0))
    # a one-pixel checkerboard halved averages to grey (no aliasing to black or white)
    board = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 255).float().expand(1, 3, 32, 32)
    halved = shrink(board, 16)
    assert torch.allclose(halved[..., 1:-1, 1:-1], torch.full((1, 3, 14, 14), 127.5), atol=1e-3)
    assert halved.min() > 120 and halved.max() < 135  # the corners weigh their border pixels a little apart
    same = torch.rand(1, 3, 24, 24)
    assert shrink(same, 24) is same


@pytest.mark.parametrize("progressive, words", [([32, 0.5], "below the input size"), ([8, 0.5], "from 16"),
                                                ([20.5, 0.5], "whole number"), ([24, 0.0], "(0, 1]"),
                                                ([24, 1.5], "(0, 1]")])
def test_a_first_side_or_share_out_of_range_is_refused_with_the_range(progressive, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace("]", r"\]")):
        check(progressive, 32, 16, "airbench")
    check(None, 32, 16, "airbench")


def test_the_early_epochs_train_and_are_counted_at_the_smaller_side(tiny_tree, tmp_path, caplog):
    run = tmp_path / "run"
    caplog.set_level("INFO", logger="imgcls")
    options = {**FAST, "model": "airbench"}
    summary = imgcls.train(tiny_tree, run, epochs=3, progressive=[16, 0.5], progress=False, **options).summary
    assert "epoch 1/3 at 16 px" in caplog.text and "epoch 2/3 at 24 px" in caplog.text
    assert "epoch 3/3  train" in caplog.text  # the last at the full 32 px
    preprocess = Preprocess.from_dict(rundir.read_json(run / "preprocess.json"))
    assert preprocess.input_size == 32  # what is saved and exported: the full size
    model = Classifier(create_model("airbench", 3, 32), preprocess)
    per_step = {side: flops.step_flops(model, nn.CrossEntropyLoss(), 8, side, np.int64(0)) for side in (16, 24, 32)}
    steps = summary["n_train"] // 8
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    column, side = rows[0].index("train_flops"), rows[0].index("input_size")
    assert [int(r[side]) for r in rows[1:]] == [16, 24, 32]  # the side each epoch trained at
    assert [int(r[column]) for r in rows[1:]] == [steps * per_step[16], steps * (per_step[16] + per_step[24]),
                                                  steps * (per_step[16] + per_step[24] + per_step[32])]
    assert per_step[16] < per_step[24] < per_step[32]
    assert json.loads((run / "summary.json").read_text())["train_flops"] == summary["train_flops"]


def test_progressive_below_the_model_s_smallest_input_stops_before_training(tiny_tree, tmp_path):
    with pytest.raises(UserError, match="smallest input"):
        imgcls.train(tiny_tree, tmp_path / "run", epochs=2, progressive=[8, 0.5], progress=False,
                     **{**FAST, "model": "airbench"})
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_flag_takes_a_side_and_a_share_and_the_quick_recipe_brings_its_own():
    from imgcls.cli import build_parser
    from imgcls.train.config import TrainConfig, options_from_args, validate
    from imgcls.train.recipes import with_recipe

    def config(argv):
        options = options_from_args(build_parser().parse_args(["train", "d", "--out", "o", *argv]))
        cfg = TrainConfig.from_dict({"data": "d", "out": "o", **with_recipe(options)})
        validate(cfg)
        return cfg

    assert config(["--progressive", "24", "0.7"]).progressive == [24.0, 0.7]
    assert config([]).progressive is None
    assert config(["--recipe", "cifar10-quick"]).progressive == [24, 0.7]
    assert config(["--recipe", "cifar10-quick", "--progressive", "16", "0.5"]).progressive == [16.0, 0.5]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "d", "--progressive", "24"])
