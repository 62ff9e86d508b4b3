"""Every training option, declared once: :class:`TrainConfig`.

Each field carries its declaration in its metadata (:func:`option`): help
text, the table its choices come from, its allowed range.  The ``train``
parser, the mapping from parsed arguments to a config, and the validation are
all generated from it, as scikit-learn checks ``_parameter_constraints``; an
option is added by adding a field.

Torch-free at import: the command line builds its parser from this module for
every command, and ``imgcls predict`` runs without torch.
"""

from __future__ import annotations

import argparse
import functools
import logging
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable

from ..data.events import DEFAULT_GAP
from ..data.preprocess import PAD_MODES, Augment
from ..errors import UserError
from ..system import resolve_device
from .balance import BALANCE, SELECT_BY
from .optim import OPTIMIZERS, SCHEDULES
from .recipes import LIST, RECIPES
from ..tasks import TASKS
from .strategies import STRATEGIES, resolve_strategy

log = logging.getLogger("imgcls")

# --------------------------------------------------------------------------- constraints


@dataclass(frozen=True)
class Interval:
    """``low <op> value <op> high``; ``closed`` says which ends are included (``both``, ``left``, ``right``, ``neither``)."""

    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def __contains__(self, value) -> bool:
        left = self.closed in ("both", "left")
        right = self.closed in ("both", "right")
        if self.low is not None and not (value >= self.low if left else value > self.low):
            return False
        return self.high is None or (value <= self.high if right else value < self.high)

    def __str__(self) -> str:
        left = self.closed in ("both", "left")
        right = self.closed in ("both", "right")
        if self.high is None:
            return f"{'>=' if left else '>'} {self.low:g}"
        if self.low is None:
            return f"{'<=' if right else '<'} {self.high:g}"
        return f"in {'[' if left else '('}{self.low:g}, {self.high:g}{']' if right else ')'}"


@dataclass(frozen=True)
class Option:
    """How one TrainConfig field appears on the command line and what it accepts."""

    help: str
    choices: Callable[[], tuple] | None = None  # called late: tables may be filled by other modules
    range: Interval | None = None
    nargs: int | None = None
    cli: bool = True
    const: Any = None  # the value of the flag given without one (``--ema`` alone)
    metavar: tuple | None = None  # the names of a flag's values in --help


