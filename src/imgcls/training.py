"""Training: configuration, the epoch loop, checkpoints and resume.

The loop follows torchvision's ``references/classification/train.py``: one
function per epoch, evaluation after each, a checkpoint with everything needed
to continue.  Optimizers and schedules are small tables keyed by name.

Reproducibility: every epoch reseeds torch (and the DataLoader's generator)
from ``(seed, epoch)``, so the data order and augmentation of epoch *e* do not
depend on what ran before it; ``--resume`` therefore continues exactly, and the
checkpoint stores the RNG states only to restore the process as it was.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from . import rundir
from .data.dataset import CACHE_LIMIT_BYTES, ImageDataset, decode_all, estimate_cache_bytes
from .data.preprocess import Preprocess
from .data.records import Record
from .data.scan import find_duplicates, scan_paths, typical_short_side
from .data.sources import load_dataset
from .data.split import split_records
from .data.transforms import Augment
from .errors import UserError
from .metrics import compute_metrics, write_metrics
from .models.classifier import Classifier
from .models.pretrained import (freeze_backbone, load_pretrained, locate_source, param_groups, set_frozen_bn_eval,
                                unfreeze)
from .models.weights import load_weights_file
from .models.registry import create_model, default_preprocess, model_spec
from .report import plot_training_curves

log = logging.getLogger("imgcls")


@dataclass
class TrainConfig:
    """Every training option, resolved and saved as ``config.yaml``."""

    data: str
    out: str
    model: str = "resnet18"
    pretrained: bool = False           # start from the model's ImageNet weights (models/pretrained.py)
    weights: str | None = None         # or from a local file / another run (models/weights.py)
    freeze: str | None = None          # "backbone": train the head only (linear probe)
    head_epochs: int = 0               # two-phase fine-tuning: head only for this many epochs first
    backbone_lr_mult: float = 1.0      # discriminative rates: backbone lr = lr * this
    strategy: str = "auto"             # auto | features | finetune (transfer.py)
    views: int = 8                     # features strategy: crops per training image (center + augmented)
    input_size: int | None = None      # None: the model's default; from scratch on smaller images, theirs
    norm: str | None = None
    se: bool = False
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float | None = None            # default: per optimizer (OPTIMIZERS)
    weight_decay: float | None = None  # default: per optimizer
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    step_size: int = 7                 # schedule "step": decay every step_size epochs
    gamma: float = 0.1                 # ... by this factor
    label_smoothing: float = 0.1
    class_weights: str = "none"        # none | balanced: loss weight n / (K n_c) per class, against imbalance
    clip_grad: float | None = None
    amp: str = "auto"                  # auto | off | bf16 | fp16
    augment: dict = field(default_factory=lambda: Augment().to_dict())
    mean: list[float] | None = None    # override the weights' / computed normalization
    std: list[float] | None = None
    val_fraction: float = 0.2
    patience: int | None = None        # early stopping after this many epochs without val gain
    seed: int = 0
    workers: int | None = None
    cache: str = "auto"                # auto | ram | none
    export_onnx: bool = True           # export model.onnx at the end (fast CPU prediction)
    device: str = "auto"
    path_column: str = "path"
    label_column: str = "label"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise UserError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**data)


# name -> (factory(params, lr, weight_decay, cfg), default lr, default weight decay)
OPTIMIZERS = {
    "sgd": (lambda params, lr, wd, cfg: torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd,
                                                        nesterov=cfg.momentum > 0), 0.05, 5e-4),
    "adamw": (lambda params, lr, wd, cfg: torch.optim.AdamW(params, lr=lr, weight_decay=wd), 1e-3, 0.05),
}


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


# name -> lr multiplier as a function of (step, total steps, warmup steps, steps per epoch, cfg)
SCHEDULES = {
    "cosine": lambda s, total, warm, per_epoch, cfg: _warmup(s, warm) if s < warm else
    0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))),
    "step": lambda s, total, warm, per_epoch, cfg: _warmup(s, warm) * cfg.gamma ** (s // (cfg.step_size * per_epoch)),
    "constant": lambda s, total, warm, per_epoch, cfg: _warmup(s, warm),
}


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict


# --------------------------------------------------------------------------- setup


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision: automatic on GPUs; opt-in (``bf16``) on CPUs.

    On CPUs it is opt-in because it pays only for some models: measured here
    (AVX512-BF16 CPU, benchmarks/cifar10.py notes) bf16 trains ResNet-18 1.8x
    faster but the small CIFAR CNN 15 % slower; and on a CPU without native
    bf16 it is emulated, ~500x slower, so it is refused there.
    """
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16":
        raise UserError("fp16 mixed precision needs a GPU; use --amp off or bf16")
    if amp == "bf16":
        if not cpu_has_native_bf16():
            raise UserError("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 would be emulated and"
                            " hundreds of times slower; use --amp off")
        return torch.bfloat16
    return None


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


