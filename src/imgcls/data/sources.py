"""Data sources -> records.

Three labelled layouts are understood:

* a class-folder tree ``ROOT/<class>/**/<image>``, optionally split into
  ``ROOT/train``, ``ROOT/val`` (or ``valid``/``validation``) and ``ROOT/test``;
* a CSV file with a path column and a label column (names configurable; several
  label columns make multi-output records, :func:`output_columns`), paths relative
  to the CSV's folder; optional ``group`` (or ``--event-column``), ``camera`` (or
  ``site``) and ``split`` columns;
* a COCO Camera Traps ``.json`` (:func:`from_coco`): the label is the image's
  category, the group its sequence (``seq_id``), the camera its ``location``.

For prediction, inputs may be files, folders (searched recursively) or a CSV
of paths.  Nothing here opens an image: that is the scanner's and decoder's job.

Every CSV (labelled or a list of paths) is read by :func:`read_csv`, the one
CSV loader: regular files only (a FIFO never hangs it), UTF-8 text, the
delimiter detected (``,`` ``;`` tab ``|``), and every problem a UserError
naming the file and the line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .decode import open_regular
from .events import DEFAULT_GAP, group_events, parse_time
from .records import IMAGE_SUFFIXES, OUTPUT_SEP, SPLIT_NAMES, Record

log = logging.getLogger("imgcls")

DELIMITERS = ",;\t|"


@dataclass
class Dataset:
    """Labelled records, grouped by the split they came with (if any)."""

    splits: dict[str, list[Record]] = field(default_factory=dict)
    source: str = ""

    @property
    def classes(self) -> list[str]:
        return sorted({r.label for records in self.splits.values() for r in records if r.label is not None})


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_tree(root: Path) -> list[Record]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = _images_under(root)
        hint = f" It holds {len(loose)} images but no class folders." if loose else ""
        raise UserError(f"{root}: no class folders found.{hint} Put each class's images in ROOT/<class>/, or pass a CSV.")
    records: list[Record] = []
    for class_dir in class_dirs:
        images = _images_under(class_dir)
        if not images:
            raise UserError(f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))});"
                            " add images or remove the folder")
        records.extend(Record(path, class_dir.name) for path in images)
    return records


def from_folder(root: str | Path) -> Dataset:
    root = Path(root)
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    split_dirs = {SPLIT_NAMES[name]: path for name, path in subdirs.items() if name in SPLIT_NAMES}
    if "train" in split_dirs:
        return Dataset({split: _class_tree(path) for split, path in split_dirs.items()}, str(root))
    return Dataset({"all": _class_tree(root)}, str(root))


CAMERA_COLUMNS = ("camera", "site")  # first found: where each image was taken (events are per camera)


def from_csv(path: str | Path, path_column: str = "path", label_column: str = "label",
             group_column: str = "group", event_column: str | None = None) -> Dataset:
    """``event_column``: the column naming each image's capture event (its group), instead of
    ``group_column``.  ``label_column`` naming several columns (``species,count``) reads a multi-output
    record per row (:attr:`Record.outputs`): an empty cell is a missing value of that column only."""
    path = Path(path)
    base = path.parent
    columns, rows = read_csv(path)
    label_columns = output_columns(label_column)
    missing = [c for c in (path_column, *label_columns) if c not in columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; it has {', '.join(columns) or 'no header'}."
                        " Name the right ones with --path-column / --label-column")
    if event_column is not None:
        if event_column not in columns:
            raise UserError(f"{path}: no column {event_column!r} for --event-column; it has {', '.join(columns)}")
        group_column = event_column
    camera_column = next((c for c in CAMERA_COLUMNS if c in columns), None)
    splits: dict[str, list[Record]] = {}
    unknown: dict[str, int] = {}  # split value -> first line
    for line_no, row in rows:
        raw = (row.get(path_column) or "").strip()
        values = tuple((name, (row.get(name) or "").strip() or None) for name in label_columns)
        label = values[0][1]
        if not raw or not any(value for _, value in values):
            raise UserError(f"{path}:{line_no}: empty {path_column if not raw else label_column!r}; fill it or drop the row")
        value = (row.get("split") or "").strip()
        split = SPLIT_NAMES.get(value.lower(), "all") if value else "all"
        if value and value.lower() not in SPLIT_NAMES:
            unknown.setdefault(value, line_no)
        group = (row.get(group_column) or "").strip() or None
        camera = (row.get(camera_column) or "").strip() or None if camera_column else None
        file = Path(raw) if Path(raw).is_absolute() else base / raw
        splits.setdefault(split, []).append(Record(file, label, group, camera,
                                                   outputs=values if len(label_columns) > 1 else None))
    if unknown:
        first = min(unknown.values())
        raise UserError(f"{path}:{first}: unknown split value(s) {', '.join(sorted(unknown))} in the split column;"
                        f" use train, val or test ({', '.join(sorted(SPLIT_NAMES))} are understood) or leave it empty")
    if not splits:
        raise UserError(f"{path}: the CSV has a header but no rows")
    if "all" in splits and len(splits) > 1:
        raise UserError(f"{path}: some rows have a split (train/val/test) and some don't; give every row one or none")
    return Dataset(splits, str(path))


def output_columns(label_column: str) -> list[str]:
    """``--label-column`` as its columns: one, or several joined by commas (a multi-output model's heads,
    the first the primary); a UserError for an empty or repeated name."""
    names = [c.strip() for c in label_column.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise UserError(f"--label-column {label_column!r}: give one column, or several distinct ones joined by"
                        " commas (species,count,behaviour)")
    if len(names) > 1:
        bad = [n for n in names if OUTPUT_SEP in n or n in ("path", "error")]
        if bad:
            raise UserError(f"--label-column: the output name(s) {', '.join(bad)} cannot be used (no {OUTPUT_SEP!r},"
                            " not path or error: they name prediction columns); rename the CSV column(s)")
    return names


def read_csv(path: Path) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """(header columns, iterator of (line number, row dict)) of a CSV file; UserErrors name file and line."""
    text = _csv_text(path)
    delimiter = _delimiter(path, text)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = _csv_step(path, reader, lambda: reader.fieldnames) or []
    return [c.strip() if c else c for c in columns], _csv_rows(path, reader)


def _csv_text(path: Path) -> str:
    try:
        with open_regular(path) as handle:
            data = handle.read()
    except OSError as err:
        raise UserError(f"{path}: cannot read the CSV ({err.strerror or err}); pass a regular, readable file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the CSV as UTF-8"
                        " (in a spreadsheet: CSV UTF-8)") from None


def _delimiter(path: Path, text: str) -> str:
    """The delimiter: the one candidate in the header line, else csv.Sniffer's pick among those it has."""
    header = text.split("\n", 1)[0]
    found = [d for d in DELIMITERS if d in header]
    if len(found) <= 1:
        return found[0] if found else ","  # one column: any delimiter reads it
    try:
        return csv.Sniffer().sniff(text[:65536], delimiters="".join(found)).delimiter
    except csv.Error:
        raise UserError(f"{path}: cannot tell the delimiter: the header has {' and '.join(map(repr, found))};"
                        " use commas (or quote the column names)") from None


