"""Training on 1 vs 2 processes on this machine's CPUs (gloo): the time of an epoch and of the whole run.

    python benchmarks/ddp.py                          # 600 images of 64 px, resnet18, 3 epochs, 1 and 2 processes
    python benchmarks/ddp.py --images 300 --model cifarnet --size 32 --epochs 2 --nproc 1 2 4

The same command, `imgcls train DATA --out RUN ... --nproc N`, runs for each N on a generated class tree.
Printed per N: the wall time of the command (start-up of the processes, data preparation, training,
export and final metrics), `train_seconds` from summary.json, the mean time of an epoch after the first
(metrics.csv's epoch_seconds: training + validation, without start-up) and the images per second of the
training steps, over every process.  On CPUs the processes share the cores (each takes cores / N
threads), so N processes buy speed only where one process leaves cores idle; on GPUs each process has
its own GPU.  --batch-size is the global batch, so the runs take the same steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from imagezoo import make_class_tree  # noqa: E402


def run(data: Path, out: Path, args, nproc: int) -> dict:
    command = [sys.executable, "-m", "imgcls.cli", "-q", "train", str(data), "--out", str(out), "--model", args.model,
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--int8", "off",
               "--no-calibrate", "--nproc", str(nproc)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)  # its summary line: the table says it
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    later = rows[1:] or rows
    return {"nproc": nproc, "wall_s": wall, "train_s": summary["train_seconds"],
            "epoch_s": sum(float(r["epoch_seconds"]) for r in later) / len(later),
            "img_s": sum(float(r["images_per_second"]) for r in later) / len(later),
            "val_accuracy": summary["best_val_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="images in all (three classes)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        per_class = args.images // 3
        make_class_tree(data, {"cat": per_class, "dog": per_class, "fox": per_class}, size=(args.size, args.size),
                        seed=0)
        print(f"{args.images} images of {args.size} px, {args.model}, {args.epochs} epochs, batch {args.batch_size},"
              f" {os.cpu_count()} CPUs")
        print(f"{'nproc':>5} {'wall s':>8} {'train s':>8} {'epoch s':>8} {'img/s':>8} {'val acc':>8}")
        for n in args.nproc:
            r = run(data, Path(tmp) / f"run{n}", args, n)
            print(f"{r['nproc']:>5} {r['wall_s']:>8.1f} {r['train_s']:>8.1f} {r['epoch_s']:>8.2f} {r['img_s']:>8.0f}"
                  f" {r['val_accuracy']:>8.3f}")


if __name__ == "__main__":
    main()
