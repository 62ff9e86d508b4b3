"""Transfer-learning strategies (issue #4): which way to fit a pretrained model,
and the CPU fast path that fits only the head on frozen features.

Strategies (``TrainConfig.strategy``)

``features``
    The backbone stays as loaded.  Its pooled features (the input of the
    classifier head, found with :func:`~imgcls.models.weights.classifier_head`
    and swapped for ``nn.Identity``) are computed once for ``views`` crops of
    every training image (view 0 = the eval center crop, the others drawn with
    the training augmentation ``train_set.transform``) and for the val images,
    with ONNX Runtime on a CPU (the extractor is exported uint8-in with
    :func:`imgcls.export.export_onnx`; PyTorch eager if that fails, and on a
    GPU).  Then the head's ``nn.Linear`` is fitted full-batch (L-BFGS) and
    copied into the model, so the saved model is the ordinary full network and
    predicts exactly what the fast path measured.
``finetune``
    The epoch loop, :func:`imgcls.training.fit_epochs` (full fine-tuning,
    ``--freeze backbone``, two-phase with ``head_epochs`` / ``backbone_lr_mult``).
``auto`` (default)
    ``features`` when starting from pretrained weights or ``--weights`` on a
    CPU, unless fine-tuning options were asked for; ``finetune`` otherwise.

Why on a CPU: on the reference 2-core machine EfficientNet-Lite0 at 224 px
runs 13.6 img/s forward in PyTorch eager (training is ~3x slower still) and
138 img/s in ONNX Runtime, so 8 views of every training image cost less than
a fifth of one fine-tuning epoch, and the head fits in seconds.  On a GPU an
epoch is cheap and fine-tuning the backbone is the better use of it.

The head: the source weights' own classifier as a prior
    A plain linear probe on frozen Lite0 features reaches ~94-95% on ants vs
    bees whatever the views or the penalty (benchmarks/transfer.py); the
    features are not the limit, the 245 training images are: the head picks up
    backgrounds (flowers = bee).  The ImageNet head already separates ants
    from bees (97% zero-shot with its "ant" and "bee" logits).  So the new
    head starts from the source classifier, generically, without class names:

    * ``z = W_src f + b_src`` are the source logits (ImageNet: 1000);
    * ``A[c] = mean softmax(z)`` over the center crops of class ``c``'s training
      images: which source classes class ``c`` looks like (ants -> "ant" 0.66,
      bees -> "bee" 0.70);
    * ``logits = a * (A z) + V f + c`` with the residual ``V`` L2-penalized
      (``lam * E|f|^2 * |V|^2``, invariant to the feature scale); ``a`` and the
      bias are free.  All of it is linear in ``f``: it folds into one
      ``nn.Linear`` (weight ``a A W_src + V``, bias ``a A b_src + c``).

    ``lam`` is chosen by stratified K-fold cross-validation on the training
    images (all views of an image in the same fold, held-out loss on center
    views) with the one-standard-error rule (the strongest penalty whose loss
    is within one standard error of the best), never on val.  With an
    uninformative prior the CV picks a small ``lam`` and this is an ordinary
    L2 logistic regression; without a source head (weights without one, or
    another class count than guessed) it is exactly that.

Measured on ants vs bees (benchmarks/transfer.py, Lite0, 8 views): 97.4% val
(149/153) with the prior for seeds 0, 1 and 2, 94.1% without it; the whole
``imgcls train`` in 88-93 s wall on 2 cores shared with other jobs (load
3.5).  Partial fine-tuning of the last layers on cached feature maps (Lite0's
conv_head + bn + classifier on the 7x7x320 maps of 8-16 views, AdamW, 10
epochs) was tried without the prior and did not beat the plain probe
(93.5-94.8%), so it is not used.

Defaults by strategy live in :data:`PRETRAINED_DEFAULTS`, applied by
:func:`apply_recipe_defaults` to the options a caller did *not* set.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import rundir
from .errors import UserError
from .metrics import compute_metrics
from .models.weights import classifier_head, head_prefix

log = logging.getLogger("imgcls")

STRATEGIES = ("auto", "features", "finetune")
FEATURES_FILE = "features.json"

# Options filled in when starting from pretrained weights (or --weights) and the caller
# has not set them, keyed by the strategy that will run.  TrainConfig's own defaults
# (views=8, AdamW lr 1e-3) already suit the features path.
PRETRAINED_DEFAULTS: dict[str, dict] = {
    "features": {},
    "finetune": {"head_epochs": 1, "backbone_lr_mult": 0.1, "epochs": 10},
}

# relative L2 strengths of the residual head weights, strongest first (see module docstring)
LAMBDAS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
FALLBACK_LAMBDA = 1e-2      # when a class has too few images for cross-validation
CV_FOLDS = 5
MAX_FEATURE_ROWS = 40_000   # views are capped so that images x views stays below this
LBFGS_ITERATIONS = 150
BATCH = 32


# =========================================================================== strategy


def resolve_strategy(strategy: str, *, pretrained: bool, weights: str | None, device_type: str,
                     resume: bool = False, freeze: str | None = None, head_epochs: int = 0,
                     backbone_lr_mult: float = 1.0) -> tuple[str, str]:
    """``(features | finetune, reason)`` for a configuration; ``auto`` decided here."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if strategy == "features":
        if not (pretrained or weights):
            raise UserError("--strategy features fits a head on pretrained features: give --pretrained or --weights")
        if resume:
            raise UserError("a features run has no epochs to resume; start it again (it takes seconds to minutes)")
        return "features", "asked for"
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
    return "features", ("pretrained weights on a CPU: features of all views in ONNX Runtime cost less than one"
                        " eager fine-tuning epoch (~10x its throughput), and the head fits in seconds"
                        + ("; --freeze backbone asks for the head only anyway" if freeze == "backbone" else ""))


