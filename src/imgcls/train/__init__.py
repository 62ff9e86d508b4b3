"""Training: options -> prepared session -> a strategy's fit -> export and final metrics.

::

    config.py      TrainConfig: every option, declared once (help, choices, range)
    strategies.py  the table of fitting strategies, and which one a run takes
    prepare.py     sources -> split -> scan -> preprocessing -> model + weights: a Session
    loop.py        the epoch loop (strategy ``finetune``), checkpoints, resume
    distributed.py several processes: torch's launcher, the process group, DDP, who writes
    features.py    strategy ``features``: a head fitted on frozen features
    head.py        the head solver (pure)
    finalize.py    export of the model in memory, final metrics
    session.py     Session, Fit, TrainResult (a leaf)

``imgcls.train(...)`` calls :func:`train`: this module is callable, because as
a subpackage it replaces the API function of the same name on ``imgcls``.
Importing this package (and config, strategies, session) needs no torch: the
command line builds its ``train`` parser from it for every command.
"""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

from .. import rundir
from ..errors import UserError
from .config import TrainConfig, with_strategy_defaults
from .recipes import with_recipe
from .session import TrainResult
from .strategies import choose

__all__ = ["TrainConfig", "TrainResult", "run", "train"]


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult | None:
    """Train as ``cfg`` says (resolved: no defaults are filled in here).

    ``cfg.nproc`` > 1: on that many processes of this machine (:mod:`.distributed`).  In a process
    started by torchrun or that launcher, the ranks fit together and rank 0 alone finalizes the run;
    the other ranks return None."""
    # torch and the data stack load when a run starts: the CLI imports this package to build its parser
    from . import distributed
    from .finalize import finalize
    from .prepare import prepare

    if cfg.nproc > 1 and not distributed.launched():
        return distributed.launch(cfg, resume, progress)
    run_dir = Path(cfg.out)
    previous = rundir.read_json(run_dir / rundir.SUMMARY) if resume and (run_dir / rundir.SUMMARY).exists() else {}
    t0 = time.perf_counter()
    with distributed.process_group(cfg.device):
        progress = progress and distributed.is_main()
        session = prepare(cfg, resume, progress)
        fit = choose(session, resume).fit(session, resume, progress)
        if not distributed.is_main():  # rank 0 alone exports and scores; the others are done
            return None
        return finalize(session, fit, previous.get("train_seconds", 0.0) + time.perf_counter() - t0)


def train(data: str | Path | None, out: str | Path, model: str | None = None, resume: bool = False,
          progress: bool = True, **options) -> TrainResult | None:
    """Train a classifier on a class-folder tree or CSV; returns a :class:`TrainResult`
    (``.run_dir``, ``.summary``).  ``options`` are :class:`TrainConfig` fields; ``recipe``
    fills in the ones not given (:mod:`.recipes`); ``model`` defaults to the recipe's, else
    resnet18.  With ``resume`` the run's saved config is used (``epochs`` may be raised, ``nproc``
    changed).  Under torchrun, ranks other than 0 return None."""
    if resume:
        if not (Path(out) / rundir.CONFIG).exists():
            raise UserError(f"{out}: nothing to resume (no {rundir.CONFIG})")
        saved = rundir.read_yaml(Path(out) / rundir.CONFIG)
        saved["out"] = str(out)  # the run named, always: a copied run continues in the copy
        for name in ("epochs", "nproc"):  # what a resume may change: more epochs, other processes
            if options.get(name) is not None:
                saved[name] = options[name]
        return run(TrainConfig.from_dict(saved), resume=True, progress=progress)
    if data is None:
        raise UserError("training needs data: a folder of class folders or a CSV")
    if options.get("weights"):
        options["weights"] = os.path.abspath(options["weights"])
    # stored absolute, so that a resume from anywhere (or of a copy) finds the same data
    if model is not None:
        options["model"] = model
    cfg = TrainConfig.from_dict({"data": os.path.abspath(data), "out": str(out),
                                 **with_strategy_defaults(with_recipe(options))})
    return run(cfg, progress=progress)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