def _csv_rows(path: Path, reader: csv.DictReader) -> Iterator[tuple[int, dict]]:
    while True:
        line = reader.line_num + 1  # where the next record starts
        row = _csv_step(path, reader, lambda: next(reader, None), line)
        if row is None:
            return
        yield line, {k.strip() if isinstance(k, str) else k: v for k, v in row.items()}


def _csv_step(path: Path, reader, step, line: int | None = None):
    try:
        return step()
    except csv.Error as err:
        where = f"{path}:{line or reader.line_num or 1}"
        if "field larger than field limit" in str(err):
            raise UserError(f"{where}: a field is longer than {csv.field_size_limit()} characters"
                            " (a quote left open?); close the quote or shorten the field") from None
        raise UserError(f"{where}: not a readable CSV ({err}); fix the line or save the file again as CSV") from None


def _read_json(path: Path, what: str):
    """A JSON file's value; every problem a UserError naming the file (and the line)."""
    try:
        with open_regular(path) as handle:
            data = handle.read()
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror or err}); pass a regular, readable file") from None
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start});"
                        f" save the {what} as UTF-8") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}); fix the"
                        f" {what} there") from None


def _coco_list(path: Path, data: dict, key: str, fields: tuple[str, ...]) -> list[dict]:
    """``data[key]``: a list of objects that each have ``fields`` (ids: text or whole numbers)."""
    items = data.get(key)
    if not isinstance(items, list):
        raise UserError(f"{path}: {key!r} must be a list of objects (COCO Camera Traps); it is"
                        f" {type(items).__name__ if key in data else 'missing'}")
    for k, item in enumerate(items):
        missing = [f for f in fields if not isinstance(item, dict) or item.get(f) in (None, "")]
        if missing:
            raise UserError(f"{path}: {key}[{k}] has no {', '.join(map(repr, missing))}; every entry of {key!r}"
                            f" needs {', '.join(map(repr, fields))}")
        odd = [f for f in fields if f.endswith("id") and not isinstance(item[f], (str, int))]
        if odd:
            raise UserError(f"{path}: {key}[{k}] has {odd[0]} {item[odd[0]]!r}; ids are text or whole numbers")
    return items


