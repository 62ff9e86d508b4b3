"""Sources -> split -> scan -> preprocessing -> model and initial weights: a Session."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import rundir, tasks
from ..data.events import EventReport, cameras, column_report, events_on_both_sides, group_events
from ..data.arraycache import SMALL_SIDE, CachedImages, decode_side, default_cache_dir, load_or_build
from ..data.dataset import CACHE_LIMIT_BYTES, ImageDataset, decode_all, estimate_cache_bytes
from ..data.preprocess import Augment, Preprocess
from ..data.records import Record
from ..data.scan import find_duplicates, scan_paths, typical_short_side
from ..data.sources import load_dataset, output_columns
from ..data.split import split_records
from ..data.stats import Pixels, compute_mean_std
from ..errors import UserError
from ..models.classifier import Classifier
from ..models.heads import zero_head
from ..models.pretrained import load_pretrained, locate_source
from ..models.registry import create_model, default_preprocess, model_spec
from ..models.weights import load_weights_file
from ..system import (available_cpus, configure_threads, cpu_has_native_bf16, default_workers, passive_openmp,
                      resolve_device)
from . import distributed, muon, progressive
from .balance import Balance, resolve_balance, tiny_class_warning
from .config import TrainConfig, validate
from .session import Session, WeightSource

log = logging.getLogger("imgcls")

BURST_FRAMES = 2.0  # frames per capture event on average from which the training data counts as bursts


# --------------------------------------------------------------------------- weights


def resolve_source(cfg: TrainConfig) -> WeightSource:
    """Where the initial weights come from, checked before any data is read."""
    entry = model_spec(cfg.model)
    if cfg.pretrained and cfg.weights:
        raise UserError("use either --pretrained or --weights, not both")
    if cfg.pretrained:
        if entry.pretrained is None:
            raise UserError(f"{cfg.model} has no pretrained weights; see `imgcls models` for those that do")
        return WeightSource("pretrained", str(locate_source(entry.pretrained)))
    if not cfg.weights:
        return WeightSource("none")
    if not Path(cfg.weights).exists():
        raise UserError(f"--weights {cfg.weights}: no such file or run directory")
    meta = rundir.weights_meta(cfg.weights)
    if meta is None:
        return WeightSource("file", cfg.weights)
    if meta["model"] != cfg.model:
        raise UserError(f"--weights {cfg.weights} holds a {meta['model']}, not a {cfg.model};"
                        f" add --model {meta['model']} to fine-tune it")
    return WeightSource("run", cfg.weights, meta)


def load_source(cfg: TrainConfig, source: WeightSource, net) -> None:
    """Load the source's weights into ``net``; the load report (with the file's own head) goes to ``source``."""
    if source.kind == "none":
        return
    if source.kind == "pretrained":
        source.report = load_pretrained(cfg.model, net, model_spec(cfg.model).pretrained)
    else:
        source.report = load_weights_file(cfg.weights, net, model_name=cfg.model)
    log.info(source.report.summary())
    if source.report.head_replaced:
        zero_head(net)  # fine-tuning starts at loss ln K, not from the architecture's random head


# --------------------------------------------------------------------------- preprocessing


def resolve_geometry(cfg: TrainConfig, source: WeightSource, train_records: list[Record]) -> Preprocess:
    """Input size and resize/crop, first match wins:

    1. ``--input-size``: the model's preprocessing at that size;
    2. the weights': an imgcls run's own preprocessing; pretrained or foreign
       weights expect the model's default;
    3. from scratch, images smaller than the model's default: their median
       shorter side (within the model's range), no crop margin, since upsampling
       adds compute but no information;
    4. the model's default.
    """
    if cfg.input_size is not None:
        return default_preprocess(cfg.model, cfg.input_size)
    if source.meta is not None:
        return Preprocess.from_dict(source.meta["preprocess"])
    spec = default_preprocess(cfg.model)
    if source.kind != "none":
        return spec
    side = typical_short_side([r.path for r in train_records], seed=cfg.seed)
    if side is None:
        return spec
    size = max(model_spec(cfg.model).min_input_size, side)
    if size >= spec.input_size:
        return spec
    log.info("input size %d px: the training images' median shorter side is %d px (the model's default is %d;"
             " set --input-size to choose)", size, side, spec.input_size)
    return spec.replace(input_size=size, crop_pct=1.0)


def resolve_normalization(cfg: TrainConfig, source: WeightSource, geometry: Preprocess, pixels) -> Preprocess:
    """Mean and std, first match wins: ``--mean``/``--std``; an imgcls run's; the geometry's
    (pretrained or foreign weights: the model's default); from scratch, the data's own.

    ``pixels()`` gives the training images and how many of them to count."""
    if cfg.mean and cfg.std:
        return geometry.replace(mean=cfg.mean, std=cfg.std)
    if source.meta is not None:
        saved = Preprocess.from_dict(source.meta["preprocess"])
        return geometry.replace(mean=saved.mean, std=saved.std)
    if source.kind != "none":
        return geometry
    images, limit = pixels()
    mean, std = compute_mean_std(images, limit=limit)
    return geometry.replace(mean=mean, std=std)


# --------------------------------------------------------------------------- data


def assign_groups(cfg: TrainConfig, splits: dict[str, list[Record]]) -> tuple[dict[str, list[Record]], EventReport]:
    """Every record's group, the unit a split keeps whole (``--group-by``): its capture event (from a
    column, else from EXIF times per camera), its camera, or nothing."""
    names = list(splits)
    records = [r for name in names for r in splits[name]]
    if cfg.group_by == "none":
        records, report = [replace(r, group=None) for r in records], EventReport("none")
    elif cfg.group_by == "site":
        records = [replace(r, group=f"site:{camera}") for r, camera in zip(records, cameras(records))]
        report = column_report(records)
        report.source = "site"
    elif any(r.group is not None for r in records):
        report = column_report(records)
    else:
        records, report = group_events(records, cfg.event_gap)
    out, start = {}, 0
    for name in names:
        out[name], start = records[start:start + len(splits[name])], start + len(splits[name])
    return out, report


def with_bursts(augment: Augment, changes: dict, events: EventReport) -> Augment:
    """``augment`` with the strategy's settings for data in capture bursts (``changes``) when the images come
    in bursts: events found by time or given by a column, of ``BURST_FRAMES`` frames or more on average."""
    if not changes or events.source not in ("exif", "column") or events.mean_frames < BURST_FRAMES:
        return augment
    log.info("capture bursts (%.1f frames per event): the training views use %s, for camera-trap frames (%s)",
             events.mean_frames, ", ".join(f"{k} {v}" for k, v in changes.items()),
             ", ".join(f"--{k.replace('_', '-')}" for k in changes) + " to choose")
    return Augment.from_dict({**augment.to_dict(), **changes})


def _log_events(report: EventReport, cfg: TrainConfig) -> None:
    if report.source == "none":
        return
    given = (f"the COCO file's seq_id, else its datetime within {cfg.event_gap:g} s per location"
             if Path(cfg.data).suffix.lower() == ".json" else f"the CSV's {cfg.event_column or 'group'!r} column")
    where = {"column": f"from {given}", "site": "whole cameras (--group-by site)",
             "exif": f"within {cfg.event_gap:g} s per camera, {report.from_exif} frames by EXIF time, "
                     f"{report.from_mtime} by file time, {report.without_time} without a time"}[report.source]
    log.info("capture events: %d (%s), %.1f frames per event on average, %d at most", report.events, where,
             report.mean_frames, report.max_frames)
    if report.leaked_by_random_split:
        log.info("capture events: a split of single images would have put %d of them on both sides of the split",
                 report.leaked_by_random_split)
    if report.across_given_splits:
        log.warning("capture events: %d events have frames in more than one of the data's own splits; validation"
                    " scores those frames as if unseen. Split by event (drop the split column or folders)",
                    report.across_given_splits)


def split_dataset(cfg: TrainConfig) -> tuple[dict[str, list[Record]], list[str], EventReport]:
    """The data's records by split (train, val, maybe test), the class names and the capture events."""
    dataset = load_dataset(cfg.data, cfg.path_column, cfg.label_column, cfg.event_column, cfg.event_gap)
    splits, events = assign_groups(cfg, tasks.parse_label_sets(dict(dataset.splits), cfg.label_sep, cfg.data))
    to_split = "all" if "all" in splits else ("train" if "val" not in splits else None)
    if to_split is not None:
        pool = splits.pop(to_split)
        splits["train"], splits["val"] = split_records(pool, cfg.val_fraction, cfg.seed)
        if events.source != "none":
            train, val = split_records([replace(r, group=None) for r in pool], cfg.val_fraction, cfg.seed)
            keyed = {os.path.abspath(r.path): r.group for r in pool}
            events.leaked_by_random_split = events_on_both_sides(
                {"train": [replace(r, group=keyed[os.path.abspath(r.path)]) for r in train],
                 "val": [replace(r, group=keyed[os.path.abspath(r.path)]) for r in val]})
    elif events.source != "none":
        events.across_given_splits = events_on_both_sides(splits)
    _log_events(events, cfg)
    classes = (tasks.output_classes(splits["train"]) if splits["train"] and splits["train"][0].outputs is not None
               else sorted({label for r in splits["train"] for label in r.label_set}))
    if len(classes) < 2:
        raise UserError(f"{cfg.data}: only one class ({', '.join(classes) or 'none'}) in the training data;"
                        " a classifier needs at least two")
    unknown = sorted({label for s in ("val", "test") for r in splits.get(s, []) for label in r.label_set
                      if label not in classes})
    if unknown:
        raise UserError(f"{cfg.data}: class(es) {', '.join(unknown)} appear in val/test but not in train;"
                        " add training images for them")
    if not splits["val"]:
        raise UserError(f"{cfg.data}: too few images to hold out a validation split; add images or a val/ folder")
    return splits, classes, events


@dataclass
class ScanResult:
    """The pre-flight scan: the readable records, their decoded pixels when cached, what was skipped."""

    splits: dict[str, list[Record]]
    caches: dict[str, list[np.ndarray] | CachedImages | None]
    unreadable: list[tuple[Record, str, str]]  # (record, split, reason)
    duplicates: list[dict]
    ram_cache: bool
    cache_bytes: int
    events: dict | None = None  # data.events.EventReport.to_dict()
    cache: str = "none"  # array, ram or none: how the pixels were kept
    array_files: dict[str, dict] | None = None  # split -> {path, reused} of the array cache

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: dict(sorted(Counter(label for r in recs for label in r.label_set).items()))
                for name, recs in self.splits.items()}

    def to_dict(self) -> dict:
        return {"counts": self.counts(),
                "unreadable": [{"path": str(r.path), "split": s, "reason": why} for r, s, why in self.unreadable],
                "duplicates": self.duplicates, "ram_cache": self.ram_cache, "cache": self.cache,
                "array_cache": self.array_files,
                "cache_megabytes": round(self.cache_bytes / 2**20, 1), "events": self.events}


