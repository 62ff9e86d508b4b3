"""Records: every data source becomes a list of these before anything else
happens, so splitting, scanning and prediction never care where data came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                            # listed so the scan reports them (unsupported) instead of ignoring them silently
                            ".heic", ".heif", ".avif"})


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

    @property
    def label_set(self) -> tuple[str, ...]:
        """Every label of the record: ``labels`` when parsed, else ``(label,)``; ``()`` when unlabelled."""
        if self.labels is not None:
            return self.labels
        return () if self.label is None else (self.label,)