def _examples(items: list, n: int = 3) -> str:
    return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")


def from_coco(path: str | Path, event_gap: float = DEFAULT_GAP) -> Dataset:
    """A COCO Camera Traps file -> records: label = the image's category name, group = its
    ``seq_id``, camera = its ``location``.  ``file_name`` is relative to the JSON's folder.

    An image without a ``seq_id`` joins the frames of its location taken within ``event_gap``
    seconds, timed by its ``datetime`` (else by the file).  Images without an annotation, and images
    whose annotations name different categories, are left out and counted in the log."""
    path = Path(path)
    data = _read_json(path, "COCO Camera Traps file")
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise UserError(f"{path}: not a COCO Camera Traps file: the top level needs 'images' and 'annotations'"
                        " (and 'categories'); a .json of labelled images must have that form")
    images = _coco_list(path, data, "images", ("id", "file_name"))
    annotations = _coco_list(path, data, "annotations", ("image_id", "category_id"))
    categories = _coco_list(path, data, "categories", ("id", "name"))
    names = {c["id"]: str(c["name"]) for c in categories}
    by_id: dict = {}
    for k, image in enumerate(images):
        if image["id"] in by_id:
            raise UserError(f"{path}: images[{k}] repeats the image id {image['id']!r}; ids must be unique")
        by_id[image["id"]] = image
    labels: dict = {}  # image id -> its categories' names, in order
    for k, ann in enumerate(annotations):
        if ann["category_id"] not in names:
            raise UserError(f"{path}: annotations[{k}] names category_id {ann['category_id']!r}, which is not in"
                            f" 'categories' (ids {_examples(sorted(names, key=str), 10)}); add the category or fix"
                            " the annotation")
        if ann["image_id"] not in by_id:
            raise UserError(f"{path}: annotations[{k}] names image_id {ann['image_id']!r}, which is not in"
                            " 'images'; add the image or drop the annotation")
        labels.setdefault(ann["image_id"], []).append(names[ann["category_id"]])
    unannotated = [image["file_name"] for image in images if image["id"] not in labels]
    conflicting = [f"{by_id[i]['file_name']} ({' + '.join(sorted(set(found)))})"
                   for i, found in labels.items() if len(set(found)) > 1]
    if unannotated:
        log.warning("%s: %d images have no annotation and are left out (unlabelled): %s", path, len(unannotated),
                    _examples(unannotated))
    if conflicting:
        log.warning("%s: %d images have annotations of different categories and are left out (one label per"
                    " image is supported): %s", path, len(conflicting), _examples(conflicting))
    records: list[Record] = []
    times: list[float | None] = []
    odd_times: list[str] = []
    for image in images:
        found = labels.get(image["id"])
        if not found or len(set(found)) > 1:
            continue
        raw = str(image["file_name"])
        file = Path(raw) if Path(raw).is_absolute() else path.parent / raw
        seq = image.get("seq_id")
        location = image.get("location")
        records.append(Record(file, found[0], None if seq in (None, "") else str(seq),
                              None if location in (None, "") else str(location)))
        when = image.get("datetime")
        times.append(parse_time(when))
        if when not in (None, "") and times[-1] is None:
            odd_times.append(f"{raw} ({when!r})")
    if not records:
        raise UserError(f"{path}: no image has an annotation ({len(images)} images, {len(annotations)} annotations);"
                        " nothing to train or evaluate on")
    if odd_times:
        log.warning("%s: %d images have a datetime that is not a date and time (use 'YYYY-MM-DD HH:MM:SS');"
                    " their files' times are used: %s", path, len(odd_times), _examples(odd_times))
    loose = [i for i, r in enumerate(records) if r.group is None]
    if loose:  # no sequence: the frames of one location close in time are one event, as for EXIF times
        grouped, report = group_events([records[i] for i in loose], event_gap, times=[times[i] for i in loose])
        for i, record in zip(loose, grouped):
            records[i] = record
        log.info("%s: %d images without a seq_id grouped into %d events by time (within %g s per location;"
                 " %d by their datetime)", path, len(loose), report.events, event_gap, report.given_times)
    log.info("%s: %d labelled images in %d sequences/events, %d locations", path, len(records),
             len({r.group for r in records}), len({r.camera for r in records if r.camera is not None}))
    return Dataset({"all": records}, str(path))


