"""Training options are declared once (TrainConfig's field metadata): parser, mapping and checks come from it."""

import argparse
import re
from dataclasses import fields

import pytest

from imgcls.cli import build_parser
from imgcls.errors import UserError
from imgcls.train.config import (AUGMENT_FLAGS, Interval, TrainConfig, add_train_arguments, declared, flag,
                                 options_from_args, validate)
from imgcls.train.optim import OPTIMIZERS, SCHEDULES
from imgcls.train.strategies import STRATEGIES


def _train_parser():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser


def test_every_cli_option_has_its_flag_help_and_choices():
    actions = {a.dest: a for a in _train_parser()._actions}
    for f, opt in declared():
        if not opt.cli:
            assert f.name not in actions
            continue
        action = actions[f.name]
        on_by_default = f.default is True  # a boolean on by default has its --no- form too
        assert action.option_strings == [flag(f.name), *(["--no-" + flag(f.name)[2:]] if on_by_default else [])]
        assert action.help == opt.help.replace("%", "%%") and opt.help, f.name  # argparse's own % escape
        if opt.choices is not None:
            assert tuple(action.choices) == opt.choices(), f.name
    assert tuple(actions["optimizer"].choices) == tuple(OPTIMIZERS)
    assert tuple(actions["schedule"].choices) == tuple(SCHEDULES)
    assert tuple(actions["strategy"].choices) == ("auto", *STRATEGIES)


def test_unset_flags_stay_unset_and_set_ones_map_to_fields():
    args = build_parser().parse_args(["train", "d", "--out", "o", "--lr", "0.1", "--pretrained", "--mean", "0.1",
                                      "0.2", "0.3", "--epochs", "3", "--no-flip", "--color-jitter", "0"])
    options = options_from_args(args)
    assert options.pop("augment") == {**TrainConfig(data="", out="").augment, "hflip": False, "color_jitter": 0.0}
    assert options == {"lr": 0.1, "pretrained": True, "mean": [0.1, 0.2, 0.3], "epochs": 3}
    assert options_from_args(build_parser().parse_args(["train", "d", "--out", "o"])) == {}
    three = options_from_args(build_parser().parse_args(["train", "d", "--color-jitter", "0.5,0.4,0.1"]))
    assert three["augment"]["color_jitter"] == [0.5, 0.4, 0.1]
    assert set(options) <= {f.name for f in fields(TrainConfig)}
    assert set(AUGMENT_FLAGS) & {f.name for f in fields(TrainConfig)} == set()


def _outside(interval: Interval):
    if interval.low is not None:
        return interval.low if interval.closed in ("neither", "right") else interval.low - 1
    return interval.high + 1


@pytest.mark.parametrize("name", [f.name for f, opt in declared() if opt.range is not None])
def test_every_declared_range_is_enforced(name):
    interval = dict((f.name, opt) for f, opt in declared())[name].range
    bad = TrainConfig(data="d", out="o", **{name: _outside(interval)})
    with pytest.raises(UserError, match=rf"^{flag(name)} .* is out of range: it must be {re.escape(str(interval))}$"):
        validate(bad)


@pytest.mark.parametrize("name", [f.name for f, opt in declared() if opt.choices is not None])
def test_every_declared_choice_is_enforced(name):
    with pytest.raises(UserError, match=rf"^unknown {flag(name)} 'nonsense'; use one of "):
        validate(TrainConfig(data="d", out="o", **{name: "nonsense"}))


def test_defaults_are_valid_and_intervals_read_well():
    validate(TrainConfig(data="d", out="o"))
    assert str(Interval(0, None, "neither")) == "> 0" and str(Interval(1, None)) == ">= 1"
    assert str(Interval(0, 1, "left")) == "in [0, 1)" and str(Interval(0, 1, "neither")) == "in (0, 1)"
    assert 0.5 in Interval(0, 1, "neither") and 1 not in Interval(0, 1, "neither") and 0 in Interval(0, 1, "left")