def resolve_cache(choice: str, cache_bytes: int, side: int) -> str:
    """``--cache``: auto is the array cache for small images (at most arraycache.SMALL_SIDE px decoded), else
    RAM when the images fit in CACHE_LIMIT_BYTES, else decoding every epoch."""
    if choice != "auto":
        return choice
    if side <= SMALL_SIDE:
        return "array"
    return "ram" if cache_bytes <= CACHE_LIMIT_BYTES else "none"


def _array_cache(records, spec, augment, cache_dir, workers, progress, desc):
    """:func:`load_or_build`, once per machine: under several processes the first of each machine decodes
    (with the machine's decode threads) while the others wait, then they map the entry it wrote."""
    first = distributed.local_rank() == 0
    built, failed = None, None
    if first:
        try:
            built = load_or_build(records, spec, augment, cache_dir, workers, progress, desc=desc)
        except OSError as err:  # the others must still meet it at the barrier, or they wait for good
            failed = err
    distributed.barrier()
    if failed is not None:
        raise failed
    return built if first else load_or_build(records, spec, augment, cache_dir, workers, False, desc=desc)


def scan(cfg: TrainConfig, splits: dict[str, list[Record]], spec: Preprocess, augment: Augment,
         progress: bool) -> ScanResult:
    """Decode every file once; the unreadable ones are left out.  Small datasets keep their
    decoded pixels (the array cache on disk or the RAM cache); larger ones are only checked."""
    n = sum(len(v) for v in splits.values())
    cache_bytes = estimate_cache_bytes(n, spec, augment)
    mode = resolve_cache(cfg.cache, cache_bytes, decode_side(spec, augment))
    workers = cfg.workers or default_workers()
    kept: dict[str, list[Record]] = {}
    caches: dict[str, list[np.ndarray] | CachedImages | None] = {}
    unreadable: list[tuple[Record, str, str]] = []
    files: dict[str, dict] = {}
    for name, records in splits.items():
        split_augment = augment if name == "train" else None
        if mode == "array":
            try:
                array = _array_cache(records, spec, split_augment, cfg.cache_dir, workers, progress,
                                     desc=f"decode {name}")
            except OSError as err:  # a full or read-only disk costs the reuse, not the run
                log.warning("--cache array: cannot write to %s (%s); decoding into RAM instead",
                            cfg.cache_dir or default_cache_dir(), err)
                return scan(replace(cfg, cache="ram"), splits, spec, augment, progress)
            bad = {id(records[i]): reason for i, reason in array.failures.items()}
            caches[name] = array.view()
            files[name] = {"path": str(array.path), "reused": array.reused}
            if array.reused:
                log.info("decode %s: %d images from the array cache %s", name, len(records), array.path)
        elif mode == "ram":
            result = decode_all(records, spec, split_augment, workers, progress, desc=f"decode {name}")
            bad = {id(r): reason for r, reason in result.failures}
            caches[name] = [a for a in result.arrays if a is not None]
        else:
            bad_paths = dict(scan_paths([r.path for r in records], workers=workers, progress=progress))
            bad = {id(r): bad_paths[r.path] for r in records if r.path in bad_paths}
            caches[name] = None
        unreadable += [(r, name, bad[id(r)]) for r in records if id(r) in bad]
        kept[name] = [r for r in records if id(r) not in bad]
    return ScanResult(kept, caches, unreadable, _duplicates(kept, workers), mode != "none", cache_bytes,
                      cache=mode, array_files=files or None)


