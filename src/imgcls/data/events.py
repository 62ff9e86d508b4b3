"""Capture events: the frames one camera trigger took, so that a split never divides them.

Camera traps fire in bursts of near-identical frames.  A split that puts
frames of one burst on both sides scores the validation frames as if they
were unseen, which inflates the figure.  The events come from a CSV column
(``--event-column``, or a ``group`` column), or are grouped here: per camera
(the record's ``camera``, from a ``camera``/``site`` CSV column, else the
name of the image's folder), frames whose capture time lies within
``gap`` seconds of the previous frame form one event, as MegaDetector's
and animl's sequence grouping do.

The capture time is the one the data gives (a COCO Camera Traps ``datetime``:
``group_events(..., times=...)``), else EXIF DateTimeOriginal (else DateTime),
read from the file's header only; a file without one falls back to its
modification time.
File times are often copy times, so an event timed by file times that holds
more than half of its camera's frames (or ``MAX_MTIME_FRAMES``) is taken
apart into single frames rather than trusted; the run says how many.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from .records import SPLIT_NAMES, Record

log = logging.getLogger("imgcls")

EXIF_IFD = 0x8769
DATETIME_ORIGINAL = 36867
DATETIME = 306
DEFAULT_GAP = 10.0        # seconds between frames of one burst (MegaDetector's default sequence gap is similar)
MAX_MTIME_FRAMES = 50     # an "event" of file times this large is a copy, not a burst


def _parse_exif_time(value) -> float | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "ignore")
    if not isinstance(value, str):
        return None
    try:  # "YYYY:MM:DD HH:MM:SS"; the camera's local clock, compared only with itself
        return datetime.strptime(value.strip().strip("\x00")[:19], "%Y:%m:%d %H:%M:%S").replace(
            tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def parse_time(value) -> float | None:
    """Seconds of a date-time text: ``YYYY-MM-DD HH:MM:SS``, ISO 8601 (``T``, fractions, ``Z``, offsets)
    or EXIF's ``YYYY:MM:DD HH:MM:SS``; None when it is not one.  A time without a zone reads as UTC:
    like EXIF's, it is the camera's clock, compared only with itself."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    exif = _parse_exif_time(text) if text[4:5] == ":" else None
    if exif is not None:
        return exif
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def capture_time(path: str | Path) -> tuple[float | None, str]:
    """``(seconds, source)``: EXIF DateTimeOriginal or DateTime (``"exif"``), else the file's
    modification time (``"mtime"``); ``(None, "none")`` when the file cannot be read at all."""
    from PIL import Image  # the header only: PIL reads EXIF without decoding pixels

    try:
        with Image.open(path) as image:
            exif = image.getexif()
            value = exif.get_ifd(EXIF_IFD).get(DATETIME_ORIGINAL) or exif.get(DATETIME)
        seconds = _parse_exif_time(value)
        if seconds is not None:
            return seconds, "exif"
    except Exception:  # noqa: BLE001 - an unreadable header: the scan reports the file; here its time only
        pass
    try:
        return os.stat(path).st_mtime, "mtime"
    except OSError:
        return None, "none"


def _folder(folder: str, labels: set) -> tuple[str, ...]:
    """An absolute folder as path parts, less the folders people sort images into: splits' (``train/``,
    ``val/``) and classes' (``labels``). ``train/deer`` and ``val/deer``, or ``deer/site1`` and
    ``empty/site1``, hold frames of one camera, so a burst cut between them still reads as one event."""
    return tuple(p for p in Path(folder).parts if p.lower() not in SPLIT_NAMES and p not in labels)


def cameras(records: list[Record], others: Iterable[str] = ()) -> list[str]:
    """The camera each record came from: its ``camera`` field, else its folder (:func:`_folder`), named by the
    fewest trailing folder names that tell it from the other folders: memory cards name their folders alike
    (``100RECNX``, ``DCIM/100MEDIA``), so ``site1/100RECNX`` and ``site2/100RECNX`` are two cameras, and
    ``cam1`` stays ``cam1`` when no other folder is called so.

    ``others``: more folders (absolute) the names must tell apart, though none of ``records`` is in them: a
    shard's records are named among every folder of the job's inputs, as the unsharded run names them, so
    the shards' deployments and events merge into that run's."""
    labels = {r.label for r in records if r.label is not None}
    parts_of: dict[str, tuple[str, ...]] = {}  # per folder, not per image: a job may hold millions of images
    folders = []
    for r in records:
        folder = None if r.camera else os.path.dirname(os.path.abspath(r.path))
        if folder is not None and folder not in parts_of:
            parts_of[folder] = _folder(folder, labels)
        folders.append(None if folder is None else parts_of[folder])
    names: dict[tuple[str, ...], str] = {}
    pending = {f for f in folders if f is not None} | {parts_of.get(f) or _folder(f, labels) for f in others}
    depth = 1
    while pending:  # lengthen the names still shared; a folder out of names to add is named by its whole path
        by_name: dict[str, list[tuple[str, ...]]] = defaultdict(list)
        for parts in pending:
            by_name[os.path.join(*parts) if depth >= len(parts) else "/".join(parts[-depth:])].append(parts)
        for name, same in by_name.items():
            if len(same) == 1:
                names[same[0]] = name
                pending.discard(same[0])
        depth += 1
    return [r.camera or names[folder] for r, folder in zip(records, folders)]