def option(default: Any = MISSING, help: str = "", *, factory: Callable | None = None, choices=None,
           range: Interval | None = None, nargs: int | None = None, cli: bool = True, const: Any = None,
           metavar: tuple | None = None):
    """A dataclass field declaring an option; ``choices`` is a table (dict) or a tuple of names."""
    names = (lambda: tuple(choices)) if choices is not None else None
    meta = {"option": Option(help, names, range, nargs, cli, const, metavar)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- choices

AMP = ("auto", "off", "bf16", "fp16")
CACHE = ("auto", "array", "ram", "none")
NORMS = ("batch", "group", "layer", "instance")
FREEZE = ("backbone",)
READOUTS = ("auto", "layers", "final")
GROUP_BY = ("event", "site", "none")
INT8 = ("auto", "off")
CHANNELS_LAST = ("auto", "on", "off")

_POSITIVE = Interval(0, None, "neither")
_NON_NEGATIVE = Interval(0, None)
_AT_LEAST_1 = Interval(1, None)
_FRACTION = Interval(0, 1, "neither")
_UNIT_RIGHT_OPEN = Interval(0, 1, "left")


# --------------------------------------------------------------------------- the config


@dataclass
class TrainConfig:
    """Every training option, resolved and saved as ``config.yaml``."""

    data: str = option(help="", cli=False)
    out: str = option(help="", cli=False)
    recipe: str | None = option(None, "a bundle of proven settings (`imgcls recipes`; list: print them), applied to"
                                " the options not given: every flag given overrides it", choices=(LIST, *RECIPES))
    model: str = option("resnet18", "architecture name (see `imgcls models`)")
    pretrained: bool = option(False, "start from the model's ImageNet weights (offline)")
    weights: str | None = option(None, "start from a local .safetensors/.pth file or another run directory")
    freeze: str | None = option(None, "train the classifier head only (linear probe)", choices=FREEZE)
    head_epochs: int = option(0, "two-phase fine-tuning: train the head alone this many epochs first",
                              range=_NON_NEGATIVE)
    backbone_lr_mult: float = option(1.0, "backbone learning rate = lr x this (discriminative rates)",
                                     range=_NON_NEGATIVE)
    strategy: str = option("auto", "features: fit the head on frozen features; tail: also fine-tune the last"
                           " stage on cached maps (both fast on CPUs); finetune: train by epochs; auto: features"
                           " when starting from weights on a CPU",
                           choices=("auto", *STRATEGIES))
    views: int = option(8, "features/tail strategies: crops per training image (center + augmented)",
                        range=_AT_LEAST_1)
    readout: str = option("auto", "features strategy: what the head reads. layers: the pooled outputs of the"
                          " last blocks beside the final features, standardized; final: the final features only;"
                          " auto: layers where the model declares them", choices=READOUTS)
    time_budget: float | None = option(None, "tail strategy: seconds the fit may take; the epochs of the last"
                                       " stage are planned to fit in it (default 180)", range=_POSITIVE)
    input_size: int | None = option(None, "input side in pixels (default: the model's; from scratch on smaller"
                                    " images, their median side)", range=_AT_LEAST_1)
    norm: str | None = option(None, "swap the normalization layers", choices=NORMS)
    se: bool = option(False, "insert squeeze-and-excitation blocks")
    epochs: int = option(10, "epochs to train", range=_AT_LEAST_1)
    batch_size: int = option(64, "images per training step", range=_AT_LEAST_1)
    optimizer: str = option("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float | None = option(None, "learning rate (default: the optimizer's)", range=_POSITIVE)
    weight_decay: float | None = option(None, "weight decay (default: the optimizer's)", range=_NON_NEGATIVE)
    momentum: float = option(0.9, "SGD momentum (Nesterov when > 0)", range=_UNIT_RIGHT_OPEN)
    muon: list[float] | None = option(None, "train the convolution filters with Muon (as airbench94_muon) at LR with"
                                      " Nesterov momentum MOMENTUM (e.g. 0.24 0.6); the other parameters with"
                                      " --optimizer sgd, every bias among them at the --norm-lr-mult rate",
                                      nargs=2, metavar=("LR", "MOMENTUM"))
    schedule: str = option("cosine", "learning-rate schedule (after the warm-up; triangle: linear down to 0;"
                           " airbench: up from 0.2 of the peak over the warm-up, then down to 0.07 of it)",
                           choices=SCHEDULES)
    warmup_epochs: float = option(1.0, "linear warm-up of the learning rate, in epochs", range=_NON_NEGATIVE)
    step_size: int = option(7, "schedule step: decay every this many epochs", range=_AT_LEAST_1)
    gamma: float = option(0.1, "schedule step: decay factor", range=_POSITIVE)
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy", range=_UNIT_RIGHT_OPEN)
    balance: str = option("auto", "imbalanced classes. " + "; ".join(f"{k}: {v}" for k, v in BALANCE.items()),
                          choices=BALANCE)
    select_by: str = option("auto", "what picks the best epoch and the head's penalty (cross-validated loss). "
                            + "; ".join(f"{k}: {v}" for k, v in SELECT_BY.items()), choices=SELECT_BY)
    norm_weight_decay: bool = option(True, "weight decay on normalization weights and biases too"
                                     " (--no-norm-weight-decay: on conv and linear weights only)")
    norm_lr_mult: float = option(1.0, "learning rate of the normalization layers' parameters = lr x this (their"
                                 " weight decay divided by it, so each step decays them as much as the rest)",
                                 range=_POSITIVE)
    clip_grad: float | None = option(None, "clip the gradient norm to this value", range=_POSITIVE)
    accum_steps: int = option(1, "gradient accumulation: one optimizer step per this many batches (an effective"
                              " batch of batch-size x this)", range=_AT_LEAST_1)
    ema: float | None = option(None, "keep an exponential moving average of the weights with this decay (--ema"
                               " alone: 0.999, warmed up over the first steps); the average is what is validated"
                               " and saved", range=_FRACTION, const=0.999)
    lookahead: bool = option(False, "lookahead (as airbench94): from 30% of the steps on, every 5 steps the weights"
                             " are pulled to a slow average of themselves, which grows stronger towards the end;"
                             " each epoch ends on the slow weights")
    progressive: list[float] | None = option(None, "progressive resizing: the first epochs train on smaller inputs"
                                              ", the side growing from MIN_PX to the input size at SHARE of the"
                                              " epochs (e.g. 24 0.7); val and export at the full size",
                                              nargs=2, metavar=("MIN_PX", "SHARE"))
    compile: bool = option(False, "torch.compile the training model (a slower start, faster steps; needs a C++"
                           " compiler on CPUs)")
    channels_last: str = option("auto", "channels-last memory format for training (auto: where it was measured"
                                " to help: GPUs; on CPUs the small CNNs, ResNet and EfficientNet)", choices=CHANNELS_LAST)
    amp: str = option("auto", "mixed precision (auto: on GPUs; on CPUs only when asked: bf16)", choices=AMP)
    augment: dict = option(help="", factory=lambda: Augment().to_dict(), cli=False)
    # the strategy's augmentation settings for data in capture bursts, less those given (train.prepare)
    burst_augment: dict = option(help="", factory=dict, cli=False)
    mean: list[float] | None = option(None, "normalization mean (R G B, in [0,1])", nargs=3)
    std: list[float] | None = option(None, "normalization std (R G B)", nargs=3)
    val_fraction: float = option(0.2, "held-out share when the data has no val split", range=_FRACTION)
    patience: int | None = option(None, "early stopping: epochs without val improvement", range=_AT_LEAST_1)
    seed: int = option(0, "random seed (split, initialization, augmentation)")
    workers: int | None = option(None, "data loading workers", range=_NON_NEGATIVE)
    cache: str = option("auto", "decode once. array: into a memory-mapped file in --cache-dir, reused by later runs"
                        " on the same files, batches augmented on the training device; ram: into memory, for this"
                        " run; none: decode every epoch; auto: array for images of at most 64 px, else ram when"
                        " they fit in 2 GB", choices=CACHE)
    cache_dir: str | None = option(None, "where --cache array keeps its files (default $IMGCLS_CACHE_DIR, else"
                                   " ~/.cache/imgcls/arrays)")
    export_onnx: bool = option(True, "", cli=False)
    calibrate: bool = option(True, "fit temperature scaling on val so that probabilities match accuracy"
                             " (calibration.json; --no-calibrate: raw softmax)")
    int8: str = option("auto", "auto: also write model.int8.onnx (faster prediction on CPUs), kept only when it loses"
                       " at most 1 point of val accuracy (--int8-max-loss), which export.json records; off: fp32"
                       " only", choices=INT8)
    int8_max_loss: float | None = option(None, "the int8 gate: the most val accuracy int8 may lose, in points"
                                         " (default 1; 0: int8 must score as well as fp32)", range=Interval(0, 100))
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    nproc: int = option(1, "data-parallel processes on this machine (torch.distributed: one per GPU, or CPU"
                        " processes with gloo); --batch-size is the batch of all of them together. Several"
                        " machines: start `torchrun ... -m imgcls.cli train` on each instead", range=_AT_LEAST_1)
    sync_bn: bool = option(False, "several processes on GPUs: BatchNorm statistics over the whole batch of all"
                           " processes (SyncBatchNorm) instead of each process's share")
    path_column: str = option("path", "CSV column with image paths")
    label_column: str = option("label", "CSV column with labels; several joined by commas (species,count) train"
                               " one head per column on one backbone (multioutput; an empty cell leaves that"
                               " head out for that image; the first column is the primary one)")
    output_weights: str | None = option(None, "multioutput: the loss weight of each label column's head, joined by"
                                        " commas in column order (e.g. 1,0.5,0.5; default 1 each)")
    label_sep: str | None = option(None, "multi-label CSV: the separator joining an image's labels in the label"
                                   " column (e.g. ';' for 'deer;fox')")
    task: str = option("auto", "multiclass: one class per image (softmax); multilabel: any set of labels per image"
                       " (a sigmoid each, thresholds tuned on val); binary-sigmoid: two classes as one logit,"
                       " P(second class) = sigmoid; multioutput: a softmax head per label column (several"
                       " --label-column); auto: multioutput for several label columns, multilabel when --label-sep"
                       " is given and some image has several labels, else multiclass", choices=("auto", *TASKS))
    group_by: str = option("event", "what a split keeps whole. event: capture events (an --event-column or"
                           " group column, else frames within --event-gap seconds per camera, from EXIF times);"
                           " site: whole cameras (a camera/site column, else the image's folder); none: images",
                           choices=GROUP_BY)
    event_column: str | None = option(None, "CSV column naming each image's capture event")
    event_gap: float = option(DEFAULT_GAP, "seconds between frames of one event grouped by time (EXIF, or a COCO"
                              " datetime)", range=_POSITIVE)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = read_aliases(data)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class Alias:
    """A former option, read as declared ones (with a deprecation warning)."""

    values: dict[str, dict[str, Any]]  # former value -> the declared options it means
    help: str


# former options: still read from command lines, API calls and the config.yaml of older runs
ALIASES = {
    # --class-weights balanced weighed the loss and selected by balanced accuracy; none selected by accuracy
    "class_weights": Alias({"auto": {"balance": "auto", "select_by": "auto"},
                            "none": {"balance": "none", "select_by": "accuracy"},
                            "balanced": {"balance": "weights", "select_by": "balanced_accuracy"}},
                           "deprecated: use --balance and --select-by"),
}


def read_aliases(options: dict) -> dict:
    """``options`` with every former option (:data:`ALIASES`) replaced by what it means; a former
    option that contradicts an option given beside it is a UserError."""
    out = dict(options)
    for name, alias in ALIASES.items():
        value = out.pop(name, None)
        if value is None:
            continue
        if not isinstance(value, str) or value not in alias.values:
            raise UserError(f"unknown {flag(name)} {value!r}; use one of {', '.join(alias.values)}"
                            f" ({alias.help})")
        meant = alias.values[value]
        spelled = " ".join(f"{flag(k)} {v}" for k, v in meant.items())
        for key, new in meant.items():
            if out.get(key) not in (None, new):
                raise UserError(f"{flag(name)} {value} means {spelled}, which contradicts {flag(key)} {out[key]};"
                                f" drop {flag(name)}")
        out.update(meant)
        log.warning("%s %s is deprecated: read as %s", flag(name), value, spelled)
    return out


def declared() -> list[tuple[Any, Option]]:
    """(dataclass field, Option) of every TrainConfig field."""
    return [(f, f.metadata["option"]) for f in fields(TrainConfig)]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: TrainConfig) -> None:
    """Check every option against its declaration; the first violation is a UserError."""
    for f, opt in declared():
        value = getattr(cfg, f.name)
        if value is None:
            continue
        _check_type(f, opt, value)
        if opt.choices is not None and value not in opt.choices():
            raise UserError(f"unknown {flag(f.name)} {value!r}; use one of {', '.join(opt.choices())}")
        if opt.range is not None and value not in opt.range:
            raise UserError(f"{flag(f.name)} {value} is out of range: it must be {opt.range}")


def _check_type(f, opt: Option, value) -> None:
    kind = _scalar_type(f)
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), str: lambda v: isinstance(v, str),
          dict: lambda v: isinstance(v, dict)}.get(kind, lambda v: True)
    if opt.nargs:
        good = isinstance(value, (list, tuple)) and len(value) == opt.nargs and all(ok(v) for v in value)
    else:
        good = ok(value)
    if not good:
        what = f"{opt.nargs} numbers" if opt.nargs else {bool: "true or false", int: "a whole number",
                                                        float: "a number", str: "text", dict: "a mapping"}[kind]
        raise UserError(f"{flag(f.name)} {value!r} is not {what}")


