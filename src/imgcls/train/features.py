"""The ``features`` strategy: fit the head on frozen features of several views per image.

The backbone stays as loaded.  Its pooled features (the input of the
classifier head, which is swapped for ``nn.Identity``) are computed once for
``views`` crops of every training image (view 0 = the eval center crop, the
others drawn with the training augmentation) and for the val images, with ONNX
Runtime on a CPU (the extractor is exported uint8-in; PyTorch eager if that
fails, and on a GPU).  Where the model's family declares taps
(:mod:`imgcls.models.readout`, ``--readout``), the net is first wrapped so that
its features also hold the pooled outputs of its last blocks, and the head is
solved on standardized features.  The head's ``nn.Linear`` is then fitted
full-batch (:func:`.head.fit_head`) and copied into the model, so the saved
model is an ordinary network that predicts exactly what this path measured;
its ONNX graph is the extractor's with the head appended
(:func:`imgcls.export.with_linear_head`), not a second export.

Why on a CPU: forward passes in ONNX Runtime are several times faster than
eager training steps, so many views of every image cost less than one
fine-tuning epoch (figures: docs/decisions.md).

On several processes (:mod:`.distributed`) each rank extracts the features of
its block of the images, rank 0 gathers them in image order and fits the head
alone.  Every image's augmented views are drawn from a seed of its own
(``(seed, index)``), so the features, and the head, do not depend on how the
images were shared out.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from .. import tasks, export, rundir
from ..data.dataset import base_image
from ..data.decode import ImageError
from ..errors import first_line
from ..models.classifier import Classifier
from ..models.heads import classifier_head, head_prefix
from ..models.readout import ReadoutNet, readout_taps
from ..models.registry import model_spec
from ..prediction.engines import OnnxEngine, TorchEngine
from ..progress import bar as progress_bar
from . import distributed
from .session import Fit, Session
from .task_heads import fit_task_head

log = logging.getLogger("imgcls")

MAX_FEATURE_ROWS = 20_000   # views are capped so that images x views stays below this (time and memory)
BATCH = 32
NEAR_COPY = 0.9             # cosine of standardized features past which two images count as near-copies
BURSTY = 0.25               # share of training images with a near-copy past which the head reads the final
                            # features only: the earlier blocks' features let it fit each burst's scene


def feature_extractor(net: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """A copy of ``net`` whose classifier head is ``nn.Identity`` (it returns the head's
    input), and the original head.  Generic over timm and torchvision models."""
    head = classifier_head(net)
    prefix = head_prefix(net)
    if not prefix:  # the net is its head: the features are its input
        return nn.Identity(), head
    extractor = copy.deepcopy(net)
    extractor.set_submodule(prefix, nn.Identity())
    return extractor, head


def linear_readout_problem(net: nn.Module, extractor: nn.Module, head: nn.Module, sample: torch.Tensor) -> str | None:
    """None when ``net(x) == head(extractor(x))`` (a linear head on pooled features), else why not."""
    if not isinstance(head, nn.Linear) or head.bias is None:
        return f"its classifier head is a {type(head).__name__}, not a Linear layer with bias"
    was_training = net.training
    net.eval()
    extractor.eval()
    try:
        with torch.inference_mode():
            logits = net(sample)
            feats = extractor(sample)
            if feats.ndim != 2 or feats.shape[1] != head.in_features:
                return f"the head's input has shape {tuple(feats.shape)}, not (N, {head.in_features})"
            diff = float((head(feats) - logits).abs().max())
    finally:
        net.train(was_training)
    if not diff <= 1e-4 * max(1.0, float(logits.abs().max())):
        return f"the network does more after its head (head(features) differs from its output by {diff:.3g})"
    return None


def _export_extractor(session, module, sample: np.ndarray) -> bytes | None:
    """The extractor as ONNX bytes, or None (with a warning) when the export fails."""
    t0 = time.perf_counter()
    try:
        dim = classifier_head(session.model.net).in_features
        with tempfile.TemporaryDirectory() as tmp:
            path = export.export_onnx(module, [f"f{i}" for i in range(dim)], Path(tmp) / "features.onnx",
                                      f"{session.cfg.model}-features", sample=sample)
            data = path.read_bytes()
        OnnxEngine(data, threads=1)  # ONNX Runtime must load it too
    except Exception as err:  # noqa: BLE001 - any export problem: eager is slower but right
        log.warning("fast path: ONNX export of the feature extractor failed (%s); using PyTorch eager"
                    " (several times slower on a CPU)", first_line(err))
        return None
    log.info("fast path: feature extractor exported to ONNX in %.1f s", time.perf_counter() - t0)
    return data


def _feature_engine(session, extractor, sample: np.ndarray):
    """(engine, name, graph): ONNX Runtime on a CPU (graph: the extractor's ONNX ModelProto),
    PyTorch eager otherwise or if export fails (graph None).  On several processes rank 0 exports
    and the others receive its file."""
    module = Classifier(extractor, session.preprocess).eval()
    if session.device.type == "cpu":
        data = distributed.from_main(lambda: _export_extractor(session, module, sample))
        if data is not None:
            engine = OnnxEngine(data, threads=distributed.cpu_share())
            return engine, f"onnxruntime ({engine.threads} threads)", onnx.load_model_from_string(data)
    engine = TorchEngine(module, device=str(session.device), amp=None)
    return engine, f"torch eager ({session.device})", None


def near_copy_share(center: np.ndarray, block: int = 2048, sample: int = 20000) -> float:
    """The share of images whose nearest other image has a cosine above ``NEAR_COPY``, on standardized
    features ``(n, D)`` of their center crops.  Frames of one burst are near-copies; distinct
    photos, even of one class, rarely are.  Past ``sample`` images, a random ``sample`` of them (fixed
    seed) is looked up among all: the share is estimated in time linear in ``n``, not quadratic."""
    n = len(center)
    if n < 2:
        return 0.0
    z = (center - center.mean(0)) / (center.std(0) + 1e-6)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
    queries = np.arange(n) if n <= sample else np.sort(np.random.default_rng(0).choice(n, sample, replace=False))
    nearest = np.empty(len(queries), np.float32)
    for i in range(0, len(queries), block):
        rows = queries[i:i + block]
        sim = z[rows] @ z.T
        sim[np.arange(len(rows)), rows] = -1.0  # not itself
        nearest[i:i + block] = sim.max(1)
    return float(np.mean(nearest > NEAR_COPY))


def use_readout(s: Session) -> tuple[str, ...]:
    """Wrap the session's net in a multi-layer read-out when ``--readout`` asks for one and the
    model's family declares taps (recorded in the model file's build metadata); the taps read."""
    net = s.model.net
    if isinstance(net, ReadoutNet):  # started from a run whose head already reads these layers
        return net.taps
    taps = () if s.cfg.readout == "final" else readout_taps(model_spec(s.cfg.model).family)
    if not taps:
        if s.cfg.readout == "layers":
            log.warning("fast path: %s declares no blocks to read beside its final features; the head reads"
                        " the final features only", s.cfg.model)
        return ()
    s.model.net = ReadoutNet(net, taps, len(s.classes), s.preprocess.input_size)
    s.meta["build"]["readout"] = list(taps)
    log.info("fast path: the head reads the pooled outputs of %s beside the final features", ", ".join(taps))
    return taps


def _base_image(dataset, index: int) -> np.ndarray:
    if dataset.cache is not None:
        return dataset.cache[index]
    return base_image(dataset.records[index].path, dataset.spec, dataset.augment)


def _views_of(dataset, index: int, views: int) -> list[np.ndarray]:
    """View 0: the eval center crop; then views-1 crops from the training augmentation."""
    base = torch.from_numpy(_base_image(dataset, index))
    size = dataset.spec.input_size
    center = base if dataset.transform is None else TF.center_crop(base, [size, size])
    out = [np.ascontiguousarray(center.numpy())]
    for _ in range(views - 1):
        out.append(np.ascontiguousarray(dataset.transform(base).numpy()))
    return out


def view_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s augmented views: its own, whichever process extracts it."""
    return seed * 1_000_003 + index


