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
    path: Path
    label: str | None = None   # class name; None for unlabelled (prediction) inputs
    group: str | None = None   # trigger event / site: all shots of a group land in one split
    camera: str | None = None  # the camera or site (a CSV column); events are grouped per camera
