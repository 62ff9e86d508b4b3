"""Records -> uint8 image tensors for training and evaluation.

Small datasets are decoded once (``cache``): into the array cache on disk
(:mod:`imgcls.data.arraycache`, memory-mapped, reused by later runs), whose
batches :class:`ArrayLoader` augments on the training device, or into RAM as a
list of arrays, augmented image by image.  CIFAR-10's 50,000 images take 150 MB
and every later epoch skips JPEG decoding entirely.  Larger ones are decoded on
the fly in DataLoader workers, at reduced size when the JPEG is much larger than
the model input.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..progress import bar as progress_bar
from .arraycache import CachedImages, base_image
from .batch_augment import BatchAugment
from .decode import ImageError
from .preprocess import Augment, Preprocess
from .records import Record
from .transforms import train_transform

log = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 2 * 1024**3


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
    """(uint8 tensor (3, S, S), class index) pairs.

    ``class_to_index`` maps a record's label to its target, or is a function of the record (a multi-output
    record's class per head)."""

    def __init__(self, records: list[Record], class_to_index, spec: Preprocess,
                 augment: Augment | None = None, cache: list[np.ndarray] | CachedImages | None = None,
                 device: torch.device | None = None):
        """``device``: where :class:`ArrayLoader` augments the batches of an array cache."""
        self.records = records
        self.device = device if device is not None else torch.device("cpu")
        self.class_to_index = class_to_index
        target = class_to_index if callable(class_to_index) else (lambda r: class_to_index[r.label])
        self.targets = [target(r) for r in records]
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


class ArrayLoader:
    """Batches of an array-cached :class:`ImageDataset`, as a DataLoader yields them, augmented on the device.

    One read of the memory-mapped rows per batch, moved to the dataset's device as uint8, then
    :class:`BatchAugment` (training) or a float conversion (evaluation); the epoch's
    ``generator`` draws the order and every augmentation parameter."""

    def __init__(self, dataset: ImageDataset, batch_size: int, shuffle: bool = False, generator=None, sampler=None,
                 drop_last: bool = False, epoch: int = 0):
        if not isinstance(dataset.cache, CachedImages):
            raise TypeError("ArrayLoader reads an ImageDataset whose cache is an array cache")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.generator, self.sampler, self.drop_last, self.epoch = generator, sampler, drop_last, epoch
        self.augment = BatchAugment(dataset.spec, dataset.augment) if dataset.augment is not None else None
        self.targets = torch.as_tensor(np.asarray(dataset.targets))

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        if self.sampler is not None:
            order = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        elif self.shuffle:
            order = torch.randperm(n, generator=self.generator)
        else:
            order = torch.arange(n)
        device = self.dataset.device
        pin = device.type == "cuda"
        for k in range(len(self)):
            index = order[k * self.batch_size:(k + 1) * self.batch_size]
            host = torch.from_numpy(self.dataset.cache.batch(index.numpy()))  # (B, S, S, 3) uint8
            if pin:
                host = host.pin_memory()
            images = host.to(device, non_blocking=True).permute(0, 3, 1, 2)
            if self.augment is not None:
                images = self.augment(images, self.generator, index=index, epoch=self.epoch)
            else:
                images = images.contiguous()
            yield images, self.targets[index]
