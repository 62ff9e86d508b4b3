"""Records -> uint8 image tensors for training and evaluation.

Small datasets are decoded once into RAM (``cache``): CIFAR-10's 50,000 images
take 150 MB and every later epoch skips JPEG decoding entirely.  Larger ones
are decoded on the fly in DataLoader workers, at reduced size when the JPEG is
much larger than the model input.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from ..progress import bar as progress_bar

from .decode import ImageError, open_image
from .preprocess import Augment, Preprocess, resize_and_crop
from .records import Record
from .transforms import train_transform

log = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 2 * 1024**3


def _shorter_side_to(image: Image.Image, size: int, spec: Preprocess) -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), spec.pil_interpolation)


def base_image(path, spec: Preprocess, augment: Augment | None) -> np.ndarray:
    """Decode one file to the uint8 CHW array the dataset starts from.

    Eval (or augmentation off): the final centre crop.  Training with
    augmentation: the whole image with its shorter side at ``spec.resize_size``
    (random crops are taken from it), or squashed for ``resize="squash"``.
    """
    image = open_image(path, min_size=spec.resize_size)
    if augment is None or not augment.enabled:
        return resize_and_crop(image, spec)
    if spec.resize == "squash":
        image = image.resize((spec.resize_size, spec.resize_size), spec.pil_interpolation)
    else:
        image = _shorter_side_to(image, spec.resize_size, spec)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


@dataclass
class DecodeResult:
    arrays: list[np.ndarray | None]
    failures: list[tuple[Record, str]]


def decode_all(records: list[Record], spec: Preprocess, augment: Augment | None,
               workers: int = 2, progress: bool = False, desc: str = "decode") -> DecodeResult:
    """Decode every record once (threads: Pillow releases the GIL while decoding)."""
    def one(record):
        try:
            return base_image(record.path, spec, augment), None
        except ImageError as err:
            return None, err.reason

    arrays: list[np.ndarray | None] = []
    failures: list[tuple[Record, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(one, records, chunksize=64)
        for record, (array, reason) in progress_bar(zip(records, results), total=len(records), desc=desc,
                                            disable=not progress, unit="img", leave=False):
            arrays.append(array)
            if reason is not None:
                failures.append((record, reason))
    return DecodeResult(arrays, failures)


def estimate_cache_bytes(n_images: int, spec: Preprocess, augment: Augment | None) -> int:
    side = spec.resize_size if augment is not None and augment.enabled else spec.input_size
    aspect = 1.0 if spec.resize == "squash" or augment is None or not augment.enabled else 4 / 3
    return int(n_images * 3 * side * side * aspect)


class ImageDataset(Dataset):
    """(uint8 tensor (3, S, S), class index) pairs."""

    def __init__(self, records: list[Record], class_to_index: dict[str, int], spec: Preprocess,
                 augment: Augment | None = None, cache: list[np.ndarray] | None = None):
        self.records = records
        self.class_to_index = class_to_index
        self.targets = [class_to_index[r.label] for r in records]
        self.spec = spec
        self.augment = augment if augment is not None and augment.enabled else None
        self.transform = train_transform(spec, self.augment) if self.augment else None
        self.cache = cache

    def __len__(self) -> int:
        return len(self.records)

    def _array(self, index: int) -> np.ndarray:
        if self.cache is not None:
            return self.cache[index]
        return base_image(self.records[index].path, self.spec, self.augment)

    def __getitem__(self, index: int):
        for attempt in range(len(self.records)):
            i = (index + attempt) % len(self.records)
            try:
                array = self._array(i)
                break
            except ImageError as err:
                # the file passed the pre-flight scan but fails now (changed on disk?):
                # train on the next one rather than crash the epoch
                log.warning("skipping %s: %s", self.records[i].path, err)
        else:  # pragma: no cover - every file unreadable
            raise RuntimeError("no readable image left in the dataset")
        tensor = torch.from_numpy(array)
        if self.transform is not None:
            tensor = self.transform(tensor)
        return tensor, self.targets[i]
