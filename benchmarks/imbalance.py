"""Imbalanced classes: `--balance none` vs `weights` vs `sampler` on a long-tailed CIFAR-10 (not a test).

    python benchmarks/imbalance.py                          # 5 common classes x 2000, 5 rare x 100
    python benchmarks/imbalance.py --rare 50 --epochs 8 --seeds 0 1 --balance weights sampler

Training set: CIFAR-10's first five classes (airplane .. deer) with ``--common``
training images each, the other five (dog .. truck) with ``--rare`` each, the
way camera-trap data look (a few species, or "empty", dominate).  Validation
is a stratified 20 % of that (as imgcls would split it); the test split is CIFAR-10's
balanced test set (1,000 per class), so test accuracy counts every class alike.
The small CIFAR CNN trains from scratch, once per ``--balance`` value and
seed, everything else equal (``--select-by auto``: balanced accuracy picks the
epoch in every row).  Reported: test accuracy, test balanced accuracy, mean
recall of the common and of the rare classes.

Data: ../shared/data/cifar10-jpeg.tar.gz, extracted to /tmp/data (as benchmarks/cifar10.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10_data import ensure_data  # noqa: E402

import imgcls  # noqa: E402


def long_tail_csv(data: Path, common: int, rare: int, out: Path, seed: int = 0) -> tuple[Path, list[str]]:
    rng = random.Random(seed)
    classes = sorted(p.name for p in (data / "train").iterdir())
    rows = []
    for i, c in enumerate(classes):
        files = sorted((data / "train" / c).glob("*.jpg"))
        rng.shuffle(files)
        chosen = files[: common if i < 5 else rare]
        n_val = len(chosen) // 5  # the stratified 20 % validation split imgcls would make
        rows += [(str(f), c, "val" if k < n_val else "train") for k, f in enumerate(chosen)]
        rows += [(str(f), c, "test") for f in sorted((data / "test" / c).glob("*.jpg"))]
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return out, classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/data"))
    parser.add_argument("--common", type=int, default=2000)
    parser.add_argument("--rare", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--balance", nargs="+", default=["none", "weights", "sampler"],
                        choices=["none", "weights", "sampler"])
    args = parser.parse_args()
    data = ensure_data(args.data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="imgcls-imbalance-") as tmp:
        table, classes = long_tail_csv(data, args.common, args.rare, Path(tmp) / "long-tail.csv")
        for seed in args.seeds:
            for mode in args.balance:
                result = imgcls.train(table, Path(tmp) / f"{mode}-{seed}", model="cifarnet", epochs=args.epochs,
                                      balance=mode, seed=seed, export_onnx=False, progress=False)
                test = json.loads((result.run_dir / "test.json").read_text())
                recall = {row["label"]: row["recall"] for row in test["per_class"]}
                row = {"balance": mode, "seed": seed, "test_accuracy": test["accuracy"],
                       "balanced_accuracy": test["balanced_accuracy"],
                       "common_recall": statistics.mean(recall[c] for c in classes[:5]),
                       "rare_recall": statistics.mean(recall[c] for c in classes[5:]),
                       "train_seconds": result.summary["train_seconds"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nlong tail: {args.common} train images for each of {', '.join(classes[:5])};"
          f" {args.rare} for each of {', '.join(classes[5:])}; cifarnet, {args.epochs} epochs;"
          " test: CIFAR-10's balanced test set")
    print(f"{'balance':14} {'seed':>4} {'test acc':>8} {'bal. acc':>8} {'common recall':>13}"
          f" {'rare recall':>11} {'train s':>7}")
    for r in rows:
        print(f"{r['balance']:14} {r['seed']:>4} {r['test_accuracy']:>8.4f} {r['balanced_accuracy']:>8.4f}"
              f" {r['common_recall']:>13.4f} {r['rare_recall']:>11.4f} {r['train_seconds']:>7.0f}")


if __name__ == "__main__":
    main()
