"""How a run is fitted: a table of strategies, and which one a run takes.

``features``
    The backbone stays as loaded; its pooled features of several views of every
    training image are computed once (ONNX Runtime on a CPU) and the head is
    fitted on them (:mod:`.features`, :mod:`.head`).
``tail``
    ``features``' cached-view idea one stage earlier: the trunk's maps of
    several views are computed once, a linear probe on them starts the head,
    then the last stage and the head are fine-tuned on the cached maps for as
    many epochs as ``--time-budget`` allows (:mod:`.tail`).
``finetune``
    The epoch loop (:mod:`.loop`): full fine-tuning, ``--freeze backbone``, or
    two-phase with ``head_epochs`` / ``backbone_lr_mult``.
``auto`` (default)
    ``features`` when starting from pretrained weights or ``--weights`` on a
    CPU, unless fine-tuning options were asked for; ``finetune`` otherwise.
    ``tail`` is asked for by name: on the development suite it has not yet
    beaten ``features`` everywhere (docs/decisions.md).

Each strategy returns a :class:`~.session.Fit` and none calls another: whether
the features path can run (its head must be a linear read-out of pooled
features) is decided in :func:`choose`, before anything is fitted.

Torch-free at import: the command line takes the strategy names from here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError

log = logging.getLogger("imgcls")


def _fit_features(session, resume: bool, progress: bool):
    from .features import fit_features  # torch: imported when a run fits, not when the parser is built

    return fit_features(session, progress)


def _fit_tail(session, resume: bool, progress: bool):
    from .tail import fit_tail  # torch: imported when a run fits, not when the parser is built

    return fit_tail(session, progress)


def _fit_epochs(session, resume: bool, progress: bool):
    from .loop import fit_epochs  # torch: imported when a run fits, not when the parser is built

    return fit_epochs(session, resume, progress)


@dataclass(frozen=True)
class Strategy:
    fit: Callable  # (session, resume, progress) -> Fit
    # options filled in when starting from weights and the caller has not set them
    defaults: dict = field(default_factory=dict)
    # why it cannot share its work between processes (train.distributed), or None: it can
    single_process: str | None = None
    # augmentation settings for training images that come in capture bursts (camera traps), where not given
    bursts: dict = field(default_factory=dict)


STRATEGIES = {
    "tail": Strategy(_fit_tail, single_process="its last-stage epochs run on one cached set of maps, not sharded"
                                               " between processes"),
    # the views: more brightness/contrast variety (helps grey and shifted sets), saturation kept low since
    # colour is information on colour sets (measured: docs/decisions.md, sessions 12-13)
    # in bursts, milder crops: a frame is a wide scene whose animal a crop of 8% of it mostly misses
    # (measured: docs/decisions.md, session 14)
    "features": Strategy(_fit_features, {"augment": {"color_jitter": [0.5, 0.5, 0.2]}},
                         bursts={"crop_scale": [0.35, 1.0]}),
    "finetune": Strategy(_fit_epochs, {"head_epochs": 1, "backbone_lr_mult": 0.1, "epochs": 10}),
}


# options only the epoch loop (finetune) reads: flag -> (TrainConfig field, its value when not asked for)
LOOP_ONLY = {"--ema": ("ema", None), "--accum-steps": ("accum_steps", 1), "--compile": ("compile", False),
             "--lookahead": ("lookahead", False), "--norm-lr-mult": ("norm_lr_mult", 1.0),
             "--progressive": ("progressive", None), "--muon": ("muon", None)}


def resolve_strategy(strategy: str, *, pretrained: bool, weights: str | None, device_type: str,
                     resume: bool = False, freeze: str | None = None, head_epochs: int = 0,
                     backbone_lr_mult: float = 1.0, readout_problem: str | None = None,
                     tail_problem: str | None = None) -> tuple[str, str]:
    """``(tail | features | finetune, reason)`` for a configuration; ``auto`` is decided here.

    ``readout_problem``: why the model's head is not a linear read-out of its
    features; ``tail_problem``: why its last stage cannot be trained alone
    (None: it can, or not known yet)."""
    if strategy != "auto" and strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; use one of auto, {', '.join(STRATEGIES)}")
    if strategy in ("features", "tail"):
        if not (pretrained or weights):
            raise UserError(f"--strategy {strategy} starts from pretrained features: give --pretrained or --weights")
        if resume:
            raise UserError(f"a {strategy} run has no checkpoint to resume; start it again (it takes minutes)")
        problem = readout_problem if strategy == "features" else tail_problem or readout_problem
        if problem is not None:
            raise UserError(f"--strategy {strategy} cannot be used with this model: {problem};"
                            " use --strategy finetune")
        return strategy, "asked for"
    if strategy == "finetune":
        return "finetune", "asked for"
    if resume:
        return "finetune", "resuming an epoch run"
    if not (pretrained or weights):
        return "finetune", "no pretrained weights: the whole network has to learn"
    if head_epochs or backbone_lr_mult != 1.0:
        return "finetune", "fine-tuning options (head epochs, backbone lr) were given"
    if device_type != "cpu":
        return "finetune", f"on {device_type} an epoch is cheap: fine-tuning the backbone pays"
    if readout_problem is not None:
        return "finetune", f"the features path cannot be used: {readout_problem}"
    return "features", ("pretrained weights on a CPU: features of all views in ONNX Runtime cost less than one"
                        " eager fine-tuning epoch, and the head fits in seconds"
                        + ("; --freeze backbone asks for the head only anyway" if freeze == "backbone" else ""))


def choose(session, resume: bool = False) -> Strategy:
    """The strategy this session runs, logged with the reason."""
    cfg = session.cfg
    problem = tail = None
    if cfg.strategy != "finetune" and (cfg.pretrained or cfg.weights) and not resume:
        from .features import readout_problem  # torch: see _fit_features
        from .tail import tail_problem

        problem = readout_problem(session)
        if cfg.strategy == "tail":
            tail = tail_problem(session)
    name, reason = resolve_strategy(cfg.strategy, pretrained=cfg.pretrained, weights=cfg.weights,
                                    device_type=session.device.type, resume=resume, freeze=cfg.freeze,
                                    head_epochs=cfg.head_epochs, backbone_lr_mult=cfg.backbone_lr_mult,
                                    readout_problem=problem, tail_problem=tail)
    log.info("strategy %s%s: %s", name, " (auto)" if cfg.strategy == "auto" else "", reason)
    if session.world > 1 and STRATEGIES[name].single_process:
        raise UserError(f"the {name} strategy runs in one process: {STRATEGIES[name].single_process}; train it"
                        " without --nproc/torchrun, or use --strategy features or finetune")
    unused = [flag for flag, (field_name, default) in LOOP_ONLY.items() if getattr(cfg, field_name) != default]
    if name != "finetune" and unused:
        log.warning("%s: options of the epoch loop, which the %s strategy does not run (--strategy finetune runs"
                    " it)", ", ".join(unused), name)
    session.strategy = name
    if session.balance is not None:
        session.balance = session.balance.for_strategy(name)
        if session.balance.sampler_note():
            log.info("balance sampler on the %s strategy: %s", name, session.balance.sampler_note())
    return STRATEGIES[name]