def _duplicates(splits: dict[str, list[Record]], workers: int) -> list[dict]:
    """Groups of rows naming the same file, and of byte-identical files, each with the split
    and label of every copy."""
    rows: dict[str, list[tuple[Record, str]]] = {}
    for name, records in splits.items():
        for r in records:
            rows.setdefault(os.path.abspath(r.path), []).append((r, name))
    groups = [{"kind": "same file", "paths": [str(r.path) for r, _ in copies], "splits": [s for _, s in copies],
               "labels": [r.label for r, _ in copies]} for copies in rows.values() if len(copies) > 1]
    where = {copies[0][0].path: (copies[0][1], copies[0][0].label) for copies in rows.values()}
    groups += [{"kind": "identical bytes", "paths": [str(p) for p in group], "splits": [where[p][0] for p in group],
                "labels": [where[p][1] for p in group]}
               for group in find_duplicates(list(where), workers=workers)]
    return groups


def _report_scan(result: ScanResult, classes: list[str], run_dir: Path, write: bool = True) -> None:
    if write:
        rundir.write_json(run_dir / rundir.SCAN, result.to_dict())
    for r, _, why in result.unreadable:
        log.warning("skipped unreadable file %s: %s", r.path, why)
    if result.duplicates:
        leaks = sum(len(set(d["splits"])) > 1 for d in result.duplicates)
        conflicts = sum(len(set(d["labels"])) > 1 for d in result.duplicates)
        log.warning("%d group(s) of repeated or identical files: %d across splits (validation scores them as if unseen), %d"
                    " with different labels; listed in %s", len(result.duplicates), leaks, conflicts,
                    run_dir / rundir.SCAN)
    train_counts = result.counts()["train"]
    missing = [c for c in classes if not train_counts.get(c)]
    if missing:
        raise UserError(f"no readable training images left for class(es) {', '.join(missing)}; see"
                        f" {run_dir / rundir.SCAN}")


