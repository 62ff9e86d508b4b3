"""Prediction outputs: the formats camera-trap tools read, made from the per-image rows.

Every format streams its per-image rows to a *row file* as they come, batch
by batch, so a kill at any moment loses at most the batch in flight:

* ``csv`` and ``jsonl`` are row files themselves (``OUT``);
* ``megadetector`` (MegaDetector batch output, read by Timelapse and AddaxAI)
  and ``camtrapdp`` (a Camtrap DP 1.0 folder) are whole files: their rows go
  to a JSON Lines journal beside the output (``OUT.partial.jsonl``), and at
  the end the final file is written atomically (temp file + rename) from the
  journal, which is then removed.

A row file (:mod:`imgcls.prediction.rowfiles`) resumes by position: its k complete rows
are inputs 1..k (checked path by path); a last row cut by a crash is
truncated, an unreadable row elsewhere is an error.  The output is locked
(``OUT.lock``) for the whole run.

Beside every output, ``OUT.meta.json`` (:mod:`imgcls.prediction.fingerprint`) says which
model file and options wrote it; the final files carry its fingerprints too.

``--aggregate`` (events) and the whole-file formats keep every class's
probability in the rows, so event rows and final files are made from the row
file alone, whatever part of it an earlier, interrupted run wrote.

NumPy and the standard library only: the prediction runtime stays torch-free.
"""

from __future__ import annotations

import csv
import filecmp
import io
import json
import logging
import mimetypes
import os
import re
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from .. import rundir
from ..data.events import cameras, capture_time
from ..data.records import Record
from ..errors import UserError
from ..evaluation.aggregate import aggregate_probs
from ..evaluation.thresholds import UNCERTAIN, decide
from .rowfiles import CsvRows, JsonlRows

log = logging.getLogger("imgcls")

# class names that mean "nothing in the frame": MegaDetector's conf is 1 - P(empty), Camtrap DP's type is blank
EMPTY_NAMES = ("empty", "blank", "nothing", "no_animal")
MEGADETECTOR_VERSION = "1.6"   # the current spec (lila.science/megadetector-output-format); every field we write is in it
FAILED_FOLDER = "_failed"


def empty_label(labels: list[str]) -> str | None:
    """The model's class meaning "empty" (``EMPTY_NAMES``, case-insensitive), or None."""
    return next((label for label in labels if label.lower() in EMPTY_NAMES), None)


# --------------------------------------------------------------------------- rows


def row_probs(row: dict, labels: list[str]) -> np.ndarray | None:
    """Every class's probability from a row that ranks all classes (None for a failed image)."""
    if row.get("prob") is None:
        return None
    probs = np.zeros(len(labels))
    index = {label: i for i, label in enumerate(labels)}
    if "label_1" not in row:  # one class: no ranked columns
        probs[index[row["label"]]] = row["prob"]
        return probs
    for rank in range(1, len(labels) + 1):
        probs[index[row[f"label_{rank}"]]] = row[f"prob_{rank}"]
    return probs


# --------------------------------------------------------------------------- a run's output


@dataclass
class Job:
    """What the final writers need: the rows come from the row file, the rest from the run."""

    out: Path
    format: Format
    labels: list[str]
    model: str
    thresholds: dict
    records: list[Record]
    aggregate: str | None = None            # mean | max: event rows
    media: MediaTable | None = None         # camtrapdp --media
    base: Path | None = None                # MegaDetector paths are relative to this folder
    version: str = ""
    fingerprint: dict | None = None         # the sidecar's fingerprints (imgcls.prediction.fingerprint), in the final files
    folders: set[str] = field(default_factory=set)  # every input's folders: a shard names cameras among them all
    finished: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def decision(self, label: str | None, prob: float | None) -> str | None:
        if label is None or not self.thresholds:
            return None
        return decide(label, prob, self.thresholds)