def _split_dataset(cfg: TrainConfig):
    dataset = load_dataset(cfg.data, cfg.path_column, cfg.label_column)
    splits = dict(dataset.splits)
    if "all" in splits:
        splits["train"], splits["val"] = split_records(splits.pop("all"), cfg.val_fraction, cfg.seed)
    elif "val" not in splits:
        splits["train"], splits["val"] = split_records(splits["train"], cfg.val_fraction, cfg.seed)
    classes = sorted({r.label for r in splits["train"]})
    if len(classes) < 2:
        raise UserError(f"{cfg.data}: only one class ({', '.join(classes) or 'none'}) in the training data;"
                        " a classifier needs at least two")
    unknown = sorted({r.label for s in ("val", "test") for r in splits.get(s, []) if r.label not in classes})
    if unknown:
        raise UserError(f"{cfg.data}: class(es) {', '.join(unknown)} appear in val/test but not in train;"
                        " add training images for them")
    if not splits["val"]:
        raise UserError(f"{cfg.data}: too few images to hold out a validation split; add images or a val/ folder")
    return splits, classes


def _write_split(run_dir: Path, splits: dict[str, list[Record]]) -> None:
    lines = ["path,label,group,split"]
    for name, records in splits.items():
        lines += [f"{r.path},{r.label},{r.group or ''},{name}" for r in records]
    rundir.atomic_write(run_dir / "split.csv", "\n".join(lines) + "\n")


def _scan(cfg, splits, classes, spec, augment, run_dir, progress):
    """Pre-flight: decode every file once; drop the unreadable ones (listed in scan.json).

    Small datasets keep the decoded pixels (the RAM cache); larger ones only check."""
    n = sum(len(v) for v in splits.values())
    cache_bytes = estimate_cache_bytes(n, spec, augment)
    use_cache = cfg.cache == "ram" or (cfg.cache == "auto" and cache_bytes <= CACHE_LIMIT_BYTES)
    workers = cfg.workers or default_workers()
    caches: dict[str, list[np.ndarray] | None] = {}
    problems: list[tuple[Record, str, str]] = []
    for name, records in splits.items():
        if use_cache:
            result = decode_all(records, spec, augment if name == "train" else None, workers, progress,
                                desc=f"decode {name}")
            bad = {id(r): reason for r, reason in result.failures}
            caches[name] = [a for a in result.arrays if a is not None]
        else:
            bad_paths = dict(scan_paths([r.path for r in records], workers=workers, progress=progress))
            bad = {id(r): bad_paths[r.path] for r in records if r.path in bad_paths}
            caches[name] = None
        problems += [(r, name, bad[id(r)]) for r in records if id(r) in bad]
        splits[name] = [r for r in records if id(r) not in bad]
    counts = {name: dict(sorted(Counter(r.label for r in recs).items())) for name, recs in splits.items()}
    duplicates = _duplicates(splits, workers)
    rundir.write_json(run_dir / rundir.SCAN, {
        "counts": counts,
        "unreadable": [{"path": str(r.path), "split": s, "reason": why} for r, s, why in problems],
        "duplicates": duplicates,
        "ram_cache": use_cache, "cache_megabytes": round(cache_bytes / 2**20, 1)})
    for r, s, why in problems:
        log.warning("skipped unreadable file %s: %s", r.path, why)
    if duplicates:
        leaks = sum(len(set(d["splits"])) > 1 for d in duplicates)
        conflicts = sum(len(set(d["labels"])) > 1 for d in duplicates)
        log.warning("%d group(s) of identical files: %d across splits (validation scores them as if unseen), %d"
                    " with different labels; listed in %s", len(duplicates), leaks, conflicts, run_dir / rundir.SCAN)
    missing = [c for c in classes if not counts["train"].get(c)]
    if missing:
        raise UserError(f"no readable training images left for class(es) {', '.join(missing)}; see"
                        f" {run_dir / rundir.SCAN}")
    return caches


