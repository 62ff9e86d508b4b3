"""Data sources -> records.

Two labelled layouts are understood:

* a class-folder tree ``ROOT/<class>/**/<image>``, optionally split into
  ``ROOT/train``, ``ROOT/val`` (or ``valid``/``validation``) and ``ROOT/test``;
* a CSV file with a path column and a label column (names configurable),
  paths relative to the CSV's folder; optional ``group`` (or ``--event-column``),
  ``camera`` (or ``site``) and ``split`` columns.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .decode import open_regular
from .records import IMAGE_SUFFIXES, Record

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
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
    ``group_column``."""
    path = Path(path)
    base = path.parent
    columns, rows = read_csv(path)
    missing = [c for c in (path_column, label_column) if c not in columns]
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
        label = (row.get(label_column) or "").strip()
        if not raw or not label:
            raise UserError(f"{path}:{line_no}: empty {path_column if not raw else label_column!r}; fill it or drop the row")
        value = (row.get("split") or "").strip()
        split = SPLIT_NAMES.get(value.lower(), "all") if value else "all"
        if value and value.lower() not in SPLIT_NAMES:
            unknown.setdefault(value, line_no)
        group = (row.get(group_column) or "").strip() or None
        camera = (row.get(camera_column) or "").strip() or None if camera_column else None
        file = Path(raw) if Path(raw).is_absolute() else base / raw
        splits.setdefault(split, []).append(Record(file, label, group, camera))
    if unknown:
        first = min(unknown.values())
        raise UserError(f"{path}:{first}: unknown split value(s) {', '.join(sorted(unknown))} in the split column;"
                        f" use train, val or test ({', '.join(sorted(SPLIT_NAMES))} are understood) or leave it empty")
    if not splits:
        raise UserError(f"{path}: the CSV has a header but no rows")
    if "all" in splits and len(splits) > 1:
        raise UserError(f"{path}: some rows have a split (train/val/test) and some don't; give every row one or none")
    return Dataset(splits, str(path))


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


def load_dataset(data: str | Path, path_column: str = "path", label_column: str = "label",
                 event_column: str | None = None) -> Dataset:
    """A folder tree or a CSV -> :class:`Dataset`, with errors that say what to fix."""
    data = Path(data)
    if not data.exists():
        raise UserError(f"{data}: no such file or folder")
    if data.is_dir():
        if event_column is not None:
            raise UserError(f"--event-column {event_column} needs a CSV; {data} is a folder (its events come from"
                            " the images' EXIF times)")
        return from_folder(data)
    if data.suffix.lower() == ".csv":
        return from_csv(data, path_column, label_column, event_column=event_column)
    raise UserError(f"{data}: expected a folder of class folders or a .csv file")


def collect_inputs(inputs: list[str | Path], path_column: str = "path") -> list[Record]:
    """Files, folders (recursive) or CSVs of paths -> unlabelled records, in the given order."""
    records: list[Record] = []
    for item in inputs:
        item = Path(item)
        if not item.exists():
            raise UserError(f"{item}: no such file or folder")
        if item.is_dir():
            records.extend(Record(p) for p in _images_under(item))
        elif item.suffix.lower() == ".csv":
            columns, rows = read_csv(item)
            if path_column not in columns:
                raise UserError(f"{item}: no {path_column!r} column; it has {', '.join(columns) or 'no header'}")
            for _, row in rows:
                raw = (row[path_column] or "").strip()
                if raw:
                    records.append(Record(Path(raw) if Path(raw).is_absolute() else item.parent / raw))
        else:
            records.append(Record(item))
    if not records:
        raise UserError(f"no images found in {', '.join(map(str, inputs))}")
    return records