def apply_recipe_defaults(options: dict) -> dict:
    """``options`` (TrainConfig fields a caller set) + :data:`PRETRAINED_DEFAULTS` for the
    strategy that will run, for the fields not set.  Without pretrained weights: unchanged."""
    from .training import TrainConfig, resolve_device

    if not (options.get("pretrained") or options.get("weights")):
        return dict(options)
    base = {f: getattr(TrainConfig, f) for f in ("strategy", "head_epochs", "backbone_lr_mult", "freeze")}
    merged = {**base, **{k: v for k, v in options.items() if k in base}}
    name, _ = resolve_strategy(merged["strategy"], pretrained=bool(options.get("pretrained")),
                               weights=options.get("weights"),
                               device_type=resolve_device(options.get("device", "auto")).type,
                               freeze=merged["freeze"], head_epochs=merged["head_epochs"],
                               backbone_lr_mult=merged["backbone_lr_mult"])
    return {**PRETRAINED_DEFAULTS[name], **options}


def choose_strategy(session, resume: bool = False) -> str:
    """The strategy this session runs (logged with the reason)."""
    cfg = session.cfg
    if cfg.views < 1:
        raise UserError(f"--views must be at least 1 (the center crop), not {cfg.views}")
    name, reason = resolve_strategy(cfg.strategy, pretrained=cfg.pretrained, weights=cfg.weights,
                                    device_type=session.device.type, resume=resume, freeze=cfg.freeze,
                                    head_epochs=cfg.head_epochs, backbone_lr_mult=cfg.backbone_lr_mult)
    log.info("strategy %s%s: %s", name, " (auto)" if cfg.strategy == "auto" else "", reason)
    return name


# =========================================================================== features


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