def _duplicates(splits: dict[str, list[Record]], workers: int) -> list[dict]:
    """Groups of byte-identical files, each with the split and label of every copy."""
    where = {r.path: (name, r.label) for name, records in splits.items() for r in records}
    return [{"paths": [str(p) for p in group], "splits": [where[p][0] for p in group],
             "labels": [where[p][1] for p in group]}
            for group in find_duplicates(list(where), workers=workers)]


def compute_mean_std(images, limit: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] over (up to ``limit``, evenly spaced) uint8 CHW images."""
    idx = np.linspace(0, len(images) - 1, min(limit, len(images))).astype(int)
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for i in idx:
        x = np.asarray(images[int(i)], dtype=np.float64).reshape(3, -1) / 255.0
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-12))
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]


class _Pixels:
    """Index -> uint8 CHW array of a dataset's images (no augmentation)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0].numpy()


def _input_preprocess(cfg: TrainConfig, train_records: list[Record]) -> Preprocess:
    """The model's preprocessing, at an input size that suits the data when training from scratch.

    A model's default size (224 for ResNet) is what its pretrained weights
    expect.  Trained from scratch on small images (CIFAR's 32 px) it would only
    upsample them and spend more compute for no information (ResNet-18: 1,814 M
    multiply-adds per image at 224 px, 555 M at 32 px), so the size
    becomes the images' median shorter side (within the model's range), with
    no crop margin.  ``--input-size`` or pretrained weights keep the default;
    weights from another imgcls run bring that run's preprocessing.
    """
    spec = default_preprocess(cfg.model, cfg.input_size)
    if cfg.input_size is not None or cfg.pretrained:
        return spec
    if cfg.weights:
        meta = rundir.weights_meta(cfg.weights)
        return spec if meta is None else Preprocess.from_dict(meta["preprocess"])
    side = typical_short_side([r.path for r in train_records], seed=cfg.seed)
    if side is None:
        return spec
    size = max(model_spec(cfg.model).min_input_size, side)
    if size >= spec.input_size:
        return spec
    log.info("input size %d px: the training images' median shorter side is %d px (the model's default is %d;"
             " set --input-size to choose)", size, side, spec.input_size)
    return spec.replace(input_size=size, crop_pct=1.0)


def _resolve_normalization(cfg, preprocess, train_records, index, train_cache) -> Preprocess:
    """Mean/std follow the weights; a model trained from scratch uses its data's own."""
    if cfg.mean and cfg.std:
        return preprocess.replace(mean=cfg.mean, std=cfg.std)
    if cfg.weights:
        meta = rundir.weights_meta(cfg.weights)
        if meta is not None:  # another imgcls run: keep its normalization (and geometry, _input_preprocess)
            saved = Preprocess.from_dict(meta["preprocess"])
            return preprocess.replace(mean=saved.mean, std=saved.std)
        return preprocess
    if cfg.pretrained:
        return preprocess
    pixels = train_cache if train_cache is not None else _Pixels(ImageDataset(train_records, index, preprocess))
    mean, std = compute_mean_std(pixels, limit=2000 if train_cache is not None else 300)
    return preprocess.replace(mean=mean, std=std)


def _initial_weights(cfg, net: nn.Module):
    """Load --pretrained or --weights into ``net``; returns the LoadReport (or None)."""
    if cfg.pretrained:
        report = load_pretrained(cfg.model, net, model_spec(cfg.model).pretrained)
    elif cfg.weights:
        report = load_weights_file(cfg.weights, net, model_name=cfg.model)
    else:
        return None
    log.info(report.summary())
    return report


def build_classifier(model_name: str, num_classes: int, preprocess: Preprocess, norm=None, se=False) -> Classifier:
    net = create_model(model_name, num_classes, preprocess.input_size, norm, se)
    return Classifier(net, preprocess)


# --------------------------------------------------------------------------- loop


def _loader(dataset, cfg, shuffle, generator=None, workers=None):
    if workers is None:
        # decoded images in RAM: augmenting them in-process beats starting worker processes
        workers = cfg.workers if cfg.workers is not None else (0 if dataset.cache is not None else default_workers())
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle, generator=generator,
                      num_workers=workers, persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      drop_last=shuffle and len(dataset) > cfg.batch_size)


