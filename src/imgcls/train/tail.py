"""The ``tail`` strategy: fine-tune the last stage and the head on cached trunk maps.

1. The trunk (everything before the last stage, :mod:`imgcls.models.tail`) runs
   once per view of every training image (view 0 the eval center crop, the
   others drawn with the training augmentation), in ONNX Runtime on a CPU;
   its output maps are kept in RAM as float16.
2. Linear probe: the head is fitted on the pooled features of those maps
   through the frozen last stage, by the features strategy's solver
   (:func:`.head.fit_head`: the source-head prior if cross-validation keeps
   it, the penalty chosen on train).
3. Fine-tuning: the last stage and the head train on the cached maps
   (AdamW, warm-up then cosine, random horizontal flips of the maps, the
   run's class weights or class-balanced draws of the cached views
   (``--balance sampler``), label smoothing) for as many epochs as the time
   budget allows, measured on the first steps.  The schedule is fixed in
   advance and the last epoch is kept: val is scored every epoch but never
   picks anything (``--select-by`` acts on the probe's cross-validation).

Starting the fine-tuning from the probe's head (LP-FT) keeps the first
gradient steps from wrecking the pretrained stage with a random head.  The
trained modules are the net's own, so the saved model is the ordinary
network and predicts what this path measured.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import rundir
from ..errors import first_line
from ..evaluation.metrics import compute_metrics
from ..export import onnx_model
from ..models.classifier import Classifier
from ..models.registry import model_spec
from ..models.tail import split, split_problem
from ..prediction.engines import OnnxEngine, TorchEngine
from ..progress import bar as progress_bar
from .features import compute_features, load_head, source_prior
from .head import class_weights, fit_head
from .loop import class_balanced_sampler
from .session import Fit, Session

log = logging.getLogger("imgcls")

TAIL_ROWS = 8000            # views per image are capped so that images x views stays near this
MAX_MAP_BYTES = 3 * 2**30   # and so that the cached float16 maps fit in this
DEFAULT_BUDGET = 180.0      # seconds of fitting when --time-budget is not given
LR = 1e-3
WEIGHT_DECAY = 0.05
BATCH = 64
WARMUP = 0.1                # share of the steps spent warming up


def tail_problem(session: Session) -> str | None:
    """None when the session's model splits into trunk + last stage (the tail strategy can run)."""
    parts = split(session.model.net, model_spec(session.cfg.model).family)
    if parts is None:
        return f"{session.cfg.model} declares no last stage to fine-tune alone"
    sample = torch.stack([session.val_set[i][0] for i in range(min(2, len(session.val_set)))])
    x = session.model.normalize(sample.to(session.device))
    return split_problem(session.model.net, *parts, x)


def _trunk_engine(s: Session, trunk, sample: np.ndarray):
    """(engine, name): the trunk in ONNX Runtime on a CPU (checked against eager), else eager."""
    module = Classifier(trunk, s.preprocess).eval()
    if s.device.type == "cpu":
        t0 = time.perf_counter()
        try:
            model = onnx_model(module, torch.from_numpy(sample[:2]))  # TorchScript: traces the hook
            engine = OnnxEngine(model.SerializeToString())
            with torch.inference_mode():
                ref = module(torch.from_numpy(sample)).numpy()
            diff = float(np.abs(engine(sample) - ref).max())
            if not diff <= 1e-3 * max(1.0, float(np.abs(ref).max())):
                raise RuntimeError(f"ONNX Runtime differs from PyTorch by {diff:.3g}")
            log.info("tail: trunk exported to ONNX in %.1f s", time.perf_counter() - t0)
            return engine, f"onnxruntime ({engine.threads} threads)"
        except Exception as err:  # noqa: BLE001 - any export problem: eager is slower but right
            log.warning("tail: ONNX export of the trunk failed (%s); using PyTorch eager", first_line(err))
    return TorchEngine(module, device=str(s.device), amp=None), f"torch eager ({s.device})"


