"""Stratified (and grouped) train/validation splits with a fixed seed.

Written by hand rather than with scikit-learn's splitters because it must do
three things at once: stratify by class (a multi-label record by its rarest label,
so rare labels reach validation too), keep every shot of a trigger event
(``Record.group``) on one side, and guarantee each class at least one
validation image when it has two or more.
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict

from .records import Record


def split_records(records: list[Record], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Split into (train, val).  Groups stay whole; a group counts toward the
    class most of its records carry.  Rows naming the same file (however the
    path is spelled) count as one group, so a file never sits on both sides."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must lie strictly between 0 and 1")
    units: dict[str, list[Record]] = defaultdict(list)
    first: dict[str, int] = {}
    for i, record in enumerate(records):
        same_file = first.setdefault(os.path.abspath(record.path), i)
        units[record.group if record.group is not None else f"\0{same_file}"].append(record)
    stratum = _strata(records)
    by_class: dict[str, list[str]] = defaultdict(list)
    for key, members in units.items():
        majority = Counter(stratum(r) for r in members).most_common(1)[0][0]
        by_class[majority].append(key)

    rng = random.Random(seed)
    val_keys: set[str] = set()
    for label in sorted(by_class, key=str):
        keys = sorted(by_class[label])
        rng.shuffle(keys)
        if len(keys) < 2:
            continue
        n_val = min(len(keys) - 1, max(1, round(len(keys) * val_fraction)))
        val_keys.update(keys[:n_val])
    train = [r for key, members in units.items() if key not in val_keys for r in members]
    val = [r for key, members in units.items() if key in val_keys for r in members]
    return train, val


def _strata(records: list[Record]):
    """record -> the label it is stratified by: its label (a multi-output record's: its first column's), or
    for a multi-label record (``labels`` set) its rarest label overall (ties by name), so every label with
    two or more units reaches validation."""
    counts = Counter(label for r in records if r.labels is not None for label in r.labels)

    def stratum(record: Record):
        if record.outputs is not None:  # multi-output: the first (primary) column's value
            return record.label
        if record.labels is None or not record.labels:
            return record.label
        return min(record.labels, key=lambda label: (counts[label], label))

    return stratum