def class_weights(targets, num_classes: int, mode: str) -> torch.Tensor | None:
    """Loss weights per class: None for ``none``; ``n / (K n_c)`` for ``balanced``.

    Balanced weights make every class weigh as much in the loss as if the
    classes were equally frequent (scikit-learn's ``class_weight="balanced"``),
    so a rare species is not traded away for the common "empty" class.  With
    every class present (training requires it) the weights average 1 over the
    training images, so the loss keeps its scale.
    """
    if mode == "none":
        return None
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return torch.tensor(counts.sum() / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, device, amp_dtype, clip_grad, scaler,
                    progress_desc: str | None = None, frozen_backbone: bool = False):
    from tqdm.auto import tqdm

    model.train()
    if frozen_backbone:
        set_frozen_bn_eval(model.net)  # a frozen backbone keeps its BatchNorm statistics too
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=progress_desc, disable=progress_desc is None, unit="batch", leave=False)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = targets.shape[0]
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == targets).sum().item()
        seen += n
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{seen / elapsed:.0f}")
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / max(1, seen), "train_accuracy": correct / max(1, seen),
            "images_per_second": seen / max(elapsed, 1e-9)}


@torch.inference_mode()
def predict_logits(model, loader, device, amp_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images.to(device, non_blocking=True))
        all_logits.append(logits.float().cpu())
        all_targets.append(targets)
    return torch.cat(all_logits).numpy(), torch.cat(all_targets).numpy()


