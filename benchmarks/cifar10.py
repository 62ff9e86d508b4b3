"""CIFAR-10 from JPEG folders: imgcls training vs. a plain hand-written PyTorch loop.

For each model (the small CIFAR CNN and ResNet-18 with its 32 px stem) it
trains with ``imgcls.train`` and reports test accuracy and training
throughput, then trains the same model on the same images with the same batch
size, augmentation and optimizer in the plain loop everybody writes first
(Dataset opening JPEGs with PIL, torchvision transforms, DataLoader with 2
workers) and prints the throughput ratio imgcls / plain.  Both train at 32 px
(what imgcls picks for CIFAR's images by itself).  imgcls's images/s is its
epoch's training loop as metrics.csv records it: the one-time decode of the
dataset into RAM happens before the first epoch and is not in it (the wall
column has everything); the plain loop decodes in its workers every epoch.

Usage::

    python benchmarks/cifar10.py                      # both models, defaults below
    python benchmarks/cifar10.py --models cifarnet --epochs 5 --train-images 50000

Data: ../shared/data/cifar10-jpeg.tar.gz, extracted to /tmp/data (done here if missing).
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

import imgcls
from imgcls import rundir
from imgcls.models.registry import create_model

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
AUGMENT = {"crop_scale": (0.35, 1.0), "crop_ratio": (3 / 4, 4 / 3), "hflip": True, "color_jitter": 0.0,
           "enabled": True}


def ensure_data(root: Path) -> Path:
    if not (root / "cifar10" / "train").exists():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(root, filter="data")
    return root / "cifar10"


def subset_csv(data: Path, n_train: int, n_test: int, out: Path, seed: int = 0) -> Path:
    """A CSV with a split column: n_train train images (stratified), n_test test images."""
    rng = random.Random(seed)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        classes = sorted(p.name for p in (data / split).iterdir())
        for c in classes:
            files = sorted((data / split / c).glob("*.jpg"))
            rng.shuffle(files)
            rows += [(str(f), c, split) for f in files[: n // len(classes)]]
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return out


class PlainDataset(torch.utils.data.Dataset):
    def __init__(self, rows, classes, transform):
        self.rows = rows
        self.index = {c: i for i, c in enumerate(classes)}
        self.transform = transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        path, label = self.rows[i]
        return self.transform(Image.open(path).convert("RGB")), self.index[label]


def plain_loop(csv_path: Path, model_name: str, epochs: int, batch_size: int, lr: float, mean, std) -> dict:
    # what a user writes first: PIL decode + torchvision transforms in 2 DataLoader workers
    """The hand-written baseline: same model, data, batch size, augmentation and optimizer."""
    rows = [r for r in csv.DictReader(csv_path.open()) if r["split"] == "train"]
    classes = sorted({r["label"] for r in rows})
    # the images imgcls trained on: its 80 % train split (imgcls holds 20 % out for validation)
    n_train = int(len(rows) * 0.8)
    random.Random(0).shuffle(rows)
    rows = [(r["path"], r["label"]) for r in rows[:n_train]]
    transform = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(32, scale=AUGMENT["crop_scale"], antialias=True),
                            v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(PlainDataset(rows, classes, transform), batch_size=batch_size, shuffle=True,
                                         num_workers=2, drop_last=True)
    model = create_model(model_name, len(classes), 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
    seconds = time.perf_counter() - start
    return {"images_per_second": seen / seconds, "seconds": seconds}


def imgcls_epoch(csv_path: Path, model_name: str, epochs: int, batch_size: int, lr: float, out: Path):
    t0 = time.perf_counter()
    # input_size=32 is what imgcls picks for CIFAR's 32 px images anyway; stated so both loops surely match
    result = imgcls.train(csv_path, out, model=model_name, epochs=epochs, batch_size=batch_size, optimizer="sgd",
                          lr=lr, warmup_epochs=0.5, label_smoothing=0.0, augment=AUGMENT, input_size=32,
                          progress=False)
    metrics = list(csv.DictReader((result.run_dir / "metrics.csv").open()))
    ips = sum(float(m["images_per_second"]) for m in metrics) / len(metrics)
    return result, ips, time.perf_counter() - t0


def run(model_name: str, data: Path, n_train: int, n_test: int, epochs: int, n_speed: int, rounds: int,
        batch_size: int, lr: float, work: Path) -> dict:
    """Accuracy from one imgcls run; the throughput ratio from alternating 1-epoch
    runs of both loops (A B A B ...), so load from other processes hits both alike."""
    csv_path = subset_csv(data, n_train, n_test, work / f"{model_name}.csv")
    result, ips, wall = imgcls_epoch(csv_path, model_name, epochs, batch_size, lr, work / f"run-{model_name}")
    mean, std = (rundir.read_json(result.run_dir / "preprocess.json")[k] for k in ("mean", "std"))
    speed_csv = subset_csv(data, n_speed, 100, work / f"{model_name}-speed.csv")
    ratios, ours, plains = [], [], []
    for r in range(rounds):
        _, ours_ips, _ = imgcls_epoch(speed_csv, model_name, 1, batch_size, lr, work / f"speed-{model_name}-{r}")
        plain_ips = plain_loop(speed_csv, model_name, 1, batch_size, lr, mean, std)["images_per_second"]
        ours.append(ours_ips)
        plains.append(plain_ips)
        ratios.append(ours_ips / plain_ips)
    return {"model": model_name, "train_images": result.summary["n_train"], "epochs": epochs,
            "test_accuracy": result.summary["test_accuracy"], "imgcls_images_per_second": ips,
            "imgcls_wall_seconds": wall, "speed_images": n_speed, "speed_rounds": rounds,
            "imgcls_speed": statistics.median(ours), "plain_speed": statistics.median(plains),
            "ratio": statistics.median(ratios), "ratios": [round(x, 3) for x in ratios]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cifarnet", "resnet18"])
    parser.add_argument("--data", type=Path, default=Path("/tmp/data"))
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 1], help="per model")
    parser.add_argument("--train-images", type=int, nargs="+", default=[50000, 10000], help="per model")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--speed-images", type=int, nargs="+", default=[10000, 1000],
                        help="per model: images of each alternating 1-epoch throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds per model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    data = ensure_data(args.data)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    with tempfile.TemporaryDirectory(prefix="imgcls-cifar-") as tmp:
        for i, name in enumerate(args.models):
            epochs = args.epochs[min(i, len(args.epochs) - 1)]
            n_train = args.train_images[min(i, len(args.train_images) - 1)]
            n_speed = args.speed_images[min(i, len(args.speed_images) - 1)]
            row = run(name, data, n_train, args.test_images, epochs, n_speed, args.rounds, args.batch_size, args.lr,
                      Path(tmp))
            rows.append(row)
            print(row, flush=True)
    print()
    print(f"{'model':10} {'train imgs':>10} {'epochs':>6} {'test acc':>8} {'img/s':>6} {'wall s':>6} |"
          f" {'imgcls img/s':>12} {'plain img/s':>11} {'ratio':>6}  (median of alternating rounds)")
    for r in rows:
        print(f"{r['model']:10} {r['train_images']:>10} {r['epochs']:>6} {r['test_accuracy']:>8.4f}"
              f" {r['imgcls_images_per_second']:>6.0f} {r['imgcls_wall_seconds']:>6.0f} |"
              f" {r['imgcls_speed']:>12.0f} {r['plain_speed']:>11.0f} {r['ratio']:>6.2f}  {r['ratios']}")


if __name__ == "__main__":
    main()