def resolve_class_balance(cfg: TrainConfig, counts: dict[str, int], classes: list[str]) -> Balance:
    """``--balance`` and ``--select-by`` resolved from the training counts, logged; tiny classes get a warning."""
    balance = resolve_balance(cfg.balance, {c: counts.get(c, 0) for c in classes}, cfg.select_by)
    log.info("balance %s (%s)", balance.mode, balance.reason)
    log.info("model selection by %s (%s)", balance.selection_metric, balance.selection_reason)
    warning = tiny_class_warning(balance.tiny)
    if warning:
        log.warning(warning)
    return balance


# --------------------------------------------------------------------------- device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision: automatic on GPUs; on CPUs only when asked for (``bf16``) and native.

    On CPUs it pays for some models only, and emulated bf16 is hundreds of times
    slower, so it is refused there (docs/decisions.md)."""
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


# --------------------------------------------------------------------------- the session


def prepare(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Session:
    """Data (split, scan, cache), preprocessing, model and initial weights.

    On several processes every rank prepares the same session (same seed); rank 0 alone writes."""
    run_dir = Path(cfg.out)
    if resume:
        if not (run_dir / rundir.CHECKPOINT).exists():
            raise UserError(f"{run_dir}: nothing to resume (no {rundir.CHECKPOINT})")
    elif (run_dir / rundir.WEIGHTS).exists():
        raise UserError(f"{run_dir} already holds a trained model; choose another --out or continue it with"
                        f" --resume {run_dir}")
    validate(cfg)
    muon.check(cfg.muon, cfg.optimizer)
    if cfg.output_weights is not None:  # checked before any data is read
        columns = output_columns(cfg.label_column)
        if len(columns) < 2:
            raise UserError("--output-weights weighs the heads of a multi-output model; name several label columns"
                            " (--label-column species,count,...) or leave it out")
        tasks.parse_output_weights(cfg.output_weights, columns)
    entry = model_spec(cfg.model)
    if cfg.input_size is not None and not entry.min_input_size <= cfg.input_size <= entry.max_input_size:
        raise UserError(f"{cfg.model} takes inputs from {entry.min_input_size} to {entry.max_input_size} px,"
                        f" not {cfg.input_size}; pick another --input-size")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; the run directory needs a new or existing folder")
    if not resume and run_dir.is_dir() and not (run_dir / rundir.CONFIG).exists() and any(run_dir.iterdir()):
        raise UserError(f"--out {run_dir} is a folder with other files in it, not an imgcls run; training would"
                        " write beside them: choose a new or empty folder")
    source = resolve_source(cfg)
    device = distributed.place(resolve_device(cfg.device))
    distributed.check(cfg, device)
    threads = configure_threads(device)  # under --nproc: within this process's share of the cores
    if device.type == "cpu" and not passive_openmp() and available_cpus() > 1:
        log.warning("training on 1 CPU thread: torch's OpenMP threads spin while they wait (torch was imported"
                    " before imgcls, or OMP_WAIT_POLICY is not PASSIVE), and spinning threads collapse when"
                    " another program shares the cores; import imgcls before torch, or set"
                    " OMP_WAIT_POLICY=PASSIVE before starting Python, to train on every core")
    elif device.type == "cpu":
        log.debug("%d torch thread(s), OpenMP waiting passively", threads)
    amp_dtype = resolve_amp(cfg.amp, device)
    distributed.barrier()  # every rank has checked the folder before rank 0 writes into it
    main = distributed.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_yaml(run_dir / rundir.CONFIG, cfg.to_dict())  # first: the folder is recognisably a run
        if not resume:
            (run_dir / rundir.METRICS).unlink(missing_ok=True)  # left by a run that never saved weights
    augment = Augment.from_dict(cfg.augment)
    torch.manual_seed(cfg.seed)

    splits, classes, events = split_dataset(cfg)
    augment = with_bursts(augment, cfg.burst_augment, events)
    task = tasks.TASKS[tasks.resolve(cfg.task, cfg.label_sep, [r for rs in splits.values() for r in rs], len(classes))]
    if task.name != tasks.DEFAULT:
        log.info("task %s: %d labels, %d logits", task.name, len(classes), task.outputs(len(classes)))
    # a resumed run decodes exactly as it did before (the cache depends on the sizes)
    geometry = (rundir.read_preprocess(run_dir / rundir.PREPROCESS) if resume
                else resolve_geometry(cfg, source, splits["train"]))
    progressive.check(cfg.progressive, geometry.input_size, model_spec(cfg.model).min_input_size, cfg.model)
    scanned = scan(cfg, splits, geometry, augment, progress)
    scanned.events = events.to_dict()
    _report_scan(scanned, classes, run_dir, write=main)
    splits = scanned.splits
    heads = None
    if task.heads:  # the primary (first) head's classes decide the balance and the selection
        names = [name for name, _ in splits["train"][0].outputs]
        heads = tasks.output_heads(classes, tasks.parse_output_weights(cfg.output_weights, names))
        log.info("outputs: %s", "; ".join(f"{h['name']} ({len(h['labels'])} classes, loss weight {h['weight']:g})"
                                          for h in heads))
    primary = [c for c in classes if heads is None or c.startswith(f"{heads[0]['name']}:")]
    balance = resolve_class_balance(cfg, scanned.counts()["train"], primary)
    if balance.sampler and task.name in ("multilabel", "multioutput"):
        raise UserError(f"--balance sampler draws images by their class, and a {task.name} image has several;"
                        " use --balance weights (classes weighed alike in each label's or head's loss) or none")
    if main:
        rundir.write_split(run_dir / rundir.SPLIT,
                           [(r.path, r.label, r.group, name) for name, records in splits.items() for r in records])
    index = tasks.training_index(task, [r for rs in splits.values() for r in rs], classes)

    def pixels():  # decoding from disk is slow: count fewer images then
        if scanned.caches["train"] is not None:
            return scanned.caches["train"], 2000
        return Pixels(ImageDataset(splits["train"], index, geometry)), 300

    preprocess = geometry if resume else resolve_normalization(cfg, source, geometry, pixels)
    if main:
        preprocess.save(run_dir / rundir.PREPROCESS)
        rundir.write_json(run_dir / rundir.LABELS, classes)

    build = {"norm": cfg.norm, "se": cfg.se}
    readout = (source.meta or {}).get("build", {}).get("readout")
    if readout:  # the source run's head reads several layers: the same network, so its weights fit
        build["readout"] = list(readout)
    model = Classifier(create_model(cfg.model, task.outputs(len(classes)), preprocess.input_size, cfg.norm, cfg.se,
                                    readout),
                       preprocess)
    if not resume:
        load_source(cfg, source, model.net)
    return Session(cfg, run_dir, classes, splits, scanned.caches, preprocess,
                   ImageDataset(splits["train"], index, preprocess, augment, scanned.caches["train"], device),
                   ImageDataset(splits["val"], index, preprocess, None, scanned.caches["val"], device),
                   model.to(device), device, amp_dtype,
                   rundir.model_meta(cfg.model, classes, preprocess, build,
                                     tasks.meta(task.name, cfg.label_sep, heads)),
                   source,
                   balance, rank=distributed.rank(), world=distributed.world())
