"""What the training steps hand each other: a prepared Session, a Fit, the result.

A leaf: it imports nothing of the package, so every step can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class WeightSource:
    """Where a run's initial weights come from, resolved once (``prepare.resolve_source``)."""

    kind: str                        # none | pretrained | run (an imgcls run or its model file) | file
    path: str | None = None          # the weight file (pretrained: the located file)
    meta: dict | None = None         # an imgcls run's metadata: model, labels, preprocess, build
    report: Any = None               # models.weights.LoadReport, once loaded (its source_head: the prior)


@dataclass
class Session:
    """Everything a fitting strategy needs, prepared once by :func:`imgcls.train.prepare.prepare`."""

    cfg: Any                         # TrainConfig
    run_dir: Path
    classes: list[str]
    splits: dict[str, list]          # split name -> records
    caches: dict[str, list | None]   # split name -> decoded images in RAM, or None (decoded on the fly)
    preprocess: Any                  # data.preprocess.Preprocess
    train_set: Any                   # data.dataset.ImageDataset
    val_set: Any
    model: Any                       # models.classifier.Classifier, on the training device
    device: Any                      # torch.device
    amp_dtype: Any                   # torch.dtype or None
    meta: dict                       # written into model.safetensors beside the weights
    source: WeightSource = field(default_factory=lambda: WeightSource("none"))
    balance: Any = None              # train.balance.Balance: class weighting resolved from the counts
    strategy: str = ""
    onnx_graph: Any = None           # an ONNX ModelProto of the fitted model made by the strategy (checked at export)
    rank: int = 0                    # this process among those fitting together (train.distributed); 0 writes
    world: int = 1


@dataclass
class Fit:
    """What a fitting strategy reports back."""

    best_val_accuracy: float
    best_epoch: int
    epochs: int
    stopped_early: bool = False
    interrupted: bool = False
    strategy: str = "finetune"
    signal: int | None = None        # the signal that interrupted it (SIGINT, SIGTERM)
    train_flops: int | None = None   # counted FLOPs of the training steps (train.flops), None: not counted
    eval_flops: int | None = None    # counted FLOPs of the per-epoch validation passes


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
