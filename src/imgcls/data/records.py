"""Records: every data source becomes a list of these before anything else
happens, so splitting, scanning and prediction never care where data came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                            # listed so the scan reports them (unsupported) instead of ignoring them silently
                            ".heic", ".heif", ".avif"})
# a split's folder name (any case) or CSV value -> the split it means
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Record:
    """One image and what is known about it.

    Multi-label (several species in one frame) is an addition that leaves every
    single-label path as it was: ``label`` keeps the label text, the labels
    joined by the separator (``"deer;fox"``), so split.csv, the scan and
    messages show what the user wrote, and ``labels`` holds the parsed set
    (``("deer", "fox")``, :func:`imgcls.tasks.parse_label_sets`).  Code that needs "every label of
    this record" reads :attr:`label_set`, which is ``(label,)`` for the usual
    single-label record; code that indexes classes by ``label`` fails loudly on
    a joined text instead of silently using one of its labels.
    """

    path: Path
    label: str | None = None   # class name; None for unlabelled (prediction) inputs
    group: str | None = None   # trigger event / site: all shots of a group land in one split
    camera: str | None = None  # the camera or site (a CSV column); events are grouped per camera
    labels: tuple[str, ...] | None = None  # multi-label: the parsed label set (label holds its text)
    # multi-output: (column, value or None when empty) per label column; label holds the first column's value
    outputs: tuple[tuple[str, str | None], ...] | None = None

    @property
    def label_set(self) -> tuple[str, ...]:
        """Every label of the record: ``labels`` when parsed, else ``(label,)``; ``()`` when unlabelled.
        A multi-output record's labels are its present values qualified by their column
        (``species:deer``, :func:`qualified`)."""
        if self.outputs is not None:
            return tuple(qualified(name, value) for name, value in self.outputs if value is not None)
        if self.labels is not None:
            return self.labels
        return () if self.label is None else (self.label,)


# A multi-output model's labels are one flat list, every head's classes in head order, each named
# ``<column>:<value>``; the logits follow that list, so one output (N, sum of K) holds every head.
OUTPUT_SEP = ":"


def qualified(name: str, value: str) -> str:
    return f"{name}{OUTPUT_SEP}{value}"


def heads_of(labels: list[str]) -> list[tuple[str, list[str], int]]:
    """A multi-output model's flat labels -> ``[(column, its class names, first logit)]`` in head order
    (each head's labels are contiguous; a column name holds no ``:``)."""
    heads: list[tuple[str, list[str], int]] = []
    for i, label in enumerate(labels):
        name, _, value = label.partition(OUTPUT_SEP)
        if not heads or heads[-1][0] != name:
            heads.append((name, [], i))
        heads[-1][1].append(value)
    return heads