class _GracefulInterrupt:
    """Turn the first Ctrl-C (or SIGTERM) into a flag the loop checks after the
    current batch; a second Ctrl-C interrupts immediately."""

    def __init__(self):
        self.requested = False

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
        log.warning("interrupt received: finishing this epoch's checkpoint, then stopping (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class _StopRequested(Exception):
    pass


def _checkpoint_state(model, optimizer, scheduler, scaler, epoch, best, best_epoch, bad_epochs) -> dict:
    return {"model": model.net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "best_val_accuracy": best, "best_epoch": best_epoch,
            "bad_epochs": bad_epochs,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                    "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}}


def _save_checkpoint(path: Path, state: dict) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    rundir.atomic_write(path, buffer.getvalue())


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is a user-facing problem
        raise UserError(f"{path}: cannot read the checkpoint ({err}); start a fresh run instead of --resume") from None


def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    torch.manual_seed(seed * 100003 + epoch)
    random.seed(seed * 100003 + epoch)
    np.random.seed((seed * 100003 + epoch) % 2**32)
    return torch.Generator().manual_seed(seed * 100003 + epoch)


# --------------------------------------------------------------------------- entry point


@dataclass
class Session:
    """Everything a fitting strategy needs, prepared once by :func:`prepare`."""

    cfg: TrainConfig
    run_dir: Path
    classes: list[str]
    splits: dict[str, list[Record]]
    caches: dict[str, list[np.ndarray] | None]
    preprocess: Preprocess
    train_set: ImageDataset
    val_set: ImageDataset
    model: Classifier
    device: torch.device
    amp_dtype: torch.dtype | None
    meta: dict
    weights_report: object = None

    def loader(self, dataset, shuffle=False, generator=None):
        return _loader(dataset, self.cfg, shuffle, generator)

    def save_best(self) -> None:
        rundir.save_weights(self.run_dir / rundir.WEIGHTS, self.model.net.state_dict(), self.meta)


@dataclass
class Fit:
    """What a fitting strategy reports back."""

    best_val_accuracy: float
    best_epoch: int
    epochs: int
    stopped_early: bool = False
    interrupted: bool = False
    strategy: str = "finetune"


def _validate(cfg: TrainConfig) -> None:
    """Fail fast, before a long scan of the data."""
    entry = model_spec(cfg.model)
    if cfg.pretrained and cfg.weights:
        raise UserError("use either --pretrained or --weights, not both")
    if cfg.pretrained:
        if entry.pretrained is None:
            raise UserError(f"{cfg.model} has no pretrained weights; see `imgcls models` for those that do")
        locate_source(entry.pretrained)
    if cfg.weights and not Path(cfg.weights).exists():
        raise UserError(f"--weights {cfg.weights}: no such file or run directory")
    source = rundir.weights_meta(cfg.weights) if cfg.weights else None
    if source is not None and source["model"] != cfg.model:
        raise UserError(f"--weights {cfg.weights} holds a {source['model']}, not a {cfg.model};"
                        f" add --model {source['model']} to fine-tune it")
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {cfg.schedule!r}; use one of {', '.join(SCHEDULES)}")
    if cfg.freeze not in (None, "backbone"):
        raise UserError(f"unknown --freeze {cfg.freeze!r}; use: backbone")
    if cfg.strategy not in ("auto", "features", "finetune"):
        raise UserError(f"unknown strategy {cfg.strategy!r}; use auto, features or finetune")
    if cfg.class_weights not in ("none", "balanced"):
        raise UserError(f"unknown --class-weights {cfg.class_weights!r}; use none or balanced")
    if cfg.views < 1:
        raise UserError(f"--views must be at least 1 (the center crop), not {cfg.views}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    if cfg.input_size is not None and not entry.min_input_size <= cfg.input_size <= entry.max_input_size:
        raise UserError(f"{cfg.model} takes inputs from {entry.min_input_size} to {entry.max_input_size} px,"
                        f" not {cfg.input_size}; pick another --input-size")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; the run directory needs a new or existing folder")
    for name, value, ok, rule in (
        ("lr", cfg.lr, cfg.lr is None or cfg.lr > 0, "> 0"),
        ("weight-decay", cfg.weight_decay, cfg.weight_decay is None or cfg.weight_decay >= 0, ">= 0"),
        ("momentum", cfg.momentum, 0 <= cfg.momentum < 1, "in [0, 1)"),
        ("label-smoothing", cfg.label_smoothing, 0 <= cfg.label_smoothing < 1, "in [0, 1)"),
        ("val-fraction", cfg.val_fraction, 0 < cfg.val_fraction < 1, "in (0, 1)"),
        ("warmup-epochs", cfg.warmup_epochs, cfg.warmup_epochs >= 0, ">= 0"),
        ("clip-grad", cfg.clip_grad, cfg.clip_grad is None or cfg.clip_grad > 0, "> 0"),
        ("patience", cfg.patience, cfg.patience is None or cfg.patience >= 1, ">= 1"),
        ("step-size", cfg.step_size, cfg.step_size >= 1, ">= 1"),
        ("backbone-lr-mult", cfg.backbone_lr_mult, cfg.backbone_lr_mult >= 0, ">= 0"),
        ("workers", cfg.workers, cfg.workers is None or cfg.workers >= 0, ">= 0"),
    ):
        if not ok:
            raise UserError(f"--{name} {value} is out of range: it must be {rule}")


def prepare(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Session:
    """Data (split, scan, cache), preprocessing, model and initial weights."""
    run_dir = Path(cfg.out)
    if resume:
        if not (run_dir / rundir.CHECKPOINT).exists():
            raise UserError(f"{run_dir}: nothing to resume (no {rundir.CHECKPOINT})")
    elif (run_dir / rundir.WEIGHTS).exists():
        raise UserError(f"{run_dir} already holds a trained model; choose another --out or continue it with --resume {run_dir}")
    _validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / rundir.METRICS).unlink(missing_ok=True)  # left by a run that never saved weights
    device = resolve_device(cfg.device)
    augment = Augment.from_dict(cfg.augment)
    torch.manual_seed(cfg.seed)

    splits, classes = _split_dataset(cfg)
    # a resumed run decodes exactly as it did before (the cache depends on the sizes)
    preprocess = (Preprocess.load(run_dir / rundir.PREPROCESS) if resume
                  else _input_preprocess(cfg, splits["train"]))
    caches = _scan(cfg, splits, classes, preprocess, augment, run_dir, progress)
    _write_split(run_dir, splits)
    index = {c: i for i, c in enumerate(classes)}
    if not resume:
        preprocess = _resolve_normalization(cfg, preprocess, splits["train"], index, caches["train"])
    preprocess.save(run_dir / rundir.PREPROCESS)
    rundir.write_json(run_dir / rundir.LABELS, classes)
    rundir.write_yaml(run_dir / rundir.CONFIG, cfg.to_dict())

    model = build_classifier(cfg.model, len(classes), preprocess, cfg.norm, cfg.se)
    weights_report = None if resume else _initial_weights(cfg, model.net)
    return Session(cfg, run_dir, classes, splits, caches, preprocess,
                   ImageDataset(splits["train"], index, preprocess, augment, caches["train"]),
                   ImageDataset(splits["val"], index, preprocess, None, caches["val"]),
                   model.to(device), device, resolve_amp(cfg.amp, device),
                   rundir.model_meta(cfg.model, classes, preprocess, {"norm": cfg.norm, "se": cfg.se}),
                   weights_report)


def fit_epochs(s: Session, resume: bool = False, progress: bool = True) -> Fit:
    """End-to-end training by epochs (full fine-tuning, linear probe or two-phase)."""
    cfg, model, run_dir = s.cfg, s.model, s.run_dir
    factory, default_lr, default_wd = OPTIMIZERS[cfg.optimizer]
    lr = cfg.lr if cfg.lr is not None else default_lr
    wd = cfg.weight_decay if cfg.weight_decay is not None else default_wd
    optimizer = factory(param_groups(model.net, lr, cfg.backbone_lr_mult), lr, wd, cfg)
    steps_per_epoch = len(_loader(s.train_set, cfg, shuffle=True, workers=0))
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    schedule = SCHEDULES[cfg.schedule]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule(step, total_steps, warmup_steps, steps_per_epoch, cfg))
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.amp_dtype == torch.float16)
    weight = class_weights(s.train_set.targets, len(s.classes), cfg.class_weights)
    criterion = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(s.device),
                                    label_smoothing=cfg.label_smoothing)

    start_epoch, best, best_epoch, bad_epochs = 0, -1.0, 0, 0
    if resume:
        state = _load_checkpoint(run_dir / rundir.CHECKPOINT)
        model.net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, best_epoch, bad_epochs = (state["epoch"], state["best_val_accuracy"], state["best_epoch"],
                                                     state["bad_epochs"])
        torch.set_rng_state(state["rng"]["torch"])
        log.info("resuming %s after epoch %d (best val accuracy %.4f)", run_dir, start_epoch, best)

    stopped_early = interrupted = False
    epoch = start_epoch
    with _GracefulInterrupt() as interrupt:
        try:
            for epoch in range(start_epoch, cfg.epochs):
                generator = _seed_epoch(cfg.seed, epoch)
                frozen = cfg.freeze == "backbone" or epoch < cfg.head_epochs
                (freeze_backbone if frozen else unfreeze)(model.net)
                epoch_start = time.perf_counter()
                lr_now = optimizer.param_groups[-1]["lr"]
                row = train_one_epoch(model, s.loader(s.train_set, True, generator), criterion, optimizer, scheduler,
                                      s.device, s.amp_dtype, cfg.clip_grad, scaler,
                                      progress_desc=f"epoch {epoch + 1}/{cfg.epochs}" if progress else None,
                                      frozen_backbone=frozen)
                logits, targets = predict_logits(model, s.loader(s.val_set), s.device, s.amp_dtype)
                val = compute_metrics(logits, targets, s.classes)
                row.update(epoch=epoch + 1, lr=lr_now, val_loss=val.loss, val_accuracy=val.accuracy,
                           epoch_seconds=time.perf_counter() - epoch_start)
                append_metrics(run_dir, row)
                if val.accuracy > best:
                    best, best_epoch, bad_epochs = val.accuracy, epoch + 1, 0
                    s.save_best()
                else:
                    bad_epochs += 1
                _save_checkpoint(run_dir / rundir.CHECKPOINT, _checkpoint_state(
                    model, optimizer, scheduler, scaler, epoch + 1, best, best_epoch, bad_epochs))
                log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  %.0f img/s",
                         epoch + 1, cfg.epochs, row["train_loss"], row["train_accuracy"], val.loss, val.accuracy,
                         row["images_per_second"])
                epoch += 1
                if cfg.patience is not None and bad_epochs >= cfg.patience:
                    stopped_early = True
                    log.info("early stopping: no val improvement in %d epochs", cfg.patience)
                    break
                if interrupt.requested:
                    raise _StopRequested
        except (KeyboardInterrupt, _StopRequested):
            interrupted = True
            log.warning("training interrupted after epoch %d; continue with: imgcls train --resume %s", epoch, run_dir)
    return Fit(best, best_epoch, epoch, stopped_early, interrupted)