def events_path(out: Path) -> Path:
    """``rows.csv`` -> ``rows.events.csv`` (the event rows of the csv and jsonl formats)."""
    return out.with_name(f"{out.stem}.events{out.suffix}")


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def event_rows(job: Job, rows: list[dict]) -> list[dict]:
    """One row per capture event, in the order events first appear: frames, failed frames, and the
    label, probability and decision of :func:`imgcls.evaluation.aggregate.aggregate_probs` over the readable frames."""
    members: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("event") is not None:
            members.setdefault(row["event"], []).append(row)
    out = []
    for event, frames in members.items():
        probs = [p for p in (row_probs(r, job.labels) for r in frames) if p is not None]
        row = {"event": event, "frames": len(frames), "failed": len(frames) - len(probs),
               "label": None, "prob": None}
        if probs:
            agg = aggregate_probs(np.stack(probs), job.aggregate or "mean")
            best = int(np.argmax(agg))
            row["label"], row["prob"] = job.labels[best], round(float(agg[best]), 6)
        if job.thresholds:
            row["decision"] = job.decision(row["label"], row["prob"])
        out.append(row)
    return out


def _write_events_csv(job: Job, rows: list[dict]) -> list[Path]:
    events = [{k: ("" if v is None else v) for k, v in e.items()} for e in event_rows(job, rows)]
    path = events_path(job.out)
    rundir.atomic_write(path, csv_text(_event_columns(job), events))
    return [path]


def _write_events_jsonl(job: Job, rows: list[dict]) -> list[Path]:
    path = events_path(job.out)
    rundir.atomic_write(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in event_rows(job, rows)))
    return [path]


def _event_columns(job: Job) -> list[str]:
    return ["event", "frames", "failed", "label", "prob", *(["decision"] if job.thresholds else [])]


# --------------------------------------------------------------------------- MegaDetector


def megadetector(job: Job, rows: list[dict]) -> dict:
    """The MegaDetector batch output of the rows: one whole-image detection (category 1, "animal") per
    readable image, ``conf`` = 1 - P(empty) when the model has an empty class (else 1.0), and every
    class in ``classifications``, highest first; an unreadable image has ``failure`` and null detections."""
    index = {label: str(i) for i, label in enumerate(job.labels)}
    empty = empty_label(job.labels)
    images = []
    for row in rows:
        image = {"file": _md_file(row["path"], job.base)}
        probs = row_probs(row, job.labels)
        if probs is None:
            image["failure"], image["detections"] = row.get("error") or "not predicted", None
        else:
            order = np.argsort(-probs, kind="stable")
            conf = 1.0 - float(probs[job.labels.index(empty)]) if empty else 1.0
            image["detections"] = [{
                "category": "1", "conf": round(float(conf), 6), "bbox": [0.0, 0.0, 1.0, 1.0],
                "classifications": [[index[job.labels[i]], round(float(probs[i]), 6)] for i in order]}]
        images.append(image)
    info = {"format_version": MEGADETECTOR_VERSION, "classifier": job.model,
            "classification_completion_time": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "classifier_metadata": {"tool": f"imgcls {job.version}".strip(), "whole_image": True,
                                    "empty_class": empty, "thresholds": job.thresholds or None,
                                    "fingerprint": job.fingerprint}}
    return {"info": info, "detection_categories": {"1": "animal"},
            "classification_categories": {index[label]: label for label in job.labels}, "images": images}


def _md_file(path: str, base: Path | None) -> str:
    """The path Timelapse and AddaxAI resolve against the image folder: relative to the one input
    folder when there is one, forward slashes."""
    if base is not None:
        try:
            path = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
        except ValueError:  # another drive (Windows)
            pass
    return path.replace(os.sep, "/")


def _write_megadetector(job: Job, rows: list[dict]) -> list[Path]:
    rundir.atomic_write(job.out, json.dumps(megadetector(job, rows), indent=1, ensure_ascii=False))
    return [job.out]


def _check_megadetector(out: Path, count: Callable[[], int]) -> bool:
    """A finished MegaDetector file of these inputs (the journal is gone once it is written)."""
    try:
        data = json.loads(out.read_text(encoding="utf-8", errors="surrogateescape"))
        return isinstance(data, dict) and "format_version" in data["info"] and len(data["images"]) == count()
    except (ValueError, KeyError, TypeError):
        return False


# --------------------------------------------------------------------------- Camtrap DP

CAMTRAP_PROFILE = "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0/camtrap-dp-profile.json"
OBSERVATION_COLUMNS = [
    "observationID", "deploymentID", "mediaID", "eventID", "eventStart", "eventEnd", "observationLevel",
    "observationType", "scientificName", "count", "lifeStage", "sex", "behavior", "individualID",
    "individualPositionRadius", "individualPositionAngle", "individualSpeed", "bboxX", "bboxY", "bboxWidth",
    "bboxHeight", "classificationMethod", "classifiedBy", "classificationTimestamp", "classificationProbability",
    "observationTags", "observationComments"]