def _pooled(tail, maps: np.ndarray, shape, device) -> np.ndarray:
    """Pooled features ``(n, views, D)`` of cached maps ``(n, views, C*H*W)`` through the frozen tail."""
    n, views = maps.shape[:2]
    flat = maps.reshape(n * views, *shape)
    tail.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(flat), 256):
            out.append(tail.features(torch.from_numpy(flat[i:i + 256]).to(device).float()).cpu().numpy())
    return np.concatenate(out).reshape(n, views, -1)


def _budget_epochs(s: Session, step, rows: int, remaining: float) -> tuple[int, float]:
    """How many epochs fit in ``remaining`` seconds, from the time of a few real steps."""
    steps_per_epoch = max(1, math.ceil(rows / BATCH))
    t0 = time.perf_counter()
    probes = 3
    for _ in range(probes):
        step(None, measure_only=True)
    per_step = (time.perf_counter() - t0) / probes
    epoch_seconds = per_step * steps_per_epoch * 1.1  # + the val pass and the data shuffling
    return max(1, min(s.cfg.epochs, int(remaining // epoch_seconds))), epoch_seconds


def fit_tail(s: Session, progress: bool = True) -> Fit:
    t_start = time.perf_counter()
    cfg = s.cfg
    budget = cfg.time_budget if cfg.time_budget is not None else DEFAULT_BUDGET
    net = s.model.net
    trunk, tail = split(net, model_spec(cfg.model).family)
    sample = np.stack([s.val_set[i][0].numpy() for i in range(min(4, len(s.val_set)))])
    engine, engine_name = _trunk_engine(s, trunk, sample)
    shape = tuple(np.asarray(engine(sample[:1])).shape[1:])
    map_bytes = 2 * int(np.prod(shape))
    n = len(s.train_set)
    views = cfg.views if s.train_set.transform is not None else 1
    views = max(1, min(views, TAIL_ROWS // max(1, n), MAX_MAP_BYTES // max(1, n * map_bytes)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the crops run beside ONNX Runtime's threads (see features.py)
        t0 = time.perf_counter()
        maps, y = compute_features(engine, s.train_set, views, cfg.seed, progress, "trunk maps (train)",
                                   dtype=np.float16)
        # val in float32: the fit's val figures are then the saved model's, to rounding
        val_maps, y_val = compute_features(engine, s.val_set, 1, cfg.seed, progress, "trunk maps (val)")
        t_maps = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    log.info("tail: %s maps %s of %d view(s) x %d train images + %d val images in %.1f s", engine_name,
             "x".join(map(str, shape)), maps.shape[1], len(maps), len(val_maps), t_maps)

    # 1. linear probe on the pooled features of the frozen last stage
    t0 = time.perf_counter()
    feats = _pooled(tail, maps, shape, s.device)
    prior = source_prior(s, feats.shape[2])
    # the probe is one fit over every view: --balance sampler weighs the images there (train.balance)
    weight = class_weights(y, len(s.classes), s.balance.loss_weights(draws=False))
    head = tail.parts[-1]
    probe = fit_head(feats, y, len(s.classes), prior, cfg.seed, weight=weight, progress=progress,
                     cv_weight=class_weights(y, len(s.classes), s.balance.cv_weights))
    load_head(head, probe)
    t_probe = time.perf_counter() - t0
    val_x = torch.from_numpy(val_maps.reshape(len(val_maps), *shape))

    def val_metrics():
        tail.eval()
        with torch.inference_mode():
            logits = torch.cat([tail(val_x[i:i + 256].to(s.device).float()).cpu() for i in range(0, len(val_x), 256)])
        return compute_metrics(logits.numpy(), y_val, s.classes)

    start = val_metrics()
    log.info("tail: linear probe in %.1f s (%s), val accuracy %.4f balanced %.4f", t_probe,
             "source-head prior kept" if probe.alpha is not None else "no source-head prior", start.accuracy,
             start.balanced_accuracy)

    # 2. fine-tune the last stage and the head on the cached maps
    x = torch.from_numpy(maps.reshape(-1, *shape))
    targets = torch.from_numpy(np.repeat(y, maps.shape[1]))
    optimizer = torch.optim.AdamW(tail.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    weight = class_weights(y, len(s.classes), s.balance.loss_weights(draws=True))
    loss_weight = None if weight is None else weight.to(s.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    draws = class_balanced_sampler(targets, len(s.classes), generator) if s.balance.sampler else None

    def step(index, measure_only=False):
        if index is None:
            index = torch.randint(len(x), (min(BATCH, len(x)),), generator=generator)
        batch = x[index].to(s.device).float()
        flip = torch.rand(len(index), generator=generator) < 0.5
        batch[flip] = batch[flip].flip(3)  # the maps of a mirrored image are close to the mirrored maps
        truth = targets[index].to(s.device)
        logits = tail(batch)
        loss = F.cross_entropy(logits, truth, weight=loss_weight, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        if measure_only:
            optimizer.zero_grad()
            return 0.0, 0
        optimizer.step()
        return float(loss.detach()) * len(index), int((logits.detach().argmax(1) == truth).sum())

    tail.train()
    spent = time.perf_counter() - t_start
    epochs, epoch_seconds = _budget_epochs(s, step, len(x), budget - spent)
    steps_per_epoch = max(1, math.ceil(len(x) / BATCH))
    total = epochs * steps_per_epoch
    warm = max(1, int(WARMUP * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: (k + 1) / warm if k < warm else 0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, total - warm))))
    log.info("tail: fine-tuning the last stage for %d epoch(s) of %d rows (%.0f s each, budget %.0f s, %.0f s spent)",
             epochs, len(x), epoch_seconds, budget, spent)
    val = start
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        lr_now = optimizer.param_groups[0]["lr"]
        tail.train()
        order = torch.tensor(list(draws)) if draws is not None else torch.randperm(len(x), generator=generator)
        loss_sum = hits = 0
        for k in progress_bar(range(steps_per_epoch), desc=f"last stage {epoch + 1}/{epochs}",
                              disable=not progress, unit="step", leave=False):
            loss, correct = step(order[k * BATCH:(k + 1) * BATCH])
            loss_sum, hits = loss_sum + loss, hits + correct
            scheduler.step()
        val = val_metrics()
        seconds = time.perf_counter() - t_epoch
        train_loss = loss_sum / len(x)
        rundir.append_metrics(s.run_dir, {"epoch": epoch + 1, "input_size": s.preprocess.input_size, "lr": lr_now,
                                          "train_loss": train_loss,
                                          "train_accuracy": hits / len(x), "val_loss": val.loss,
                                          "val_accuracy": val.accuracy,
                                          "val_balanced_accuracy": val.balanced_accuracy, "epoch_seconds": seconds,
                                          "images_per_second": len(x) / seconds})
        log.info("tail: epoch %d/%d  train loss %.4f  val loss %.4f acc %.4f balanced %.4f  %.0f s", epoch + 1, epochs,
                 train_loss, val.loss, val.accuracy, val.balanced_accuracy, seconds)
    tail.eval()
    rundir.save_weights(s.run_dir / rundir.WEIGHTS, net.state_dict(), s.meta)
    seconds = time.perf_counter() - t_start
    rundir.write_json(s.run_dir / rundir.FEATURES, {
        "strategy": "tail", "engine": engine_name, "map_shape": list(shape), "views": int(maps.shape[1]),
        "n_train": int(len(maps)), "n_val": int(len(val_maps)), "prior_used": probe.alpha is not None,
        "prior_weight": probe.alpha, "penalty": probe.lam, "cv_folds": probe.folds,
        "probe_val_accuracy": start.accuracy, "probe_val_balanced_accuracy": start.balanced_accuracy,
        "cv_selection": s.balance.selection_metric,
        "epochs": epochs, "time_budget": budget, "map_seconds": round(t_maps, 2), "probe_seconds": round(t_probe, 2),
        "seconds": round(seconds, 2)})
    log.info("tail: val accuracy %.4f balanced %.4f (probe %.4f), %.1f s in all", val.accuracy,
             val.balanced_accuracy, start.accuracy, seconds)
    return Fit(val.accuracy, epochs, epochs, strategy="tail")