def finalize(s: Session, fit: Fit, train_seconds: float) -> TrainResult:
    """Summary, curves, and (unless interrupted) val/test metrics of the best weights."""
    run_dir = s.run_dir
    if not (run_dir / rundir.WEIGHTS).exists():
        raise UserError("training stopped before the first epoch finished; nothing was saved")
    summary = {"model": s.cfg.model, "classes": s.classes, "strategy": fit.strategy,
               "best_val_accuracy": fit.best_val_accuracy, "best_epoch": fit.best_epoch, "epochs": fit.epochs,
               "epochs_planned": s.cfg.epochs, "train_seconds": round(train_seconds, 2), "n_train": len(s.train_set),
               "n_val": len(s.val_set), "stopped_early": fit.stopped_early, "interrupted": fit.interrupted,
               "device": str(s.device), "amp": str(s.amp_dtype).replace("torch.", "") if s.amp_dtype else "off"}
    if s.weights_report is not None:
        summary["initial_weights"] = s.weights_report.summary()
    if (run_dir / rundir.METRICS).exists():
        plot_training_curves(run_dir / rundir.METRICS, run_dir / rundir.CURVES)
    if not fit.interrupted:
        s.model.net.load_state_dict(_load_net_state(run_dir / rundir.WEIGHTS))
        if s.cfg.export_onnx:
            summary["onnx"] = _export(run_dir)
        evaluate = _evaluator(s, summary.get("onnx"))
        logits, targets = evaluate(s.val_set)
        write_metrics(compute_metrics(logits, targets, s.classes), run_dir, prefix="val")
        if s.splits.get("test"):
            test_set = ImageDataset(s.splits["test"], s.train_set.class_to_index, s.preprocess, None,
                                    s.caches.get("test"))
            logits, targets = evaluate(test_set)
            test = compute_metrics(logits, targets, s.classes)
            write_metrics(test, run_dir, prefix="test")
            summary["test_accuracy"] = test.accuracy
            summary["n_test"] = len(test_set)
    rundir.write_json(run_dir / rundir.SUMMARY, summary)
    return TrainResult(run_dir, summary)