# --------------------------------------------------------------------------- command line


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(TrainConfig)  # evaluates every annotation: once, not per field and call


def _scalar_type(f) -> type:
    hint = _hints()[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = typing.get_origin(args[0]) or args[0]
    if base is list:
        return typing.get_args(args[0])[0]
    return base


def _jitter(text: str) -> float | list[float]:
    """``--color-jitter 0.4`` or ``--color-jitter 0.5,0.5,0.2`` (brightness, contrast, saturation)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0 or three of them (B,C,S)")
    return values[0] if len(values) == 1 else values


# augmentation flags: each turns the parsed value into changes of Augment (stored as cfg.augment)
AUGMENT_FLAGS: dict[str, tuple[dict, Callable[[Any], dict]]] = {
    "no_augment": ({"action": "store_true", "help": "no augmentation (eval transform for training)"},
                   lambda v: Augment.off().to_dict()),
    "no_flip": ({"action": "store_true", "help": "no horizontal flips (text, digits, asymmetric objects)"},
                lambda v: {"hflip": False}),
    "color_jitter": ({"type": _jitter, "metavar": "J or B,C,S",
                      "help": "colour jitter: brightness, contrast and saturation factors drawn in [1 - J, 1 + J]"
                      " (one J for all three, or B,C,S each), 0 = off"},
                     lambda v: {"color_jitter": v}),
    "crop_scale": ({"type": float, "help": "smallest area fraction of random resized crops (default 0.08; the"
                                           " features strategy on frames in capture bursts: 0.35)"},
                   lambda v: {"crop_scale": (v, 1.0)}),
    "crop_padding": ({"type": int, "help": "random crops of the image padded by this many pixels instead of"
                      " random resized crops (CIFAR style; 0 = resized crops)"},
                     lambda v: {"crop_padding": v}),
    "pad_mode": ({"choices": PAD_MODES, "help": "how --crop-padding fills the border"},
                 lambda v: {"pad_mode": v}),
    "alternate_flip": ({"action": "store_true", "help": "mirror each training image in every other epoch (a"
                        " fixed half of them in even epochs, the other half in odd ones) instead of at random;"
                        " where batches are augmented as tensors (--cache array)"},
                       lambda v: {"alternate_flip": True}),
    "cutout": ({"type": int, "help": "cutout: one square of this side per training image set to the mean colour,"
                " 0 = off"},
               lambda v: {"cutout": v}),
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per declared option; unset flags stay absent from the namespace (the config's
    defaults, or a strategy's, apply to them)."""
    for f, opt in declared():
        if not opt.cli:
            continue
        kind = _scalar_type(f)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _help_text(opt.help)}
        if kind is bool:  # an option on by default gets its --no- form
            kwargs["action"] = argparse.BooleanOptionalAction if f.default is True else "store_true"
        else:
            kwargs["type"] = kind
            if opt.choices is not None:
                kwargs["choices"] = opt.choices()
            if opt.nargs:
                kwargs["nargs"] = opt.nargs
            if opt.metavar:
                kwargs["metavar"] = opt.metavar
            if opt.const is not None:
                kwargs.update(nargs="?", const=opt.const)
        parser.add_argument(flag(f.name), **kwargs)
    for name, (kwargs, _) in AUGMENT_FLAGS.items():
        parser.add_argument(flag(name), default=argparse.SUPPRESS, **{**kwargs, "help": _help_text(kwargs["help"])})
    for name, alias in ALIASES.items():
        parser.add_argument(flag(name), default=argparse.SUPPRESS, choices=tuple(alias.values),
                            help=_help_text(alias.help))


