"""Training: options -> prepared session -> a strategy's fit -> export and final metrics.

::

    config.py      TrainConfig: every option, declared once (help, choices, range)
    strategies.py  the table of fitting strategies, and which one a run takes
    prepare.py     sources -> split -> scan -> preprocessing -> model + weights: a Session
    loop.py        the epoch loop (strategy ``finetune``), checkpoints, resume
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


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train as ``cfg`` says (resolved: no defaults are filled in here)."""
    # torch and the data stack load when a run starts: the CLI imports this package to build its parser
    from .finalize import finalize
    from .prepare import prepare

    run_dir = Path(cfg.out)
    previous = rundir.read_json(run_dir / rundir.SUMMARY) if resume and (run_dir / rundir.SUMMARY).exists() else {}
    t0 = time.perf_counter()
    session = prepare(cfg, resume, progress)
    fit = choose(session, resume).fit(session, resume, progress)
    return finalize(session, fit, previous.get("train_seconds", 0.0) + time.perf_counter() - t0)


def train(data: str | Path | None, out: str | Path, model: str | None = None, resume: bool = False,
          progress: bool = True, **options) -> TrainResult:
    """Train a classifier on a class-folder tree or CSV; returns a :class:`TrainResult`
    (``.run_dir``, ``.summary``).  ``options`` are :class:`TrainConfig` fields; ``recipe``
    fills in the ones not given (:mod:`.recipes`); ``model`` defaults to the recipe's, else
    resnet18.  With ``resume`` the run's saved config is used (``epochs`` may be raised)."""
    if resume:
        if not (Path(out) / rundir.CONFIG).exists():
            raise UserError(f"{out}: nothing to resume (no {rundir.CONFIG})")
        saved = rundir.read_yaml(Path(out) / rundir.CONFIG)
        saved["out"] = str(out)  # the run named, always: a copied run continues in the copy
        if options.get("epochs") is not None:
            saved["epochs"] = options["epochs"]
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