def _evaluator(s: Session, onnx_path: str | None):
    """dataset -> (logits, targets) of the best weights: through the exported model on a CPU
    (ONNX Runtime; its logits match torch's, export checks that, and it is 2-4x faster
    than eager there), else the torch model on the training device."""
    if onnx_path is None or s.device.type != "cpu":
        return lambda dataset: predict_logits(s.model, s.loader(dataset), s.device, s.amp_dtype)
    from .engines import OnnxEngine

    engine = OnnxEngine(onnx_path)

    def evaluate(dataset):
        batches = [(engine(images.numpy()), targets.numpy()) for images, targets in s.loader(dataset)]
        if not batches:
            return np.zeros((0, len(s.classes)), np.float32), np.zeros(0, np.int64)
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    return evaluate


def _export(run_dir: Path) -> str | None:
    """model.onnx for prediction; a failure only costs speed (predict falls back to torch)."""
    from .export import export_run

    (run_dir / rundir.ONNX).unlink(missing_ok=True)  # never leave a stale export beside new weights
    try:
        return str(export_run(run_dir))
    except Exception as err:  # noqa: BLE001 - exporter limitations surface as many exception types
        log.warning("ONNX export failed (%s); prediction will use PyTorch", str(err).splitlines()[0][:300])
        return None


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train a classifier as configured; see :class:`TrainConfig`."""
    run_dir = Path(cfg.out)
    previous = rundir.read_json(run_dir / rundir.SUMMARY) if resume and (run_dir / rundir.SUMMARY).exists() else {}
    t0 = time.perf_counter()
    session = prepare(cfg, resume, progress)
    from .transfer import choose_strategy, fit_features  # here: transfer imports this module

    if choose_strategy(session, resume) == "features":
        fit = fit_features(session, progress)
    else:
        fit = fit_epochs(session, resume, progress)
    return finalize(session, fit, previous.get("train_seconds", 0.0) + time.perf_counter() - t0)


def _load_net_state(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds",
                  "images_per_second"]


def append_metrics(run_dir: Path, row: dict) -> None:
    """One row of ``metrics.csv`` (flushed at once, so a crash keeps the history)."""
    path = run_dir / rundir.METRICS
    columns = METRIC_COLUMNS
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