def _feature_engine(session, extractor, sample: np.ndarray):
    """(engine, name): ONNX Runtime on a CPU, PyTorch eager otherwise or if export fails."""
    from .engines import OnnxEngine, TorchEngine
    from .export import export_onnx
    from .models.classifier import Classifier

    module = Classifier(extractor, session.preprocess).eval()
    if session.device.type == "cpu":
        t0 = time.perf_counter()
        try:
            dim = classifier_head(session.model.net).in_features
            with tempfile.TemporaryDirectory() as tmp:
                path = export_onnx(module, [f"f{i}" for i in range(dim)], Path(tmp) / "features.onnx",
                                   f"{session.cfg.model}-features", sample=sample)
                data = path.read_bytes()
            engine = OnnxEngine(data)
            log.info("fast path: feature extractor exported to ONNX in %.1f s", time.perf_counter() - t0)
            return engine, f"onnxruntime ({engine.threads} threads)"
        except Exception as err:  # noqa: BLE001 - any export problem: eager is slower but right
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            log.warning("fast path: ONNX export of the feature extractor failed (%s); using PyTorch eager"
                        " (several times slower on a CPU)", first)
    engine = TorchEngine(module, device=str(session.device), amp=None)
    return engine, f"torch eager ({session.device})"


def _base_image(dataset, index: int) -> np.ndarray:
    from .data.dataset import base_image

    if dataset.cache is not None:
        return dataset.cache[index]
    return base_image(dataset.records[index].path, dataset.spec, dataset.augment)


def _views_of(dataset, index: int, views: int) -> list[np.ndarray]:
    """View 0: the eval center crop; then views-1 crops from the training augmentation."""
    from torchvision.transforms.v2 import functional as TF

    base = torch.from_numpy(_base_image(dataset, index))
    size = dataset.spec.input_size
    center = base if dataset.transform is None else TF.center_crop(base, [size, size])
    out = [np.ascontiguousarray(center.numpy())]
    for _ in range(views - 1):
        out.append(np.ascontiguousarray(dataset.transform(base).numpy()))
    return out