def _help_text(text: str | None) -> str | None:
    """argparse formats help with %: a literal one ("30% of the steps") must be doubled."""
    return text.replace("%", "%%") if text else None


def complete_optional_values(argv: list[str]) -> list[str]:
    """``argv`` with the value of a flag whose value is optional (``--ema``) written out where the word
    after it is not a value of its type: argparse would take ``imgcls train --ema DATA`` as ``--ema=DATA``
    and refuse it, where the user meant ``--ema`` alone and DATA as the data."""
    consts = {flag(f.name): (_scalar_type(f), opt.const) for f, opt in declared()
              if opt.cli and opt.const is not None}
    out = []
    for token, following in zip(argv, [*argv[1:], None]):
        out.append(token)
        if token in consts and following is not None and not following.startswith("-"):
            kind, const = consts[token]
            try:
                kind(following)
            except ValueError:
                out.append(str(const))
    return out


def options_from_args(args: argparse.Namespace) -> dict:
    """The TrainConfig fields a command line set (augmentation flags folded into ``augment``)."""
    given = vars(args)
    options = {f.name: given[f.name] for f, opt in declared() if opt.cli and f.name in given}
    options.update({name: given[name] for name in ALIASES if name in given})  # read in TrainConfig.from_dict
    changes: dict = {}
    for name, (_, to_changes) in AUGMENT_FLAGS.items():
        if name in given:  # absent unless given (argparse.SUPPRESS); 0 is a value
            changes.update(to_changes(given[name]))
    if changes:
        options["augment"] = {**Augment().to_dict(), **changes}
    return options


