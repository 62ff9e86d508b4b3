"""The epoch loop: one epoch, evaluation, checkpoints, interrupts and resume.

It follows torchvision's ``references/classification/train.py``: one function
per epoch, evaluation after each, a checkpoint with everything needed to
continue.  Every epoch reseeds torch (and the DataLoader's generator) from
``(seed, epoch)``, so epoch *e*'s data order and augmentation do not depend
on what ran before it and ``--resume`` continues exactly.

On several processes (:mod:`.distributed`) the model is wrapped in
DistributedDataParallel, each rank takes its share of the epoch's order
(DistributedSampler), ``--batch-size`` is the global batch (each rank takes
``batch_size / N``, so the steps and the learning-rate schedule do not change
with N), the validation set is scored in shares gathered on every rank (each
rank takes the same decisions: best epoch, early stop), and rank 0 alone writes.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from .. import rundir, tasks
from ..data.arraycache import CachedImages
from ..data.dataset import ArrayLoader
from ..errors import UserError, first_line
from ..models.heads import freeze_backbone, param_groups, set_frozen_bn_eval, unfreeze
from ..models.registry import model_spec
from ..progress import bar as progress_bar
from ..system import default_workers
from . import distributed, muon, progressive
from .accel import make_ema, make_lookahead, training_layout, training_model
from .flops import format_flops, forward_flops, step_flops
from .head import class_weights
from .objectives import objective
from .optim import OPTIMIZERS, SCHEDULES
from .session import Fit, Session

log = logging.getLogger("imgcls")


def class_balanced_sampler(targets, num_classes: int, generator=None) -> WeightedRandomSampler:
    """``--balance sampler``: as many draws as ``targets`` holds, with replacement, each image drawn with
    probability proportional to ``n / (K n_c)`` (its expected draws per epoch, the balanced class weight),
    so every class comes up about equally often."""
    weight = class_weights(targets, num_classes, "balanced")[torch.as_tensor(np.asarray(targets, dtype=np.int64))]
    return WeightedRandomSampler(weight.double(), num_samples=len(targets), replacement=True, generator=generator)


def make_loader(dataset, cfg, shuffle: bool = False, generator=None, workers: int | None = None,
                sampler=None, batch_size: int | None = None, epoch: int = 0) -> DataLoader:
    """``sampler``: draws the order of an epoch instead of shuffling (``shuffle`` then only drops the
    last incomplete batch).  ``batch_size``: default ``cfg.batch_size``.  An array-cached dataset gets its
    batches read and augmented on the device (``data.dataset.ArrayLoader``, which takes the ``epoch`` for
    alternating flips), without worker processes."""
    batch_size = batch_size or cfg.batch_size
    rows = len(sampler) if sampler is not None else len(dataset)
    if isinstance(getattr(dataset, "cache", None), CachedImages):
        return ArrayLoader(dataset, batch_size, shuffle=shuffle, generator=generator, sampler=sampler,
                           drop_last=shuffle and rows > batch_size, epoch=epoch)
    if workers is None:
        # decoded images in RAM: augmenting them in-process beats starting worker processes
        workers = cfg.workers if cfg.workers is not None else (0 if dataset.cache is not None else default_workers())
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator, num_workers=workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(),
                      drop_last=shuffle and rows > batch_size)


def epoch_loader(s: Session, epoch: int, workers: int | None = None) -> DataLoader:
    """This rank's training batches of ``epoch``: its share of the epoch's order (reseeded from
    ``(seed, epoch)``; ``--balance sampler``: of the epoch's class-balanced draws), in batches of
    ``batch_size / N`` on N processes."""
    generator = seed_epoch(s.cfg.seed, epoch, s.rank)
    draws = (list(class_balanced_sampler(s.train_set.targets, len(s.classes), generator))
             if s.balance.sampler else None)
    order = distributed.epoch_order(s.train_set, epoch_seed(s.cfg.seed, 0), epoch, draws)
    return make_loader(s.train_set, s.cfg, True, rank_generator(s.cfg.seed, epoch, s.rank), workers, sampler=order,
                       batch_size=s.cfg.batch_size // s.world, epoch=epoch)


def steps_per_epoch(s: Session) -> int:
    """The training steps of an epoch as :func:`epoch_loader` makes them, without drawing one: each
    rank's share of ``n // N`` rows (the class-balanced draws number the training images too) in
    batches of ``batch_size / N``, the incomplete last one dropped unless it is the only one."""
    rows, batch = len(s.train_set) // s.world, s.cfg.batch_size // s.world
    return rows // batch if rows > batch else min(rows, 1)


def validation_logits(model, s: Session) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets of the whole val set, in its order, on every rank (each scores its share)."""
    share = distributed.shard(len(s.val_set))
    if len(share):
        # the share as the sampler's order: an array-cached val set keeps its batched reads
        logits, targets = predict_logits(model, make_loader(s.val_set, s.cfg, sampler=share.tolist()), s.device,
                                         s.amp_dtype)
    else:  # fewer val images than processes
        logits, targets = np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return tuple(distributed.all_gather_rows(logits, targets))


def make_optimizer(net: nn.Module, cfg) -> torch.optim.Optimizer:
    spec = OPTIMIZERS[cfg.optimizer]
    lr = cfg.lr if cfg.lr is not None else spec.lr
    wd = cfg.weight_decay if cfg.weight_decay is not None else spec.weight_decay
    extra = {"momentum": cfg.momentum, "nesterov": cfg.momentum > 0} if spec.momentum else {}
    groups = param_groups(net, lr, cfg.backbone_lr_mult)
    if cfg.norm_lr_mult != 1:
        # with Muon, every bias and shift takes the norm rate (airbench94_muon's bias group, the stem's included)
        groups = with_norm_lr(groups, net, cfg.norm_lr_mult, wd, vectors=cfg.muon is not None)
    if not cfg.norm_weight_decay:
        groups = without_decay_on_1d(groups)
    if cfg.muon is not None:
        groups = split_groups(groups, muon.is_filter, "muon", lambda g: muon.group_settings(*cfg.muon))
        return muon.MuonSGD(groups, lr=lr, weight_decay=wd, **extra)
    return getattr(torch.optim, spec.torch_class)(groups, lr=lr, weight_decay=wd, **extra)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def with_norm_lr(groups: list[dict], net: nn.Module, mult: float, weight_decay: float,
                 vectors: bool = False) -> list[dict]:
    """Each group split in two: the normalization layers' parameters (``vectors``: every 1-D
    parameter) at ``mult`` times the group's learning rate and ``weight_decay / mult`` (the same
    decay per step), the rest unchanged (``--norm-lr-mult``; airbench94 trains its BatchNorm shifts
    64x faster)."""
    norm_ids = {id(p) for m in net.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    return split_groups(groups, lambda p: id(p) in norm_ids or (vectors and p.ndim <= 1), "norm",
                        lambda g: {"lr": g["lr"] * mult, "weight_decay": g.get("weight_decay", weight_decay) / mult})


def without_decay_on_1d(groups: list[dict]) -> list[dict]:
    """Each group split in two: its weight matrices and kernels keep the weight decay, its vectors
    (normalization weights, biases) get none (``--no-norm-weight-decay``)."""
    return split_groups(groups, lambda p: p.ndim <= 1, "no-decay", lambda g: {"weight_decay": 0.0})


def split_groups(groups: list[dict], chosen, suffix: str, changes) -> list[dict]:
    """Each group split in two: the parameters ``chosen`` leaves out, unchanged, then those it picks,
    with the settings ``changes(group)`` gives and ``suffix`` added to the group's name; empty halves dropped."""
    out = []
    for group in groups:
        rest = [p for p in group["params"] if not chosen(p)]
        picked = [p for p in group["params"] if chosen(p)]
        out += [{**group, "params": rest}] if rest else []
        out += [{**group, "params": picked, **changes(group), "name": f"{group.get('name', '')} {suffix}"}] \
            if picked else []
    return out


# the progress bar's figures are read back from the device this often (in steps), not every step:
# each read waits for the queued work, which stalls a GPU
SYNC_EVERY = 25


def train_one_epoch(model, loader, criterion, optimizer, scheduler, device, amp_dtype, clip_grad, scaler,
                    progress_desc: str | None = None, frozen_backbone: bool = False, hits=None,
                    accum_steps: int = 1, ema=None, memory_format=torch.contiguous_format, lookahead=None,
                    input_size: int | None = None) -> dict:
    """``hits(logits, targets)``: the right answers of a batch (default: top-1 class).

    ``accum_steps``: one optimizer (and scheduler, and ``ema``) step per this many batches, the
    loss of each divided by the group's size, so K batches of B make the step of one batch of K x B
    (the last group of an epoch may be shorter).  Loss and hits add up on the device.  ``lookahead``
    (then ``ema``) is updated after each optimizer step.  ``input_size``: the side batches are shrunk
    to when they come larger (progressive resizing)."""
    model.train()  # model: the Classifier, or its DistributedDataParallel wrapper (maybe compiled)
    if frozen_backbone:  # a frozen backbone keeps its BatchNorm statistics too
        set_frozen_bn_eval(distributed.unwrap(getattr(model, "_orig_mod", model)).net)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    n_batches = len(loader) if hasattr(loader, "__len__") else None  # None: a plain iterable of batches
    pending = 0  # batches whose gradients wait for the optimizer step

    def step():
        if clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if lookahead is not None:
            lookahead.update()
        if ema is not None:
            ema.update()

    start = time.perf_counter()
    bar = progress_bar(loader, desc=progress_desc, disable=progress_desc is None, unit="batch", leave=False)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        if input_size is not None:
            images = progressive.shrink(images, input_size)
        images = images.contiguous(memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        group = accum_steps if n_batches is None else min(accum_steps, n_batches - i // accum_steps * accum_steps)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            loss = criterion(logits, targets)
        scaler.scale(loss / group if group > 1 else loss).backward()
        pending += 1
        if pending == group:
            step()
            pending = 0
        n = targets.shape[0]
        loss_sum += loss.detach().float() * n
        correct += hits(logits, targets) if hits else (logits.argmax(1) == targets).sum()
        seen += n
        if not bar.disable and (i + 1) % SYNC_EVERY == 0:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                            img_s=f"{seen / elapsed:.0f}")
    if pending:  # an iterable of unknown length ended inside a group
        step()
    loss_total, correct_total = loss_sum.item(), correct.item()  # the epoch's one wait for the device
    elapsed = time.perf_counter() - start
    loss_total, correct_total, seen_total = distributed.all_sum(loss_total, correct_total, seen)  # every rank's share
    return {"train_loss": loss_total / max(1, seen_total), "train_accuracy": correct_total / max(1, seen_total),
            "images_per_second": seen_total / max(elapsed, 1e-9), "images": seen_total}


@torch.inference_mode()
def predict_logits(model, loader, device, amp_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets of a loader's batches (the per-epoch validation)."""
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images.to(device, non_blocking=True))
        all_logits.append(logits.float().cpu())
        all_targets.append(targets)
    return torch.cat(all_logits).numpy(), torch.cat(all_targets).numpy()


def _trained(model: nn.Module) -> int:
    """How many parameter tensors train now (the key of a step's FLOP count)."""
    return sum(p.requires_grad for p in model.parameters())


def fit_epochs(s: Session, resume: bool = False, progress: bool = True) -> Fit:
    """The ``finetune`` strategy: training by epochs (full fine-tuning, linear probe or two-phase)."""
    cfg, model, run_dir = s.cfg, s.model, s.run_dir
    main = s.rank == 0  # writes the run directory
    if cfg.sync_bn:
        model.net = distributed.sync_batchnorm(model.net)
    layout = training_layout(cfg.channels_last, s.device, model_spec(cfg.model).family)
    model.to(memory_format=layout)
    optimizer = make_optimizer(model.net, cfg)
    # the schedule counts optimizer steps: one per --accum-steps batches
    steps = math.ceil(steps_per_epoch(s) / cfg.accum_steps)
    if s.world > 1:
        log.info("data-parallel: %d processes, %d images per process and step (--batch-size %d in all)", s.world,
                 cfg.batch_size // s.world, cfg.batch_size)
    total_steps = cfg.epochs * steps
    warmup_steps = int(cfg.warmup_epochs * steps)
    schedule = SCHEDULES[cfg.schedule]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule(step, total_steps, warmup_steps, steps, cfg))
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.amp_dtype == torch.float16)
    task = tasks.of(s.meta)  # multiclass, binary-sigmoid, multilabel or multioutput: loss, hits, metrics follow it
    goal = objective(task.name)
    # the task's own criterion (mAP) first, else accuracy or balanced accuracy (--select-by)
    select = task.selection or s.balance.selection_metric
    criterion = goal.criterion(s.train_set.targets, len(s.classes), s.balance.loss_weights(draws=True),
                               cfg.label_smoothing, meta=s.meta).to(s.device)
    hits = goal.hits or criterion.hits  # multioutput: every labelled head right
    if not (resume or cfg.pretrained or cfg.weights):
        init_from_data(model, s)
    ema = make_ema(model, cfg.ema)  # validated and saved instead of the raw weights
    lookahead = make_lookahead(model, cfg.lookahead, total_steps)
    # FLOPs: one full batch's training step, and one image's eval forward pass, counted once
    size = s.preprocess.input_size
    batch_flops = step_flops(model, criterion, cfg.batch_size, size, s.train_set.targets[0]) \
        if len(s.train_set) else None
    image_eval_flops = forward_flops(model, 1, size)
    train_flops = 0 if batch_flops is not None else None
    # one count per set of trained parameters and input size: a frozen backbone's epochs run no backward through
    # it, and progressive resizing's early epochs run on fewer pixels
    step_counts = {(_trained(model), size): batch_flops}
    eval_flops = 0 if image_eval_flops is not None else None
    if batch_flops is not None:
        log.info("training step: %s per batch of %d (forward + backward, counted)", format_flops(batch_flops),
                 cfg.batch_size)

    start_epoch, best, best_epoch, bad_epochs = 0, -1.0, 0, 0
    best_accuracy, best_loss = -1.0, float("inf")
    if resume:
        state = load_checkpoint(run_dir / rundir.CHECKPOINT)
        model.net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_accuracy, best_epoch, bad_epochs = (state["epoch"], state["best_val_accuracy"],
                                                              state["best_epoch"], state["bad_epochs"])
        best = state.get("best_val_score", best_accuracy)
        best_loss = state.get("best_val_loss", best_loss)
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if lookahead is not None and state.get("lookahead") is not None:
            lookahead.load_state_dict(state["lookahead"])
        flops = state.get("flops") or {}
        train_flops = flops.get("train", train_flops) if train_flops is not None else None
        eval_flops = flops.get("eval", eval_flops) if eval_flops is not None else None
        torch.set_rng_state(state["rng"]["torch"])
        if main:
            rundir.truncate_metrics(run_dir, start_epoch)  # rows written after the checkpoint: done again
        log.info("resuming %s after epoch %d (best val accuracy %.4f)", run_dir, start_epoch, best_accuracy)

    stopped_early = interrupted = False
    epoch = start_epoch
    wrapped = None  # (trained parameters, the model under DDP): wrapped again when they change
    with GracefulInterrupt() as interrupt:
        try:
            for epoch in range(start_epoch, cfg.epochs):
                frozen = cfg.freeze == "backbone" or epoch < cfg.head_epochs
                (freeze_backbone if frozen else unfreeze)(model.net)
                if hasattr(model.net, "start_epoch"):  # a net that trains parts of itself in some epochs only
                    model.net.start_epoch(epoch)
                epoch_size = progressive.epoch_size(size, cfg.progressive, epoch, cfg.epochs)
                counted = _trained(model), epoch_size
                if train_flops is not None and counted not in step_counts:
                    step_counts[counted] = step_flops(model, criterion, cfg.batch_size, epoch_size,
                                                      s.train_set.targets[0])
                if wrapped is None or wrapped[0] != counted[0]:  # DDP holds the set of trained parameters
                    wrapped = counted[0], training_model(distributed.wrap(model, s.device), cfg.compile)
                epoch_start = time.perf_counter()
                lr_now = optimizer.param_groups[-1]["lr"]
                loader = epoch_loader(s, epoch)
                row = train_one_epoch(wrapped[1], loader, criterion, optimizer, scheduler, s.device, s.amp_dtype,
                                      cfg.clip_grad, scaler,
                                      progress_desc=f"epoch {epoch + 1}/{cfg.epochs}" if progress else None,
                                      frozen_backbone=frozen, hits=hits, accum_steps=cfg.accum_steps,
                                      ema=ema, memory_format=layout, lookahead=lookahead,
                                      input_size=epoch_size)
                if lookahead is not None:
                    lookahead.end_epoch()
                scored = ema.model if ema is not None else model  # the weights validated and saved
                logits, targets = validation_logits(scored, s)
                val = task.metrics(logits, targets, s.classes)
                if train_flops is not None:
                    # the count is linear in the batch; an optimizer's own products (Muon's) once per its step
                    steps = -(-row["images"] // (cfg.batch_size * cfg.accum_steps))
                    train_flops += (step_counts[counted] or 0) * row["images"] // cfg.batch_size \
                        + getattr(optimizer, "step_flops", lambda: 0)() * steps
                if eval_flops is not None:
                    eval_flops += image_eval_flops * len(targets)
                row.update(epoch=epoch + 1, input_size=epoch_size, lr=lr_now, **task.epoch_columns(val),
                           epoch_seconds=time.perf_counter() - epoch_start, train_flops=train_flops)
                if main:
                    rundir.append_metrics(run_dir, row)
                score = getattr(val, select)
                # several heads: the primary head's score first, the heads' summed val loss breaks ties (the
                # primary head is often perfect long before the others have learned)
                if score > best or (task.heads and score == best and val.loss < best_loss):
                    best, best_accuracy, best_epoch, bad_epochs = score, val.accuracy, epoch + 1, 0
                    best_loss = val.loss
                    if main:
                        rundir.save_weights(run_dir / rundir.WEIGHTS, scored.net.state_dict(), s.meta)
                else:
                    bad_epochs += 1
                if main:
                    state = checkpoint_state(model, optimizer, scheduler, scaler, epoch + 1, best_accuracy,
                                             best_epoch, bad_epochs, best, best_loss)
                    state.update(ema=ema.state_dict() if ema is not None else None,
                                 lookahead=lookahead.state_dict() if lookahead is not None else None,
                                 flops={"train": train_flops, "eval": eval_flops})
                    save_checkpoint(run_dir / rundir.CHECKPOINT, state)
                log.info("epoch %d/%d%s  train loss %.4f acc %.4f  val %s  %.0f img/s%s", epoch + 1, cfg.epochs,
                         f" at {epoch_size} px" if epoch_size != size else "", row["train_loss"], row["train_accuracy"],
                         " ".join(f"{k[4:]} {v:.4f}" for k, v in task.epoch_columns(val).items()),
                         row["images_per_second"], f"  {format_flops(train_flops)}" if train_flops else "")
                epoch += 1
                if cfg.patience is not None and bad_epochs >= cfg.patience:
                    stopped_early = True
                    log.info("early stopping: no val improvement in %d epochs", cfg.patience)
                    break
                if distributed.any_rank(interrupt.requested):  # every rank stops after the same epoch
                    raise _StopRequested
        except (KeyboardInterrupt, _StopRequested):
            interrupted = True
            log.warning("training interrupted after epoch %d; continue with: imgcls train --resume %s", epoch, run_dir)
    return Fit(best_accuracy, best_epoch, epoch, stopped_early, interrupted,
               signal=(interrupt.signum or signal.SIGINT) if interrupted else None, train_flops=train_flops,
               eval_flops=eval_flops)


INIT_IMAGES = 5000  # images a data-dependent initialization sees (airbench94's whitening: 5,000)


def init_from_data(model, s: Session) -> None:
    """A network with ``init_from_data`` (airbench94's whitening stem) gets it called once, from
    scratch, on the first ``INIT_IMAGES`` normalized images of epoch 0's training batches.  On several
    processes rank 0's result reaches the others when DDP wraps the model (it broadcasts the buffers)."""
    init = getattr(model.net, "init_from_data", None)
    if init is None or not len(s.train_set):
        return
    batches, seen = [], 0
    for images, _ in epoch_loader(s, 0):
        batches.append(images)
        seen += len(images)
        if seen >= INIT_IMAGES:
            break
    with torch.no_grad():
        init(model.normalize(torch.cat(batches)[:INIT_IMAGES].to(s.device)))
    log.info("initialized %s from %d training images", model_spec(s.cfg.model).name, min(seen, INIT_IMAGES))


# --------------------------------------------------------------------------- interrupts, checkpoints, seeds


class GracefulInterrupt:
    """The first Ctrl-C (or SIGTERM) becomes a flag the loop checks after the current epoch;
    a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None

    def __enter__(self):
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: keep default handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        log.warning("interrupt received: finishing this epoch's checkpoint, then stopping (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class _StopRequested(Exception):
    pass


def checkpoint_state(model, optimizer, scheduler, scaler, epoch, best, best_epoch, bad_epochs,
                     best_score=None, best_loss=float("inf")) -> dict:
    """``best``: the best epoch's val accuracy; ``best_score``: its selection score (accuracy or
    balanced accuracy, train.balance), ``best`` when not given."""
    return {"model": model.net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "best_val_accuracy": best, "best_epoch": best_epoch,
            "best_val_score": best if best_score is None else best_score, "best_val_loss": best_loss,
            "bad_epochs": bad_epochs,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                    "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}}


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    rundir.atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: not a readable checkpoint (damaged, or not written by imgcls); start a fresh"
                        " run instead of --resume") from None
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is a user-facing problem
        raise UserError(f"{path}: cannot read the checkpoint ({first_line(err, 200)}); start a fresh run instead of"
                        " --resume") from None


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100003 + epoch


RANK_STRIDE = 1_000_003  # apart from every epoch's seed: ranks draw different augmentations


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Reseed torch, random and NumPy from ``(seed, epoch, rank)`` (augmentation); the generator returned
    is the same on every rank (what all of them must draw alike: the class-balanced draws)."""
    value = epoch_seed(seed, epoch)
    mine = value + RANK_STRIDE * rank
    torch.manual_seed(mine)
    random.seed(mine)
    np.random.seed(mine % 2**32)
    return torch.Generator().manual_seed(value)


def rank_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The DataLoader's generator (its worker processes' seeds): one per rank."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch) + RANK_STRIDE * rank)
