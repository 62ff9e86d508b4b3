"""Per-channel mean and standard deviation of a dataset, for normalization."""

from __future__ import annotations

import numpy as np

from .dataset import ImageDataset
from .preprocess import Preprocess
from .records import Record


def compute_mean_std(images, limit: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] over (up to ``limit``, evenly spaced) uint8 CHW images."""
    idx = np.linspace(0, len(images) - 1, min(limit, len(images))).astype(int)
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for i in idx:
        x = np.asarray(images[int(i)], dtype=np.float64).reshape(3, -1) / 255.0
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-12))
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]


class Pixels:
    """Index -> uint8 CHW array of a dataset's images, without augmentation."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0].numpy()


def records_mean_std(records: list[Record], spec: Preprocess, limit: int = 2000) -> tuple[list[float], list[float]]:
    """Mean/std of labelled records' images, decoded per ``spec``."""
    index = {label: i for i, label in enumerate(sorted({r.label for r in records}))}
    return compute_mean_std(Pixels(ImageDataset(records, index, spec)), limit=limit)
