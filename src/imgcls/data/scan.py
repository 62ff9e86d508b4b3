"""Pre-flight check of image files: which ones cannot be read, and why; duplicates.

The check is honest: a file passes only if :func:`imgcls.data.decode.open_image`
decodes it, because the scan calls exactly that.  It decodes JPEGs at 1/8
scale (``min_size=1``), which still reads and entropy-decodes every byte, so
truncated and corrupt files are caught, at a fraction of the cost of a full
decode; other formats are decoded in full.  A file that passes here will also
load at full size in training.

Parallelism: a thread pool.  The decoders (Pillow, simplejpeg) release the
GIL while they work, so threads scale like processes here without the start-up
and pickling cost of a process pool (measured in ``benchmarks/decode.py
--scan``).

Only the standard library, Pillow and NumPy (through decode) and tqdm (progress) are
used: the scan runs in the torch-free prediction runtime too.
"""

from __future__ import annotations

import hashlib
import os
import random
import statistics
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from PIL import Image

from ..progress import bar as progress_bar
from ..system import default_workers
from .decode import ImageError, open_image, open_regular

__all__ = ["check_image", "scan_paths", "find_duplicates", "typical_short_side"]

T = TypeVar("T")
R = TypeVar("R")


def check_image(path: str | os.PathLike) -> str | None:
    """None if ``path`` is a readable image, else the reason it is not (see :class:`ImageError`)."""
    try:
        open_image(path, min_size=1)
    except ImageError as exc:
        return exc.reason
    return None


def scan_paths(paths: Iterable[str | os.PathLike], workers: int | None = None,
               progress: bool = False) -> list[tuple[Path, str]]:
    """Check every file; return the unreadable ones as ``(path, reason)``, in input order.

    ``workers``: threads (default: one per CPU, at most 8; 0 or 1 checks in
    this thread).  ``progress``: show a tqdm bar.
    """
    paths = [Path(p) for p in paths]
    bad: list[tuple[Path, str]] = []
    for path, reason in _progress(_map(check_image, paths, workers), len(paths), progress, "scan"):
        if reason is not None:
            bad.append((path, reason))
    return bad


def typical_short_side(paths: list[str | os.PathLike], sample: int = 256, seed: int = 0) -> int | None:
    """Median shorter side, in pixels, of up to ``sample`` of ``paths`` (a seeded sample).

    Reads image headers only (Pillow opens lazily), so it costs milliseconds
    even on a slow disk.  None when no sampled file is a readable image.
    """
    chosen = random.Random(seed).sample(list(paths), min(sample, len(paths)))
    sides = []
    for path in chosen:
        try:
            with open_regular(path) as handle, Image.open(handle) as image:  # a FIFO must not hang
                sides.append(min(image.size))
        except Exception:  # unreadable files are the scan's business, not this estimate's
            continue
    return int(statistics.median(sides)) if sides else None


def find_duplicates(paths: Iterable[str | os.PathLike], workers: int | None = None,
                    progress: bool = False) -> list[list[Path]]:
    """Groups of files with identical bytes (at least two per group).

    Files are first grouped by size, and only files sharing a size are hashed
    (BLAKE2b), so a folder without duplicates costs one ``stat`` per file.
    Groups keep input order and come in order of their first file.  Missing
    or unreadable files are skipped (the scan reports them).  Only exact
    copies are found; a re-encoded or resized copy of a picture is not.
    """
    paths = [Path(p) for p in paths]
    by_size: dict[int, list[int]] = {}
    for index, path in enumerate(paths):
        try:
            by_size.setdefault(path.stat().st_size, []).append(index)
        except OSError:
            continue
    candidates = sorted(i for group in by_size.values() if len(group) > 1 for i in group)
    by_content: dict[tuple[int, bytes], list[int]] = {}
    hashed = _map(_file_digest, [paths[i] for i in candidates], workers)
    for index, (_, key) in zip(candidates, _progress(hashed, len(candidates), progress, "hash")):
        if key is not None:  # (size, digest); None: unreadable
            by_content.setdefault(key, []).append(index)
    groups = [group for group in by_content.values() if len(group) > 1]
    groups.sort(key=lambda group: group[0])
    return [[paths[i] for i in group] for group in groups]


# --------------------------------------------------------------------------- internals


def _file_digest(path: Path) -> tuple[int, bytes] | None:
    digest = hashlib.blake2b(digest_size=20)
    try:
        with open_regular(path) as handle:
            size = 0
            while chunk := handle.read(1 << 20):
                digest.update(chunk)  # releases the GIL for large chunks
                size += len(chunk)
    except OSError:
        return None
    return size, digest.digest()


def _map(fn: Callable[[T], R], items: list[T], workers: int | None) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` in input order, with at most a few tasks per thread in flight.

    (``Executor.map`` would create every future up front: a million-file
    scan would hold a million futures.)
    """
    workers = default_workers(cap=8) if workers is None else int(workers)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgcls-scan") as pool:
        yield from _bounded_map(pool, fn, items, window=4 * workers)


def _bounded_map(pool: Executor, fn, items, window: int):
    pending: deque = deque()
    iterator = iter(items)
    for item in iterator:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            break
    while pending:
        item, future = pending.popleft()
        result = future.result()
        for nxt in iterator:
            pending.append((nxt, pool.submit(fn, nxt)))
            break
        yield item, result


def _progress(iterator, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterator
    return progress_bar(iterator, total=total, desc=desc, unit="file")