def compute_features(engine, dataset, views: int, seed: int = 0, progress: bool = False,
                     desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Features ``(n, views, D)`` float32 of every image of ``dataset`` and its targets ``(n,)``.

    Views are drawn in one background thread while the engine runs the previous batch.
    An image that cannot be read any more (it passed the scan) is left out."""
    from tqdm.auto import tqdm

    from .data.decode import ImageError

    views = views if dataset.transform is not None else 1
    per_batch = max(1, BATCH // views)
    chunks = [range(i, min(i + per_batch, len(dataset))) for i in range(0, len(dataset), per_batch)]
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)

    def prepare(chunk):
        crops, kept = [], []
        for i in chunk:
            try:
                crops += _views_of(dataset, i, views)
                kept.append(i)
            except ImageError as err:
                log.warning("fast path: skipping %s: %s", dataset.records[i].path, err)
        return (np.stack(crops) if crops else None), kept

    feats, targets = [], []
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(prepare, chunks[0]) if chunks else None
            for k in tqdm(range(len(chunks)), desc=desc, disable=not progress, unit="batch", leave=False):
                batch, kept = pending.result()
                pending = pool.submit(prepare, chunks[k + 1]) if k + 1 < len(chunks) else None
                if batch is None:
                    continue
                out = np.asarray(engine(batch), dtype=np.float32)
                feats.append(out.reshape(len(kept), views, -1))
                targets += [dataset.targets[i] for i in kept]
    finally:
        torch.set_rng_state(generator_state)
    if not feats:
        return np.zeros((0, views, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(feats), np.asarray(targets, dtype=np.int64)


def source_head(session) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The classifier of the weights the run started from, as ``(weight (M, D), bias (M,))``.

    The session's net holds it when the class count matched; otherwise the
    architecture is built once more with the weights' class count (an imgcls
    run's label count, else 1000 for ImageNet) and loaded again."""
    from .models.pretrained import load_pretrained
    from .models.registry import create_model, model_spec
    from .models.weights import load_weights_file

    report = session.weights_report
    if report is None:
        return None
    cfg = session.cfg
    if not report.head_replaced:
        head = classifier_head(session.model.net)
        return head.weight.detach().float().cpu().clone(), head.bias.detach().float().cpu().clone()
    counts = []
    meta = rundir.weights_meta(cfg.weights) if cfg.weights else None
    if meta is not None:
        counts.append(len(meta["labels"]))
    counts.append(1000)
    for count in dict.fromkeys(counts):
        if count == len(session.classes):
            continue  # that would have matched the session's own head
        try:
            net = create_model(cfg.model, count, session.preprocess.input_size, cfg.norm, cfg.se)
            if cfg.pretrained:
                loaded = load_pretrained(cfg.model, net, model_spec(cfg.model).pretrained)
            else:
                loaded = load_weights_file(cfg.weights, net, model_name=cfg.model)
        except UserError:
            continue
        if not loaded.head_replaced:
            head = classifier_head(net)
            if isinstance(head, nn.Linear) and head.bias is not None:
                return head.weight.detach().float().clone(), head.bias.detach().float().clone()
    return None


# =========================================================================== the head


@dataclass
class HeadFit:
    """A fitted linear head and how it was chosen."""

    weight: torch.Tensor          # (K, D)
    bias: torch.Tensor            # (K,)
    lam: float
    alpha: float | None           # weight of the source-head prior (None: no prior)
    folds: int
    cv: list[dict] = field(default_factory=list)  # per lambda: held-out loss, its standard error, accuracy


def _prior_map(X: torch.Tensor, Y: torch.Tensor, K: int, Wp: torch.Tensor, bp: torch.Tensor):
    """``A Wp, A bp`` with ``A[c]`` = mean source-class probabilities of class ``c``'s rows."""
    probs = torch.cat([torch.softmax(X[i:i + 4096] @ Wp.T + bp, 1) for i in range(0, len(X), 4096)])
    overall = probs.mean(0)
    A = torch.stack([probs[Y == c].mean(0) if bool((Y == c).any()) else overall for c in range(K)])
    return A @ Wp, A @ bp


class _Solver:
    """L-BFGS on ``CE(a P + X V^T + c) + lam E|x|^2 |V|^2``, warm-started across calls."""

    def __init__(self, X, Y, K, prior_map, weight=None):
        self.X, self.Y, self.weight = X, Y, weight
        self.scale = float((X * X).sum(1).mean()) or 1.0
        D = X.shape[1]
        self.V = torch.zeros(K, D, requires_grad=True)
        self.c = torch.zeros(K, requires_grad=True)
        # one prior weight for all classes: per-class weights had a higher cross-validated loss on
        # the ants/bees training set (0.057-0.065 vs 0.052-0.053)
        self.a = torch.ones(1, requires_grad=True)
        if prior_map is not None:
            self.Wa, self.ba = Wa, ba = prior_map
            with torch.no_grad():
                self.P = X @ Wa.T + ba
        else:
            self.Wa = self.ba = self.P = None

    def params(self):
        return [self.V, self.c] + ([self.a] if self.P is not None else [])

    def logits(self, X, P=None):
        out = X @ self.V.T + self.c
        if self.Wa is not None:
            out = out + self.a * (X @ self.Wa.T + self.ba if P is None else P)
        return out

    def fit(self, lam: float) -> float:
        opt = torch.optim.LBFGS(self.params(), lr=1, max_iter=LBFGS_ITERATIONS, history_size=10,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-10)
        penalty = lam * self.scale

        def closure():
            opt.zero_grad()
            loss = (F.cross_entropy(self.logits(self.X, self.P), self.Y, weight=self.weight)
                    + penalty * (self.V * self.V).sum())
            loss.backward()
            return loss

        return float(opt.step(closure).detach())

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        with torch.no_grad():
            if self.Wa is None:
                return self.V.detach().clone(), self.c.detach().clone(), None
            a = float(self.a)
            return self.V + a * self.Wa, self.c + a * self.ba, a


def _folds(y: np.ndarray, K: int, seed: int) -> tuple[np.ndarray, int]:
    counts = np.bincount(y, minlength=K)
    k = int(min(CV_FOLDS, counts.min()))
    if k < 2:
        return np.zeros(len(y), int), 0
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), int)
    for c in range(K):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + rng.integers(k)) % k
    return fold, k