# --------------------------------------------------------------------------- defaults by strategy


def with_strategy_defaults(options: dict) -> dict:
    """``options`` + the defaults of the strategy that will run, for the fields not set.

    Without pretrained weights or ``--weights``: unchanged."""
    if not (options.get("pretrained") or options.get("weights")):
        return dict(options)
    base = {f.name: f.default for f in fields(TrainConfig)
            if f.name in ("strategy", "head_epochs", "backbone_lr_mult", "freeze")}
    merged = {**base, **{k: v for k, v in options.items() if k in base}}
    name, _ = resolve_strategy(merged["strategy"], pretrained=bool(options.get("pretrained")),
                               weights=options.get("weights"),
                               device_type=resolve_device(options.get("device", "auto")).type,
                               freeze=merged["freeze"], head_epochs=merged["head_epochs"],
                               backbone_lr_mult=merged["backbone_lr_mult"])
    defaults = STRATEGIES[name].defaults
    out = {**defaults, **options}
    if "augment" in defaults:  # merged as a recipe's: the settings given win, the others are the strategy's
        out["augment"] = Augment.merged(defaults["augment"], options.get("augment"))
    given, default = options.get("augment") or {}, Augment().to_dict()
    bursts = {k: v for k, v in STRATEGIES[name].bursts.items() if given.get(k, default[k]) == default[k]}
    if bursts and "burst_augment" not in options:
        out["burst_augment"] = bursts
    return out