MEDIA_COLUMNS = ["mediaID", "deploymentID", "captureMethod", "timestamp", "filePath", "filePublic", "fileName",
                 "fileMediatype", "exifData", "favorite", "mediaComments"]
DEPLOYMENT_COLUMNS = [
    "deploymentID", "locationID", "locationName", "latitude", "longitude", "coordinateUncertainty",
    "deploymentStart", "deploymentEnd", "setupBy", "cameraID", "cameraModel", "cameraDelay", "cameraHeight",
    "cameraDepth", "cameraTilt", "cameraHeading", "detectionDistance", "timestampIssues", "baitUse", "featureType",
    "habitat", "deploymentGroups", "deploymentTags", "deploymentComments"]
# what a package needs that only the user knows: named in datapackage.json for them to fill in
TO_COMPLETE = ("latitude and longitude of each deployment (deployments.csv)", "contributors", "project", "spatial")


@dataclass
class MediaTable:
    """A user's Camtrap DP ``media.csv`` (``--media``): its text, kept as the package's media resource,
    per input its row (mediaID, deploymentID, timestamp), and the ``deployments.csv`` beside it, if any,
    kept as the package's deployments resource."""

    path: Path
    text: str
    rows: list[dict]
    deployments: str | None = None


def read_media(path: str | Path, records: list[Record]) -> MediaTable:
    """Match every input to a row of ``path`` by ``filePath`` (as written, or relative to the CSV's folder);
    a UserError listing the inputs it lacks, before any image is predicted."""
    from ..data.sources import read_csv

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--media {path}: no such file; give the Camtrap DP media.csv of these images")
    columns, rows = read_csv(path)
    missing = {"mediaID", "deploymentID", "filePath"} - set(columns)
    if missing:
        raise UserError(f"--media {path}: no {', '.join(sorted(missing))} column; it has {', '.join(columns)}")
    by_path: dict[str, dict] = {}
    for _, row in rows:
        file_path = (row["filePath"] or "").strip()
        for key in (file_path, os.path.normpath(os.path.join(os.path.abspath(path.parent), file_path))):
            by_path.setdefault(key, row)
    matched, lacking = [], []
    for record in records:
        row = by_path.get(str(record.path)) or by_path.get(os.path.abspath(record.path))
        matched.append(row)
        if row is None:
            lacking.append(str(record.path))
    if lacking:
        raise UserError(f"--media {path}: {len(lacking)} input image(s) have no row there (by filePath), e.g."
                        f" {', '.join(lacking[:3])}; add them to it or leave them out of the inputs")
    beside = path.with_name("deployments.csv")
    deployments = beside.read_bytes().decode("utf-8", "surrogateescape") if beside.is_file() else None
    return MediaTable(path, path.read_bytes().decode("utf-8", "surrogateescape"), matched, deployments)


def _iso(seconds: float | None) -> str:
    return "" if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _observation_type(label: str | None, decision: str | None, empty: str | None) -> str:
    if label is None or decision == UNCERTAIN:
        return "unknown"
    return "blank" if label == empty else "animal"


def camtrap_tables(job: Job, rows: list[dict], times: list[float | None]) -> tuple[list[dict], list[dict]]:
    """(media rows, observation rows) of a Camtrap DP 1.0 package: one media-level observation per image,
    and with events one event-level observation per event (the aggregated probabilities)."""
    empty = empty_label(job.labels)
    media, observations, by_event = [], [], {}
    for i, (camera, row) in enumerate(zip(cameras(job.records, job.folders), rows)):
        given = job.media.rows[i] if job.media else None
        media_id = given["mediaID"] if given else f"m{i + 1:06d}"
        deployment = given["deploymentID"] if given else camera
        stamp = (given.get("timestamp") or "") if given else ""
        stamp = stamp or _iso(times[i])
        if not given:
            media.append({"mediaID": media_id, "deploymentID": deployment, "captureMethod": "", "timestamp": stamp,
                          "filePath": row["path"], "filePublic": "false", "fileName": Path(row["path"]).name,
                          "fileMediatype": mimetypes.guess_type(row["path"])[0] or "", "exifData": "",
                          "favorite": "", "mediaComments": ""})
        observations.append(_observation(job, empty, f"obs-{media_id}", deployment, media_id, row.get("event"),
                                         stamp, stamp, "media", row["label"], row["prob"], row.get("decision"),
                                         row.get("error")))
        if row.get("event") is not None:
            by_event.setdefault(row["event"], []).append((deployment, stamp))
    if job.aggregate:
        for k, event in enumerate(event_rows(job, rows), start=1):
            frames = by_event[event["event"]]
            stamps = sorted(s for _, s in frames if s)
            failed = "all frames unreadable" if event["label"] is None else None
            observations.append(_observation(job, empty, f"obs-event-{k:06d}", frames[0][0], "", event["event"],
                                             stamps[0] if stamps else "", stamps[-1] if stamps else "", "event",
                                             event["label"], event["prob"], event.get("decision"), failed))
    return media, observations