def _load_folder(data: Path, path_column: str, label_column: str, event_column: str | None,
                 event_gap: float) -> Dataset:
    if event_column is not None:
        raise UserError(f"--event-column {event_column} needs a CSV; {data} is a folder (its events come from"
                        " the images' EXIF times)")
    return from_folder(data)


def _load_csv(data: Path, path_column: str, label_column: str, event_column: str | None,
              event_gap: float) -> Dataset:
    return from_csv(data, path_column, label_column, event_column=event_column)


def _load_coco(data: Path, path_column: str, label_column: str, event_column: str | None,
               event_gap: float) -> Dataset:
    if event_column is not None:
        raise UserError(f"--event-column {event_column} needs a CSV; {data} is a COCO Camera Traps file (its events"
                        " are its sequences, seq_id)")
    return from_coco(data, event_gap)


# labelled sources by file suffix (a folder is a class tree); a new format is one entry
LOADERS = {".csv": _load_csv, ".json": _load_coco}


def load_dataset(data: str | Path, path_column: str = "path", label_column: str = "label",
                 event_column: str | None = None, event_gap: float = DEFAULT_GAP) -> Dataset:
    """A folder tree, a CSV or a COCO Camera Traps JSON -> :class:`Dataset`, with errors that say what
    to fix.  ``event_gap``: seconds between frames of one event, for COCO images without a sequence."""
    data = Path(data)
    if not data.exists():
        raise UserError(f"{data}: no such file or folder")
    loader = _load_folder if data.is_dir() else LOADERS.get(data.suffix.lower())
    if loader is None:
        raise UserError(f"{data}: expected a folder of class folders, a .csv file or a COCO Camera Traps .json")
    if loader is not _load_csv and len(output_columns(label_column)) > 1:
        raise UserError(f"--label-column {label_column}: several label columns (a multi-output model) need a CSV;"
                        f" {data} is {'a folder' if data.is_dir() else 'a COCO Camera Traps file'}")
    return loader(data, path_column, label_column, event_column, event_gap)


def collect_inputs(inputs: list[str | Path], path_column: str = "path") -> list[Record]:
    """Files, folders (recursive) or CSVs of paths -> unlabelled records, in the given order (a list:
    :func:`iter_inputs` is the lazy form)."""
    records = list(iter_inputs(inputs, path_column))
    if not records:
        raise UserError(f"no images found in {', '.join(map(str, inputs))}")
    return records


def iter_inputs(inputs: list[str | Path], path_column: str = "path") -> Iterator[Record]:
    """:func:`collect_inputs` one record at a time: folders walked lazily, CSVs read as a stream."""
    return (record for record, _ in keyed_inputs(inputs, path_column))


