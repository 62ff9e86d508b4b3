"""Decode once, reuse every run: a list of images as one memory-mapped uint8 array on disk.

``--cache array`` (and ``auto`` for small images) decodes each split's files once into
``<cache dir>/<key>.npy``, shape (N, H, W, 3), H = W.  The key is a hash of the decode
geometry and of every file's absolute path, size and modification time, so a later run
on the same files (another ``--out``, a ``--resume``) maps the array instead of decoding,
and a changed, added or removed file makes a new key.

The array is written to a temporary name and renamed, and ``<key>.json`` (the unreadable
files with their reasons) is written after it, the same way: the JSON is what marks an
entry complete, so a killed run never leaves a cache that a later run trusts.

Unreadable files keep a row of zeros and are listed with their reason; :class:`CachedImages`
is the readable rows as CHW arrays, what :class:`imgcls.data.dataset.ImageDataset` takes as
its ``cache``.  Only NumPy and the package's decoder: no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..progress import bar as progress_bar
from PIL import Image

from .decode import ImageError, open_image
from .preprocess import Augment, Preprocess, resize_and_crop
from .records import Record

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the decode or the layout changes: old entries then simply miss

#: ``--cache auto`` uses the array cache for images decoded at this side or smaller
SMALL_SIDE = 64
#: an entry no run has used for this many days is removed when another one is built
MAX_AGE_DAYS = 30


def default_cache_dir() -> Path:
    """``$IMGCLS_CACHE_DIR``, else ``$XDG_CACHE_HOME/imgcls/arrays`` (``~/.cache/imgcls/arrays``): outside the
    run directory, since the point is that the next run, with its own ``--out``, finds it."""
    if os.environ.get("IMGCLS_CACHE_DIR"):
        return Path(os.environ["IMGCLS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgcls" / "arrays"


def decode_side(spec: Preprocess, augment: Augment | None) -> int:
    """The side of the cached squares: training images keep the margin random crops take from."""
    return spec.resize_size if augment is not None and augment.enabled else spec.input_size


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


def decode_square(path, spec: Preprocess, augment: Augment | None) -> np.ndarray:
    """One file -> uint8 (side, side, 3): the eval crop, or for training the resized image's centre square."""
    array = base_image(path, spec, augment)
    _, h, w = array.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return np.ascontiguousarray(array[:, top:top + side, left:left + side].transpose(1, 2, 0))


def cache_key(records: list[Record], spec: Preprocess, augment: Augment | None) -> str:
    """A hash of the decode geometry and of each file's path, size and modification time."""
    digest = hashlib.sha256()
    geometry = [FORMAT, spec.input_size, spec.resize, spec.crop_pct, spec.interpolation,
                bool(augment is not None and augment.enabled)]
    digest.update(json.dumps(geometry).encode())
    for record in records:
        path = os.path.abspath(record.path)
        try:
            stat = os.stat(path)
            state = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            state = "missing"
        digest.update(f"\0{path}\0{state}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


@dataclass
class ArrayCache:
    """One list of records decoded: the array, the unreadable files, whether it came from disk."""

    images: np.ndarray                 # (N, side, side, 3) uint8, memory-mapped read-only
    failures: dict[int, str]           # record index -> why it could not be read
    path: Path
    reused: bool

    def view(self) -> "CachedImages":
        return CachedImages(self.images, np.array([i for i in range(len(self.images)) if i not in self.failures],
                                                  dtype=np.int64))


class CachedImages:
    """The readable rows of an :class:`ArrayCache`: index -> uint8 CHW array, as a list of images reads."""

    def __init__(self, images: np.ndarray, rows: np.ndarray):
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(self.images[self.rows[i]].transpose(2, 0, 1))

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (B, side, side, 3) of these positions, one read of the mapped file."""
        return self.images[self.rows[indices]]


def _complete(array_path: Path, meta_path: Path, shape: tuple) -> tuple[np.ndarray, dict[int, str]] | None:
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT or tuple(images.shape) != shape or images.dtype != np.uint8:
        return None
    return images, {int(k): v for k, v in meta.get("failures", {}).items()}


def prune(folder: Path, max_age_days: float = MAX_AGE_DAYS) -> None:
    """Remove the entries unused for ``max_age_days`` and the temporary files of runs killed a day ago or more
    (a run on temporary copies of the data would otherwise leave an entry behind for good)."""
    now = time.time()
    for path in folder.glob("*"):
        try:
            age = now - path.stat().st_mtime
            if (path.suffix == ".json" and ".tmp." not in path.name and age > max_age_days * 86400):
                path.unlink()  # the JSON first: the entry is incomplete from this moment
                path.with_suffix(".npy").unlink(missing_ok=True)
            elif ".tmp." in path.name and age > 86400:
                path.unlink()
        except OSError:
            pass


def load_or_build(records: list[Record], spec: Preprocess, augment: Augment | None, cache_dir: str | Path | None,
                  workers: int = 2, progress: bool = False, desc: str = "decode") -> ArrayCache:
    """The array of ``records`` from the cache directory, decoding them (threads) when it has no complete entry."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(records, spec, augment)
    side = decode_side(spec, augment)
    shape = (len(records), side, side, 3)
    array_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    found = _complete(array_path, meta_path, shape)
    if found is not None:
        log.debug("%s: %d images from %s", desc, len(records), array_path)
        try:
            os.utime(meta_path)  # last used now: prune keeps it
        except OSError:
            pass
        return ArrayCache(found[0], found[1], array_path, reused=True)

    folder.mkdir(parents=True, exist_ok=True)
    prune(folder)
    meta_path.unlink(missing_ok=True)  # an entry being replaced is not complete until its JSON is back
    tmp = folder / f"{key}.{os.getpid()}.tmp.npy"
    failures: dict[int, str] = {}
    try:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)

        def one(i: int):
            try:
                images[i] = decode_square(records[i].path, spec, augment)
                return None
            except ImageError as err:
                return err.reason

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = pool.map(one, range(len(records)), chunksize=64)
            for i, reason in enumerate(progress_bar(results, total=len(records), desc=desc, disable=not progress,
                                                    unit="img", leave=False)):
                if reason is not None:
                    failures[i] = reason
        images.flush()
        images = None  # unmapped before the rename (Windows cannot rename a mapped file)
        os.replace(tmp, array_path)
        meta_tmp = folder / f"{key}.{os.getpid()}.tmp.json"
        meta_tmp.write_text(json.dumps({"format": FORMAT, "shape": list(shape), "failures": failures}))
        os.replace(meta_tmp, meta_path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("%s: %d images decoded into %s (%.0f MB), reused by later runs on the same files", desc,
             len(records), array_path, np.prod(shape) / 2**20)
    return ArrayCache(np.load(array_path, mmap_mode="r"), failures, array_path, reused=False)
