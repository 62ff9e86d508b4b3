"""Data sources -> records.

Two labelled layouts are understood:

* a class-folder tree ``ROOT/<class>/**/<image>``, optionally split into
  ``ROOT/train``, ``ROOT/val`` (or ``valid``/``validation``) and ``ROOT/test``;
* a CSV file with a path column and a label column (names configurable),
  paths relative to the CSV's folder; optional ``group`` and ``split`` columns.

For prediction, inputs may be files, folders (searched recursively) or a CSV
of paths.  Nothing here opens an image: that is the scanner's and decoder's job.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .records import IMAGE_SUFFIXES, Record

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


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


def from_csv(path: str | Path, path_column: str = "path", label_column: str = "label",
             group_column: str = "group") -> Dataset:
    path = Path(path)
    base = path.parent
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in (path_column, label_column) if c not in columns]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}; it has {', '.join(columns) or 'no header'}."
                            " Name the right ones with --path-column / --label-column")
        splits: dict[str, list[Record]] = {}
        for line_no, row in enumerate(reader, start=2):
            raw = (row.get(path_column) or "").strip()
            label = (row.get(label_column) or "").strip()
            if not raw or not label:
                raise UserError(f"{path}:{line_no}: empty {path_column if not raw else label_column!r}; fill it or drop the row")
            split = SPLIT_NAMES.get((row.get("split") or "").strip().lower(), "all")
            group = (row.get(group_column) or "").strip() or None
            file = Path(raw) if Path(raw).is_absolute() else base / raw
            splits.setdefault(split, []).append(Record(file, label, group))
    if not splits:
        raise UserError(f"{path}: the CSV has a header but no rows")
    if "all" in splits and len(splits) > 1:
        raise UserError(f"{path}: some rows have a split (train/val/test) and some don't; give every row one or none")
    return Dataset(splits, str(path))


def load_dataset(data: str | Path, path_column: str = "path", label_column: str = "label") -> Dataset:
    """A folder tree or a CSV -> :class:`Dataset`, with errors that say what to fix."""
    data = Path(data)
    if not data.exists():
        raise UserError(f"{data}: no such file or folder")
    if data.is_dir():
        return from_folder(data)
    if data.suffix.lower() == ".csv":
        return from_csv(data, path_column, label_column)
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
            with item.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                if path_column not in (reader.fieldnames or []):
                    raise UserError(f"{item}: no {path_column!r} column; it has {', '.join(reader.fieldnames or [])}")
                for row in reader:
                    raw = (row[path_column] or "").strip()
                    if raw:
                        records.append(Record(Path(raw) if Path(raw).is_absolute() else item.parent / raw))
        else:
            records.append(Record(item))
    if not records:
        raise UserError(f"no images found in {', '.join(map(str, inputs))}")
    return records