def keyed_inputs(inputs: list[str | Path], path_column: str = "path") -> Iterator[tuple[Record, str]]:
    """``(record, key)`` per input image, lazily, in the order of :func:`collect_inputs`; ``key`` is the
    path relative to the input it came from (a folder: below it; a CSV: as written there; a file: its
    name), so it stays the same from another working directory or after the data moved.

    Every input is checked first (it exists; a CSV has ``path_column``): the mistakes a user can fix
    surface before the first record.  Memory does not grow with the number of files: a folder is
    walked one directory at a time (``os.scandir``, each directory's names sorted, which is the order
    of ``sorted(folder.rglob("*"))``), a CSV read row by row."""
    items = [Path(item) for item in inputs]
    for item in items:
        if not item.exists():
            raise UserError(f"{item}: no such file or folder")
        if not item.is_dir() and item.suffix.lower() == ".csv":
            _csv_path_header(item, path_column)
    return _keyed(items, path_column)


def _keyed(items: list[Path], path_column: str) -> Iterator[tuple[Record, str]]:
    for item in items:
        if item.is_dir():
            for path, key in _walk(str(item), ""):
                yield Record(Path(path)), key
        elif item.suffix.lower() == ".csv":
            for raw in _csv_paths(item, path_column):
                yield Record(Path(raw) if Path(raw).is_absolute() else item.parent / raw), raw
        else:
            yield Record(item), item.name


def _walk(folder: str, prefix: str) -> Iterator[tuple[str, str]]:
    """(path, path below the walked root) of the images under ``folder``, hidden files and folders left
    out, symbolic links to folders not followed; one directory's names in memory at a time."""
    try:
        with os.scandir(folder) as entries:
            names, folders = [], set()
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    folders.add(entry.name)
                    names.append(entry.name)
                elif is_image_file(Path(entry.name)) and entry.is_file():
                    names.append(entry.name)
    except OSError as err:  # an unreadable folder: its images cannot be predicted, the others can
        log.warning("%s: cannot list this folder (%s); its images are left out", folder, err.strerror or err)
        return
    names.sort()  # a folder's contents sort where its name does: sorted(rglob) order
    for name in names:
        path, key = os.path.join(folder, name), f"{prefix}{name}"
        if name in folders:
            yield from _walk(path, key + "/")
        else:
            yield path, key


def _csv_path_header(path: Path, path_column: str) -> str:
    """The delimiter of a CSV of paths, after checking that it has ``path_column``."""
    try:
        with open_regular(path) as handle:
            head = handle.read(65536)
    except OSError as err:
        raise UserError(f"{path}: cannot read the CSV ({err.strerror or err}); pass a regular, readable file") from None
    text = head.decode("utf-8-sig", "replace")
    delimiter = _delimiter(path, text)
    header = text.split("\n", 1)[0]
    columns = [c.strip() for c in next(csv.reader([header.rstrip("\r")], delimiter=delimiter), [])]
    if path_column not in columns:
        raise UserError(f"{path}: no {path_column!r} column; it has {', '.join(columns) or 'no header'}")
    return delimiter


def _csv_paths(path: Path, path_column: str) -> Iterator[str]:
    """The non-empty ``path_column`` values of a CSV, read as a stream (errors as :func:`read_csv`'s)."""
    delimiter = _csv_path_header(path, path_column)
    try:
        handle = open_regular(path)
    except OSError as err:
        raise UserError(f"{path}: cannot read the CSV ({err.strerror or err}); pass a regular, readable file") from None
    with io.TextIOWrapper(handle, encoding="utf-8-sig", newline="") as text:
        reader = csv.DictReader(text, delimiter=delimiter)
        try:
            columns = [c.strip() if c else c for c in _csv_step(path, reader, lambda: reader.fieldnames) or []]
            if path_column not in columns:
                raise UserError(f"{path}: no {path_column!r} column; it has {', '.join(columns) or 'no header'}")
            for _, row in _csv_rows(path, reader):
                raw = (row.get(path_column) or "").strip()
                if raw:
                    yield raw
        except UnicodeDecodeError:
            _csv_text(path)  # the whole file once, to name the line that is not UTF-8
            raise