def _rows(feats: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    f = feats[mask]
    return torch.from_numpy(f.reshape(-1, f.shape[-1])), torch.from_numpy(np.repeat(y[mask], f.shape[1]))


def _solver(feats: np.ndarray, y: np.ndarray, mask: np.ndarray, K: int, prior, weight=None) -> _Solver:
    """A solver on all views of the ``mask`` images; the prior's class map from their center views
    (what the class looks like at prediction time: a random crop may miss the object; this had the
    lower cross-validated loss on the ants/bees training set in all 6 view draws tried)."""
    X, Y = _rows(feats, y, mask)
    prior_map = None
    if prior is not None:
        prior_map = _prior_map(torch.from_numpy(feats[mask, 0]), torch.from_numpy(y[mask]), K, *prior)
    return _Solver(X, Y, K, prior_map, weight)


def fit_head(feats: np.ndarray, y: np.ndarray, K: int, prior=None, seed: int = 0,
             lambdas=LAMBDAS, weight: torch.Tensor | None = None) -> HeadFit:
    """Fit the linear head on ``feats`` (n, views, D; view 0 = center crop) and targets ``y``.

    ``prior``: the source classifier ``(W (M, D), b (M,))`` or None.  The
    penalty is chosen by cross-validation on the images (module docstring).
    ``weight``: per-class loss weights (K,), used in the fit and in the
    cross-validated loss alike."""
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    # each image's weight in the cross-validated loss, scaled to average 1
    sample_weight = np.ones(len(y)) if weight is None else weight.numpy()[y].astype(np.float64)
    sample_weight = sample_weight / sample_weight.mean()
    fold, k = _folds(y, K, seed)
    cv = []
    if k:
        losses = np.zeros((len(lambdas), len(y)))
        correct = np.zeros((len(lambdas), len(y)))
        for f in range(k):
            solver = _solver(feats, y, fold != f, K, prior, weight)
            Xt = torch.from_numpy(feats[fold == f, 0])
            Yt = torch.from_numpy(y[fold == f])
            for j, lam in enumerate(lambdas):
                solver.fit(lam)
                with torch.no_grad():
                    out = solver.logits(Xt)
                    losses[j, fold == f] = (F.cross_entropy(out, Yt, reduction="none").numpy()
                                            * sample_weight[fold == f])
                    correct[j, fold == f] = (out.argmax(1) == Yt).numpy()
        mean = losses.mean(1)
        se = losses.std(1, ddof=1) / math.sqrt(len(y))
        best = int(np.argmin(mean))
        chosen = next(j for j in range(len(lambdas)) if mean[j] <= mean[best] + se[best])  # one-SE rule
        cv = [{"lambda": lam, "loss": round(float(mean[j]), 5), "se": round(float(se[j]), 5),
               "accuracy": round(float(correct[j].mean()), 4)} for j, lam in enumerate(lambdas)]
    else:
        chosen = min(range(len(lambdas)), key=lambda j: abs(math.log(lambdas[j] / FALLBACK_LAMBDA)))
    solver = _solver(feats, y, np.ones(len(y), bool), K, prior, weight)
    for lam in lambdas[:chosen + 1]:  # down the path to the chosen penalty, warm-started
        solver.fit(lam)
    weight, bias, alpha = solver.folded()
    return HeadFit(weight, bias, lambdas[chosen], alpha, k, cv)


# =========================================================================== the strategy


def fit_features(session, progress: bool = True):
    """The ``features`` strategy: fit the head on frozen features of ``views`` crops per
    training image; the head goes back into ``session.model``, which is saved."""
    from .training import Fit, append_metrics, class_weights, fit_epochs

    t_start = time.perf_counter()
    s, cfg = session, session.cfg
    net = s.model.net
    extractor, head = feature_extractor(net)
    sample_n = min(4, len(s.val_set))
    sample = np.stack([s.val_set[i][0].numpy() for i in range(sample_n)])
    problem = linear_readout_problem(net, extractor.to(s.device), head,
                                     s.model.normalize(torch.from_numpy(sample[:2]).to(s.device)))
    if problem is not None:
        if cfg.strategy == "features":
            raise UserError(f"--strategy features cannot be used with {cfg.model}: {problem}; use --strategy finetune")
        log.info("strategy finetune instead of features: %s", problem)
        return fit_epochs(s, False, progress)

    engine, engine_name = _feature_engine(s, extractor, sample)
    views = cfg.views if s.train_set.transform is not None else 1
    views = max(1, min(views, MAX_FEATURE_ROWS // max(1, len(s.train_set))))
    if views < cfg.views and s.train_set.transform is not None:
        log.info("fast path: %d views per image (not %d): %d images give enough rows", views, cfg.views,
                 len(s.train_set))
    threads = torch.get_num_threads()
    try:
        # the crops and the head's small matrix products run best on one thread: with two, a core
        # busy elsewhere (here: ONNX Runtime) makes them 10-50x slower
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        train_feats, y = compute_features(engine, s.train_set, views, cfg.seed, progress, "train features")
        val_feats, y_val = compute_features(engine, s.val_set, 1, cfg.seed, progress, "val features")
        t_feats = time.perf_counter() - t0
        t0 = time.perf_counter()
        prior = source_head(s)
        if prior is not None and prior[0].shape[1] != train_feats.shape[2]:
            prior = None
        weight = class_weights(y, len(s.classes), cfg.class_weights)
        fit = fit_head(train_feats, y, len(s.classes), prior, cfg.seed, weight=weight)
        t_head = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    n_rows = train_feats.shape[0] * train_feats.shape[1] + len(val_feats)
    log.info("fast path: %s features of %d view(s) x %d train images + %d val images in %.1f s (%.0f img/s)",
             engine_name, train_feats.shape[1], len(train_feats), len(val_feats), t_feats, n_rows / t_feats)
    with torch.no_grad():
        head.weight.copy_(fit.weight.to(head.weight))
        head.bias.copy_(fit.bias.to(head.bias))
    log.info("fast path: head fitted in %.1f s (%s, penalty %g chosen by %s)", t_head,
             f"source-head prior of {prior[0].shape[0]} classes, weight {fit.alpha:.3g}" if prior is not None
             else "no source-head prior", fit.lam,
             f"{fit.folds}-fold cross-validation on train" if fit.folds
             else "default (too few images to cross-validate)")

    def logits_of(feats):
        with torch.no_grad():
            return (torch.from_numpy(feats) @ fit.weight.T + fit.bias).numpy()

    train_metrics = compute_metrics(logits_of(train_feats.reshape(-1, train_feats.shape[2])),
                                    np.repeat(y, train_feats.shape[1]), s.classes)
    val = compute_metrics(logits_of(val_feats[:, 0]), y_val, s.classes)
    seconds = time.perf_counter() - t_start
    append_metrics(s.run_dir, {"epoch": 1, "lr": "", "train_loss": train_metrics.loss,
                               "train_accuracy": train_metrics.accuracy, "val_loss": val.loss,
                               "val_accuracy": val.accuracy, "epoch_seconds": seconds,
                               "images_per_second": n_rows / t_feats})
    s.save_best()
    rundir.write_json(s.run_dir / FEATURES_FILE, {
        "engine": engine_name, "views": int(train_feats.shape[1]), "n_train": int(len(train_feats)),
        "n_val": int(len(val_feats)), "feature_dim": int(train_feats.shape[2]),
        "prior_classes": int(prior[0].shape[0]) if prior is not None else None,
        "prior_weight": fit.alpha, "penalty": fit.lam, "cv_folds": fit.folds, "cv": fit.cv,
        "feature_seconds": round(t_feats, 2), "head_seconds": round(t_head, 2), "seconds": round(seconds, 2)})
    log.info("fast path: val accuracy %.4f (loss %.4f), %.1f s in all", val.accuracy, val.loss, seconds)
    return Fit(val.accuracy, 1, 1, strategy="features")