def compute_features(engine, dataset, views: int, seed: int = 0, progress: bool = False,
                     desc: str = "features", dtype=np.float32, indices=None) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(n, views, D)`` of the images ``indices`` of ``dataset`` (default: all; the engine's
    outputs flattened, as ``dtype``) and their targets ``(n,)``.

    Views are drawn in one background thread while the engine runs the previous batch, each image's
    from its own seed (:func:`view_seed`).  An image that cannot be read any more (it passed the
    scan) is left out."""
    views = views if dataset.transform is not None else 1
    per_batch = max(1, BATCH // views)
    indices = range(len(dataset)) if indices is None else [int(i) for i in indices]
    chunks = [indices[i:i + per_batch] for i in range(0, len(indices), per_batch)]
    generator_state = torch.get_rng_state()

    def prepare(chunk):
        crops, kept = [], []
        for i in chunk:
            try:
                if views > 1:
                    torch.manual_seed(view_seed(seed, i))
                crops += _views_of(dataset, i, views)
                kept.append(i)
            except ImageError as err:
                log.warning("fast path: skipping %s: %s", dataset.records[i].path, err)
        return (np.stack(crops) if crops else None), kept

    feats, targets = [], []
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(prepare, chunks[0]) if chunks else None
            for k in progress_bar(range(len(chunks)), desc=desc, disable=not progress, unit="batch", leave=False):
                batch, kept = pending.result()
                pending = pool.submit(prepare, chunks[k + 1]) if k + 1 < len(chunks) else None
                if batch is None:
                    continue
                out = np.asarray(engine(batch), dtype=dtype)
                feats.append(out.reshape(len(kept), views, -1))
                targets += [dataset.targets[i] for i in kept]
    finally:
        torch.set_rng_state(generator_state)
    if not feats:
        return np.zeros((0, views, 0), dtype), np.zeros(0, np.int64)
    return np.concatenate(feats), np.asarray(targets, dtype=np.int64)


def source_prior(session: Session, dim: int):
    """The source weights' own classifier ``(W, b)`` as the head's prior, when it reads ``dim`` features,
    or the net's final features, which a multi-layer read-out puts last (then padded with zeros)."""
    report = session.source.report
    prior = report.source_head if report is not None else None
    if prior is None or prior[0].shape[1] == dim:
        return prior
    net = session.model.net
    W, b = prior
    if isinstance(net, ReadoutNet) and W.shape[1] == net.final_dim and dim > net.final_dim:
        return torch.cat([W.new_zeros(W.shape[0], dim - net.final_dim), W], 1), b
    return None


