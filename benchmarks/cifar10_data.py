"""CIFAR-10 as JPEG files for the benchmarks: the shared archive extracted once, and subsets of it as
path,label,split CSVs (stdlib only, so the reference trainer and imgcls's benchmark share it without
importing each other)."""

from __future__ import annotations

import csv
import random
import tarfile
from pathlib import Path

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def ensure_data(root: Path, archive: Path = ARCHIVE) -> Path:
    if not (root / "cifar10" / "train").exists():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    return root / "cifar10"


def subset_csv(data: Path, n_train: int, n_test: int, out: Path, seed: int = 0, test_as: str = "test") -> Path:
    """A CSV with a split column: n_train train images (stratified), n_test test images (in split ``test_as``)."""
    rng = random.Random(seed)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        classes = sorted(p.name for p in (data / split).iterdir())
        for c in classes:
            files = sorted((data / split / c).glob("*.jpg"))
            rng.shuffle(files)
            rows += [(str(f), c, test_as if split == "test" else split) for f in files[: n // len(classes)]]
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return out
