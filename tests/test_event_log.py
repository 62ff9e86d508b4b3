"""Where a run's capture events came from is said in its log and help: COCO seq_id, a CSV column, EXIF times."""

import csv
import json

import numpy as np
from imagezoo import class_array, write_image

from imgcls.cli import build_parser
from imgcls.train.config import TrainConfig
from imgcls.train.prepare import split_dataset


def _frames(root, n=12):
    """``n`` small images, two classes, in bursts of three; (name, label, burst) each."""
    out = []
    for k in range(n):
        label = k // 3 % 2
        write_image(root / f"f{k}.jpg", array=class_array(label, 2, (32, 32), np.random.default_rng(k)))
        out.append((f"f{k}.jpg", ("deer", "fox")[label], f"b{k // 3}"))
    return out


def _events_line(caplog) -> str:
    return next(r.getMessage() for r in caplog.records if r.getMessage().startswith("capture events: 4 ("))


def test_coco_events_are_logged_as_seq_id(tmp_path, caplog):
    frames = _frames(tmp_path)
    data = {"images": [{"id": n, "file_name": n, "seq_id": b, "location": "A"} for n, _, b in frames],
            "categories": [{"id": 0, "name": "deer"}, {"id": 1, "name": "fox"}],
            "annotations": [{"id": k, "image_id": n, "category_id": ("deer", "fox").index(label)}
                            for k, (n, label, _) in enumerate(frames)]}
    (tmp_path / "cct.json").write_text(json.dumps(data))
    with caplog.at_level("INFO", logger="imgcls"):
        split_dataset(TrainConfig(data=str(tmp_path / "cct.json"), out="unused", val_fraction=0.5, event_gap=7))
    line = _events_line(caplog)
    assert "from the COCO file's seq_id, else its datetime within 7 s per location" in line, line


def test_csv_events_are_logged_with_their_column(tmp_path, caplog):
    frames = _frames(tmp_path)
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "burst", "group"), *((*f, f[2]) for f in frames)])
    with caplog.at_level("INFO", logger="imgcls"):
        split_dataset(TrainConfig(data=str(tmp_path / "labels.csv"), out="unused", val_fraction=0.5,
                                  event_column="burst"))
    assert "from the CSV's 'burst' column" in _events_line(caplog)
    caplog.clear()
    with caplog.at_level("INFO", logger="imgcls"):  # no --event-column: the CSV's group column
        split_dataset(TrainConfig(data=str(tmp_path / "labels.csv"), out="unused", val_fraction=0.5))
    assert "from the CSV's 'group' column" in _events_line(caplog)


def test_help_names_coco_input_and_datetime_gap():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.choices and "train" in a.choices)
    train = commands.choices["train"]
    data = next(a for a in train._actions if a.dest == "data")
    gap = next(a for a in train._actions if a.dest == "event_gap")
    assert "COCO Camera Traps" in data.help and "COCO datetime" in gap.help
    assert "COCO Camera Traps" in next(a.help for a in commands._choices_actions if a.dest == "train")