def _instant(stamp: str) -> float:
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:  # not ISO 8601: sorts last, kept as written
        return float("inf")


def deployment_rows(media: list[dict]) -> list[dict]:
    """One row per ``deploymentID`` of the media rows, by ID (so shards merge to the same table): its start and
    end are its first and last media timestamps. Where the camera stood is not in the images: left empty."""
    stamps: dict[str, list[str]] = {}
    for medium in media:
        stamps.setdefault(medium["deploymentID"], []).extend([medium["timestamp"]] if medium.get("timestamp") else [])
    rows = []
    for deployment, times in sorted(stamps.items()):
        times.sort(key=_instant)
        row = dict.fromkeys(DEPLOYMENT_COLUMNS, "")
        row.update(deploymentID=deployment, deploymentStart=times[0] if times else "",
                   deploymentEnd=times[-1] if times else "")
        rows.append(row)
    return rows


def temporal(deployments: list[dict]) -> dict | None:
    """The package's ``temporal`` metadata (first and last day) from the deployments' spans."""
    times = sorted((t for d in deployments for t in (d.get("deploymentStart"), d.get("deploymentEnd"))
                    if t and _instant(t) != float("inf")), key=_instant)
    return {"start": times[0][:10], "end": times[-1][:10]} if times else None


def package_extent(package: dict, deployments: list[dict], labels: list[str]) -> dict:
    """``package`` with the metadata imgcls can fill in: ``temporal`` and ``taxonomic`` (the model's classes
    other than the empty one)."""
    span = temporal(deployments)
    if span:
        package["temporal"] = span
    empty = empty_label(labels)
    package["taxonomic"] = [{"scientificName": label} for label in labels if label != empty]
    return package


def _observation(job, empty, obs_id, deployment, media_id, event, start, end, level, label, prob, decision, error):
    kind = _observation_type(label, decision, empty)
    comments = f"unreadable: {error}" if error else f"uncertain: {label} {prob}" if decision == UNCERTAIN else ""
    row = dict.fromkeys(OBSERVATION_COLUMNS, "")
    row.update(observationID=obs_id, deploymentID=deployment, mediaID=media_id, eventID=event or "",
               eventStart=start, eventEnd=end, observationLevel=level, observationType=kind,
               scientificName=label if kind == "animal" else "", classificationMethod="machine",
               classifiedBy=job.model, classificationTimestamp=job.finished,
               classificationProbability="" if prob is None else prob, observationComments=comments)
    return row