def load_head(head: nn.Linear, fit) -> None:
    """Copy a :class:`~.head.HeadFit` into the model's ``nn.Linear`` head."""
    with torch.no_grad():
        head.weight.copy_(fit.weight.to(head.weight))
        head.bias.copy_(fit.bias.to(head.bias))


def readout_problem(session: Session) -> str | None:
    """None when the session's model is a linear head on pooled features (the features
    strategy can run), else why not; checked on two images of the val set."""
    task = tasks.of(session.meta)
    if task.name != tasks.DEFAULT and session.cfg.strategy == "tail":  # tail fine-tunes a softmax head
        return f"the tail strategy trains multiclass models only, not {task.name}"
    net = session.model.net
    extractor, head = feature_extractor(net)
    sample = np.stack([session.val_set[i][0].numpy() for i in range(min(2, len(session.val_set)))])
    x = session.model.normalize(torch.from_numpy(sample).to(session.device))
    return linear_readout_problem(net, extractor.to(session.device), head, x)


def fit_features(s: Session, progress: bool = True) -> Fit:
    """Fit the head on frozen features of ``views`` crops per training image; the head goes
    back into ``s.model``, which is saved."""
    t_start = time.perf_counter()
    cfg = s.cfg
    task = tasks.of(s.meta)  # the head: softmax, one sigmoid, or one sigmoid per label (task_heads)
    taps = use_readout(s)
    extractor, head = feature_extractor(s.model.net)
    sample = np.stack([s.val_set[i][0].numpy() for i in range(min(4, len(s.val_set)))])
    engine, engine_name, graph = _feature_engine(s, extractor, sample)
    views = cfg.views if s.train_set.transform is not None else 1
    views = max(1, min(views, MAX_FEATURE_ROWS // max(1, len(s.train_set))))
    if views < cfg.views and s.train_set.transform is not None:
        log.info("fast path: %d views per image (not %d): %d images give enough rows", views, cfg.views,
                 len(s.train_set))
    threads = torch.get_num_threads()
    try:
        # the crops and the head's small matrix products run best on one thread: with two, a core
        # busy elsewhere (here: ONNX Runtime) slows them down many times (docs/decisions.md)
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        # each rank its block of the images; rank 0 gathers them in image order and fits the head
        train_feats, y = compute_features(engine, s.train_set, views, cfg.seed, progress, "train features",
                                          indices=distributed.shard(len(s.train_set)))
        val_feats, y_val = compute_features(engine, s.val_set, 1, cfg.seed, progress, "val features",
                                            indices=distributed.shard(len(s.val_set)))
        gathered = distributed.gather_rows(train_feats, y, val_feats, y_val)
        if gathered is None:  # not rank 0: its share is delivered
            return Fit(0.0, 1, 1, strategy="features")
        train_feats, y, val_feats, y_val = gathered
        if s.world > 1:
            log.info("fast path: features extracted by %d processes, each its share of the images; the head is"
                     " fitted in this one", s.world)
        t_feats = time.perf_counter() - t0
        t0 = time.perf_counter()
        prior = source_prior(s, train_feats.shape[2])
        skip, share = 0, None  # skip: leading feature columns the head leaves at zero weight
        if taps and cfg.readout == "auto":
            share = near_copy_share(train_feats[:, 0])
            if share > BURSTY:
                skip = train_feats.shape[2] - s.model.net.final_dim
                log.info("fast path: %.0f%% of the training images have a near-copy (bursts, as from camera traps):"
                         " the head reads the final features only (--readout layers to read all)", 100 * share)
        if prior is not None:
            prior = prior[0][:, skip:], prior[1]
        # one fit over every cached view: no draws, so --balance sampler weighs the images (train.balance);
        # the cross-validated loss counts classes alike when selecting by balanced accuracy (--select-by)
        fit = fit_task_head(task.name, train_feats[:, :, skip:], y, len(s.classes), prior, cfg.seed,
                            s.balance.loss_weights(draws=False), progress, standardize=bool(taps) and not skip,
                            cv_mode=s.balance.cv_weights, labels=s.classes)
        if skip:
            fit.weight = torch.cat([fit.weight.new_zeros(fit.weight.shape[0], skip), fit.weight], 1)
            taps = ()
        t_head = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    n_rows = train_feats.shape[0] * train_feats.shape[1] + len(val_feats)
    log.info("fast path: %s features of %d view(s) x %d train images + %d val images in %.1f s (%.0f img/s)",
             engine_name, train_feats.shape[1], len(train_feats), len(val_feats), t_feats, n_rows / t_feats)
    load_head(head, fit)
    if graph is not None:  # the fitted model's ONNX graph without a second export (checked at export)
        s.onnx_graph = export.with_linear_head(graph, fit.weight.numpy(), fit.bias.numpy())
    if fit.alpha is not None:
        prior_text = f"source-head prior of {prior[0].shape[0]} classes, weight {fit.alpha:.3g}"
    else:
        prior_text = ("no source-head prior (cross-validation found it did not help)" if fit.prior_offered
                      else "no source-head prior")
    log.info("fast path: head fitted in %.1f s (%s, penalty %g chosen by %s)", t_head, prior_text, fit.lam,
             f"{fit.folds}-fold cross-validation on train"
             + (", every class weighing alike" if s.balance.cv_weights == "balanced" else "") if fit.folds
             else "default (too few images to cross-validate)")

    def logits_of(feats):
        with torch.no_grad():
            return (torch.from_numpy(feats) @ fit.weight.T + fit.bias).numpy()

    train_metrics = task.metrics(logits_of(train_feats.reshape(-1, train_feats.shape[2])),
                                 np.repeat(y, train_feats.shape[1], axis=0), s.classes)
    val = task.metrics(logits_of(val_feats[:, 0]), y_val, s.classes)
    seconds = time.perf_counter() - t_start
    rundir.append_metrics(s.run_dir, {"epoch": 1, "input_size": s.preprocess.input_size, "lr": "",
                                      "train_loss": train_metrics.loss,
                                      "train_accuracy": train_metrics.accuracy, **task.epoch_columns(val),
                                      "epoch_seconds": seconds,
                                      "images_per_second": n_rows / t_feats})
    rundir.save_weights(s.run_dir / rundir.WEIGHTS, s.model.net.state_dict(), s.meta)
    rundir.write_json(s.run_dir / rundir.FEATURES, {
        "engine": engine_name, "views": int(train_feats.shape[1]), "n_train": int(len(train_feats)),
        "n_val": int(len(val_feats)), "feature_dim": int(train_feats.shape[2]), "readout": list(taps),
        "processes": s.world,
        "near_copy_share": None if share is None else round(share, 4),
        "prior_classes": int(prior[0].shape[0]) if prior is not None else None,
        "prior_used": fit.alpha is not None, "prior_weight": fit.alpha, "penalty": fit.lam, "cv_folds": fit.folds,
        "cv_selection": s.balance.selection_metric, "cv": fit.cv,
        "feature_seconds": round(t_feats, 2), "head_seconds": round(t_head, 2), "seconds": round(seconds, 2)})
    log.info("fast path: val %s (loss %.4f), %.1f s in all", task.describe(val), val.loss, seconds)
    return Fit(val.accuracy, 1, 1, strategy="features")