@dataclass
class EventReport:
    """How the events were found, and their sizes (``scan.json``'s ``events``)."""

    source: str                     # column | exif | none
    events: int = 0
    frames: int = 0
    max_frames: int = 0
    given_times: int = 0            # frames timed by the data itself (``times``), not by their files
    from_exif: int = 0
    from_mtime: int = 0
    without_time: int = 0
    mtime_split: int = 0            # frames of implausibly large file-time events, taken apart
    leaked_by_random_split: int | None = None   # events a per-image random split puts on two sides
    across_given_splits: int | None = None      # events the data's own splits put on two sides

    @property
    def mean_frames(self) -> float:
        return self.frames / self.events if self.events else 0.0

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out["mean_frames"] = round(self.mean_frames, 2)
        return out


def group_events(records: list[Record], gap: float = DEFAULT_GAP, workers: int = 8,
                 times: list[float | None] | None = None, others: Iterable[str] = ()) -> tuple[list[Record], EventReport]:
    """The records with ``group`` set to their capture event, and a report.

    ``times``: one capture time (seconds) per record that the data already gives, e.g. a COCO
    ``datetime`` (:func:`parse_time`); a None in it, or no list, means the file's own time.
    ``others``: as for :func:`cameras`, which names the events' cameras."""
    given = list(times) if times is not None else [None] * len(records)
    if len(given) != len(records):
        raise ValueError(f"{len(given)} times for {len(records)} records")

    def when(i: int) -> tuple[float | None, str]:
        return (given[i], "given") if given[i] is not None else capture_time(records[i].path)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        times = list(pool.map(when, range(len(records))))
    report = EventReport("exif")
    sources = Counter(source for _, source in times)
    report.from_exif, report.from_mtime, report.without_time = sources["exif"], sources["mtime"], sources["none"]
    report.given_times = sources["given"]
    by_camera: dict[str, list[int]] = defaultdict(list)
    for i, camera in enumerate(cameras(records, others)):
        by_camera[camera].append(i)
    groups: list[str | None] = [None] * len(records)
    for camera, members in by_camera.items():
        timed = sorted((i for i in members if times[i][0] is not None), key=lambda i: times[i][0])
        events: list[list[int]] = []
        for i in timed:
            if events and times[i][0] - times[events[-1][-1]][0] <= gap:
                events[-1].append(i)
            else:
                events.append([i])
        # file times of copied files are copy times: one "event" then holds much of the folder
        limit = max(1, min(MAX_MTIME_FRAMES, len(members) // 2))
        for k, event in enumerate(events):
            if len(event) > limit and any(times[i][1] == "mtime" for i in event):
                report.mtime_split += len(event)
                for i in event:  # by file: rows naming one file still share a group
                    groups[i] = _file_event(camera, records[i].path)
                continue
            start = datetime.fromtimestamp(times[event[0]][0], timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            for i in event:
                groups[i] = f"{camera}/{start}/{k}"
    if report.mtime_split:
        log.info("capture events: %d frames without EXIF time have file times that put over half their folder"
                 " (or %d frames) in one event, as copied files do; they count as single frames (an"
                 " --event-column groups them)", report.mtime_split, MAX_MTIME_FRAMES)
    out = [replace(r, group=g) for r, g in zip(records, groups)]
    _count(out, report)
    return out, report


def _file_event(camera: str, path: str | Path) -> str:
    """A one-file event's ID: the camera and file name, and a digest of the absolute path that keeps files of
    one name in two folders apart without writing the machine's folders into shared outputs (Camtrap DP)."""
    digest = hashlib.sha1(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{camera}/{Path(path).name}#{digest}"


def _count(records: list[Record], report: EventReport) -> None:
    sizes = Counter(r.group for r in records if r.group is not None)
    report.events, report.frames = len(sizes), sum(sizes.values())
    report.max_frames = max(sizes.values(), default=0)


def column_report(records: list[Record]) -> EventReport:
    """The report for events given by a column (``group`` already set)."""
    report = EventReport("column")
    _count(records, report)
    return report


def events_on_both_sides(splits: dict[str, list[Record]]) -> int:
    """How many events have frames in more than one split."""
    seen: dict[str, set[str]] = defaultdict(set)
    for name, records in splits.items():
        for r in records:
            if r.group is not None:
                seen[r.group].add(name)
    return sum(len(names) > 1 for names in seen.values())