def csv_text(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def package_resources() -> list[dict]:
    """The three tables of a Camtrap DP 1.0 package, as ``datapackage.json`` lists them."""
    table = "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0/{}-table-schema.json"
    return [{"name": name, "path": f"{name}.csv", "profile": "tabular-data-resource", "format": "csv",
             "mediatype": "text/csv", "encoding": "utf-8", "schema": table.format(name)}
            for name in ("deployments", "media", "observations")]


def csv_dicts(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _write_camtrapdp(job: Job, rows: list[dict]) -> list[Path]:
    """``observations.csv``, ``media.csv`` (the ``--media`` file as given, else one row per image with the
    image's folder as its deployment), ``deployments.csv`` (the one beside ``--media`` as given, else one row
    per deployment) and ``datapackage.json``, each written atomically."""
    with ThreadPoolExecutor(max_workers=8) as pool:  # the EXIF header only
        times = [t for t, _ in pool.map(lambda r: capture_time(r.path), job.records)]
    media, observations = camtrap_tables(job, rows, times)
    if job.media:  # the deployments of the given table's rows for these inputs
        media = [{"deploymentID": m["deploymentID"], "timestamp": m.get("timestamp") or ""} for m in job.media.rows]
    deployments = deployment_rows(media)
    folder = job.out
    folder.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(folder / "observations.csv", csv_text(OBSERVATION_COLUMNS, observations))
    rundir.atomic_write(folder / "media.csv", job.media.text if job.media else csv_text(MEDIA_COLUMNS, media))
    given = job.media.deployments if job.media else None
    rundir.atomic_write(folder / "deployments.csv", given or csv_text(DEPLOYMENT_COLUMNS, deployments))
    package = {
        "profile": CAMTRAP_PROFILE, "name": folder.name.lower() or "imgcls-predictions", "created": job.finished,
        "resources": package_resources(),
        "imgcls": {"version": job.version, "model": job.model, "labels": job.labels,
                   "media": str(job.media.path) if job.media else None,
                   "deployments": ("deployments.csv beside --media" if given else "given by --media" if job.media
                                   else "the folder name of each image (its camera)"),
                   "to_complete": list(TO_COMPLETE[1:] if given else TO_COMPLETE),
                   "aggregate": job.aggregate, "fingerprint": job.fingerprint},
    }
    package_extent(package, csv_dicts(given) if given else deployments, job.labels)
    rundir.atomic_write(folder / "datapackage.json", json.dumps(package, indent=2, ensure_ascii=False))
    return [folder / name for name in ("observations.csv", "media.csv", "deployments.csv", "datapackage.json")]


def _check_camtrapdp(out: Path, count: Callable[[], int]) -> bool:
    try:
        return "imgcls" in json.loads((out / "datapackage.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- the formats


@dataclass(frozen=True)
class Format:
    """One output format: how rows stream, and what is written from all rows at the end."""

    name: str
    rows: type                                           # CsvRows or JsonlRows
    final: Callable[[Job, list[dict]], list[Path]] | None  # whole file(s) from the journal; None: the row file is it
    events: Callable[[Job, list[dict]], list[Path]] | None  # event rows beside (None: final writes them, or none)
    finished: Callable[[Path, Callable[[], int]], bool] | None = None  # a final output there is a finished run
                                                         # (given a function counting the inputs)
    folder: bool = False                                 # the output is a folder

    @property
    def whole(self) -> bool:
        return self.final is not None


FORMATS = {
    "csv": Format("csv", CsvRows, None, _write_events_csv),
    "jsonl": Format("jsonl", JsonlRows, None, _write_events_jsonl),
    # MegaDetector's format has no event level: per-image rows only
    "megadetector": Format("megadetector", JsonlRows, _write_megadetector, None, _check_megadetector),
    "camtrapdp": Format("camtrapdp", JsonlRows, _write_camtrapdp, None, _check_camtrapdp, folder=True),
}
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "megadetector", "": "camtrapdp"}


def resolve_format(out: Path, name: str | None) -> Format:
    """``--format``, else from the extension of ``--out``: a folder (no suffix, or an existing one) is camtrapdp."""
    if name is not None:
        if name not in FORMATS:
            raise UserError(f"unknown --format {name!r}; use {', '.join(FORMATS)}")
        return FORMATS[name]
    if out.is_dir():
        return FORMATS["camtrapdp"]
    suffix = out.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"--out {out}: cannot tell the format from {suffix!r}; name it .csv, .jsonl, .json"
                        f" (MegaDetector) or a folder (Camtrap DP), or give --format {'|'.join(FORMATS)}")
    return FORMATS[SUFFIXES[suffix]]


def check_output_path(out: Path, fmt: Format) -> None:
    try:
        mode = os.stat(out).st_mode
    except FileNotFoundError:
        return
    if fmt.folder and not stat.S_ISDIR(mode):
        raise UserError(f"{out} exists and is not a folder; --format camtrapdp writes a folder: choose another --out")
    if not fmt.folder and not stat.S_ISREG(mode):
        raise UserError(f"{out} exists and is not a regular file; --out must name a {fmt.name} file to write")


def output_files(out: Path, fmt: Format, aggregate: str | None) -> list[Path]:
    """The files a finished run leaves (the sidecar lists them)."""
    if fmt.folder:
        return [out / "observations.csv", out / "media.csv", out / "datapackage.json"]
    return [out, *([events_path(out)] if aggregate and fmt.events else [])]


def remove_stale_temps(files: list[Path]) -> None:
    """Remove the temp files (``rundir.atomic_write``'s ``.NAME.XXXXXXXX``) that a kill in the middle of
    writing one of ``files`` left beside it; called under the output lock, so none is being written."""
    for path in files:
        pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}")
        try:
            names = [e.name for e in os.scandir(path.parent) if pattern.fullmatch(e.name) and e.is_file()]
        except OSError:
            continue
        for name in names:
            (path.parent / name).unlink(missing_ok=True)


def check_final(job: Job, journal_kept: bool, resume: bool, overwrite: bool, count: Callable[[], int]) -> bool:
    """For a whole-file format: True when the output is already finished (nothing to do); UserErrors for an
    output that must not be replaced.  ``journal_kept``: the journal holds rows (an interrupted run);
    ``count``: counts the inputs."""
    out, fmt = job.out, job.format
    exists = out.exists() and (not fmt.folder or any(out.iterdir()))
    if not exists or overwrite or journal_kept:
        return False
    if not fmt.finished(out, count):
        raise UserError(f"{out} already exists and is not imgcls {fmt.name} output of these inputs; choose another"
                        " --out, or add --overwrite to replace it")
    if not resume:
        raise UserError(f"{out} already exists (a finished run); add --overwrite to predict again")
    return True


# --------------------------------------------------------------------------- --sort-into


def _link(src: Path, dest: Path) -> None:
    # a symbolic link works across drives (cards, network shares) where a hard link cannot, and shows
    # where the original lives
    os.symlink(os.path.abspath(src), dest)


def _same_link(src: Path, dest: Path) -> bool:
    return dest.is_symlink() and os.path.realpath(dest) == os.path.realpath(src)


def _same_copy(src: Path, dest: Path) -> bool:
    return dest.is_file() and not dest.is_symlink() and filecmp.cmp(src, dest, shallow=False)


SORT_MODES = {"link": (_link, _same_link), "copy": (shutil.copy2, _same_copy)}


def _folder_name(name: str) -> str:
    # a class name is a folder name here: no separators, no "." or ".."
    name = name.replace("/", "_").replace("\\", "_").strip()
    return "_" + name if name in ("", ".", "..") else name


def check_sort_into(dest: str | Path, inputs: list[str | Path]) -> None:
    """``--sort-into`` must lie outside the input folders: a later run would predict the sorted files too."""
    dest = os.path.abspath(dest)
    for item in inputs:
        folder = os.path.abspath(item)
        if os.path.isdir(folder) and (dest == folder or dest.startswith(folder.rstrip(os.sep) + os.sep)):
            raise UserError(f"--sort-into {dest} lies inside the input folder {item}; the next run would predict"
                            " the sorted files again: choose a folder outside it")


def sort_into(rows: list[dict], dest: str | Path, mode: str = "link") -> dict[str, int]:
    """Put every image into ``dest/<decision or label>/`` (``_failed`` for unreadable ones) as a link or a
    copy; the originals stay where they are.  A different file already there keeps its name: ours gets a
    suffix.  The same file already there (an earlier run) is left alone.  Returns images per folder."""
    if mode not in SORT_MODES:
        raise UserError(f"unknown sort mode {mode!r}; use {' or '.join(SORT_MODES)}")
    place, same = SORT_MODES[mode]
    dest = Path(dest)
    counts: dict[str, int] = {}
    for row in rows:
        src = Path(row["path"])
        folder = FAILED_FOLDER if row.get("error") or row.get("label") is None else \
            _folder_name(row.get("decision") or row["label"])
        target_dir = dest / folder
        target_dir.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(src):
            log.warning("--sort-into: %s no longer exists; not sorted", src)
            continue
        target, n = target_dir / src.name, 0
        while os.path.lexists(target) and not same(src, target):
            n += 1
            target = target_dir / f"{src.stem}_{n}{src.suffix}"
        if not os.path.lexists(target):
            place(src, target)
        counts[folder] = counts.get(folder, 0) + 1
    return counts
