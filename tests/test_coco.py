"""COCO Camera Traps JSON as a labelled source: records, sequences as events, training and eval end to end."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from imagezoo import class_array, write_image

from imgcls.data.events import parse_time
from imgcls.data.sources import load_dataset
from imgcls.errors import UserError
from imgcls.train.config import TrainConfig
from imgcls.train.prepare import split_dataset

CATEGORIES = [{"id": 0, "name": "empty"}, {"id": 1, "name": "deer"}, {"id": 2, "name": "fox"}]
IDS = {c["name"]: c["id"] for c in CATEGORIES}


def _write(root: Path, images: list[dict], annotations: list[tuple[str, str]], name="cct.json") -> Path:
    """A COCO Camera Traps file over ``images`` (their ``file_name``s written as small images unless broken)."""
    for k, image in enumerate(images):
        file = root / image["file_name"]
        if image.pop("broken", False):
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(b"\xff\xd8\xff not a jpeg")
        elif not file.exists():
            write_image(file, array=class_array(image.pop("cls", 0), 2, (32, 32), np.random.default_rng(k)))
        image.pop("cls", None)
    data = {"info": {"version": "1.0"}, "images": images, "categories": CATEGORIES,
            "annotations": [{"id": f"a{k}", "image_id": image_id, "category_id": IDS[label]}
                            for k, (image_id, label) in enumerate(annotations)]}
    path = root / name
    path.write_text(json.dumps(data))
    return path


def _small(root: Path) -> Path:
    images, annotations = [], []

    def add(name, label, seq=None, location=None, when=None, **extra):
        image = {"id": name, "file_name": f"{location or 'x'}/{name}.jpg", **extra}
        for key, value in (("seq_id", seq), ("location", location), ("datetime", when)):
            if value is not None:
                image[key] = value
        images.append(image)
        if label:
            for one in label.split("+"):
                annotations.append((name, one))

    for k in range(3):
        add(f"s1_{k}", "deer", "s1", "A", f"2024-05-01 10:00:0{k}", seq_num_frames=3, frame_num=k)
    for k in range(2):
        add(f"s2_{k}", "fox", "s2", "A", f"2024-05-01 11:00:0{k}")
    add("s3_0", "deer", "s3", 7, None)               # a numeric location, no time
    add("s3_1", "deer+deer", "s3", 7, None)           # two annotations that agree: kept
    add("t1", "fox", None, "B", "2024-05-01T12:00:00")        # no seq_id: grouped by datetime (ISO)
    add("t2", "fox", None, "B", "2024-05-01 12:00:05")        # 5 s later at the same location: same event
    add("t3", "fox", None, "B", "2024-05-01 13:00:00")        # an hour later: another event
    add("t4", "fox", None, "C", "2024-05-01 12:00:04+00:00")  # same minute, other location: its own event
    add("unlabelled", "", "s9", "A")
    add("both", "deer+fox", "s9", "A")
    add("broken", "deer", "s4", "A", broken=True)
    return _write(root, images, annotations)


def test_coco_records_groups_and_cameras(tmp_path, caplog):
    with caplog.at_level("INFO", logger="imgcls"):
        ds = load_dataset(_small(tmp_path))
    (records,) = ds.splits.values()
    by_name = {r.path.stem: r for r in records}
    assert set(by_name) == {"s1_0", "s1_1", "s1_2", "s2_0", "s2_1", "s3_0", "s3_1", "t1", "t2", "t3", "t4", "broken"}
    assert by_name["s1_0"].path == tmp_path / "A" / "s1_0.jpg"
    assert ds.classes == ["deer", "fox"]
    assert {n: r.label for n, r in by_name.items() if n.startswith("s")} == {
        "s1_0": "deer", "s1_1": "deer", "s1_2": "deer", "s2_0": "fox", "s2_1": "fox", "s3_0": "deer", "s3_1": "deer"}
    assert [by_name[f"s1_{k}"].group for k in range(3)] == ["s1"] * 3 and by_name["s3_1"].group == "s3"
    assert by_name["broken"].group == "s4"  # a corrupt file is a record: the scan or eval reports it
    assert by_name["s1_0"].camera == "A" and by_name["s3_0"].camera == "7" and by_name["t1"].camera == "B"
    timed = [by_name[n].group for n in ("t1", "t2", "t3", "t4")]
    assert timed[0] == timed[1] and len(set(timed)) == 3 and not set(timed) & {"s1", "s2", "s3", "s4"}
    assert "1 images have no annotation and are left out (unlabelled): A/unlabelled.jpg" in caplog.text
    assert "1 images have annotations of different categories and are left out" in caplog.text
    assert "A/both.jpg (deer + fox)" in caplog.text
    assert "4 images without a seq_id grouped into 3 events" in caplog.text
    # a shorter gap splits t1 from t2
    (records,) = load_dataset(tmp_path / "cct.json", event_gap=2).splits.values()
    assert len({r.group for r in records if r.path.stem.startswith("t")}) == 4


def test_images_without_seq_or_datetime_are_timed_by_their_files(tmp_path, caplog):
    from PIL import Image

    stamps = ["2024:05:01 10:00:00", "2024:05:01 10:00:03", "2024:05:01 11:00:00"]
    for k, when in enumerate(stamps):  # EXIF times in the files
        exif = Image.Exif()
        exif.get_ifd(0x8769)[36867] = when
        (tmp_path / "cam").mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), (k * 50, 0, 0)).save(tmp_path / "cam" / f"{k}.jpg", exif=exif)
    images = [{"id": k, "file_name": f"cam/{k}.jpg", "location": "L1", "datetime": bad}
              for k, bad in enumerate(["not a date", None, ""])]
    path = _write(tmp_path, images, [(0, "deer"), (1, "fox"), (2, "fox")])
    with caplog.at_level("WARNING", logger="imgcls"):
        (records,) = load_dataset(path).splits.values()
    assert records[0].group == records[1].group != records[2].group
    assert "1 images have a datetime that is not a date and time" in caplog.text and "'not a date'" in caplog.text


def test_datetimes_in_the_usual_forms():
    base = parse_time("2024-05-01 10:00:00")
    assert base == 1714557600.0
    for text, offset in [("2024-05-01T10:00:00", 0), ("2024-05-01 10:00:00.500", 0.5), ("2024-05-01T10:00:00Z", 0),
                         ("2024-05-01T12:00:00+02:00", 0), ("2024:05:01 10:00:07", 7), (" 2024-05-01 10:00:01 ", 1)]:
        assert parse_time(text) == base + offset, text
    for junk in ("", "yesterday", "2024-13-01 10:00:00", None, 1714557600, "0000:00:00 00:00:00"):
        assert parse_time(junk) is None


def _broken(tmp_path, case):
    image = {"id": 1, "file_name": "a.jpg"}
    data = {"images": [image], "annotations": [{"image_id": 1, "category_id": 1}], "categories": CATEGORIES}
    text = {
        "syntax": '{"images": [], "annotations": [,]}',
        "not_cct": json.dumps({"info": {}, "licenses": []}),
        "list": json.dumps([1, 2]),
        "no_categories": json.dumps({"images": [image], "annotations": []}),
        "no_file_name": json.dumps({**data, "images": [{"id": 1, "file_name": ""}]}),
        "no_category_id": json.dumps({**data, "annotations": [{"image_id": 1}]}),
        "unknown_category": json.dumps({**data, "annotations": [{"image_id": 1, "category_id": 9}]}),
        "unknown_image": json.dumps({**data, "annotations": [{"image_id": 5, "category_id": 1}]}),
        "duplicate_id": json.dumps({**data, "images": [image, image]}),
        "odd_id": json.dumps({**data, "images": [{"id": [1], "file_name": "a.jpg"}]}),
        "nothing_labelled": json.dumps({**data, "annotations": []}),
        "not_utf8": None,
    }[case]
    path = tmp_path / "cct.json"
    if text is None:
        path.write_bytes(b'{"images": "\xff"}')
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("case, message", [
    ("syntax", r"cct.json:1: not valid JSON \(Expecting value, column 32\)"),
    ("not_cct", "not a COCO Camera Traps file: the top level needs 'images' and 'annotations'"),
    ("list", "not a COCO Camera Traps file"),
    ("no_categories", "'categories' must be a list of objects .* it is missing"),
    ("no_file_name", r"images\[0\] has no 'file_name'; every entry of 'images' needs 'id', 'file_name'"),
    ("no_category_id", r"annotations\[0\] has no 'category_id'"),
    ("unknown_category", r"annotations\[0\] names category_id 9, which is not in 'categories' \(ids 0, 1, 2\)"),
    ("unknown_image", r"annotations\[0\] names image_id 5, which is not in 'images'"),
    ("duplicate_id", r"images\[1\] repeats the image id 1"),
    ("odd_id", r"images\[0\] has id \[1\]; ids are text or whole numbers"),
    ("nothing_labelled", "no image has an annotation"),
    ("not_utf8", "not UTF-8 text"),
])
def test_broken_coco_files_name_the_file_and_the_fix(tmp_path, case, message):
    path = _broken(tmp_path, case)
    with pytest.raises(UserError, match=message) as err:
        load_dataset(path)
    assert str(path) in str(err.value)


def test_event_column_and_other_suffixes(tmp_path):
    path = _small(tmp_path)
    with pytest.raises(UserError, match="--event-column seq needs a CSV; .* is a COCO Camera Traps file"):
        load_dataset(path, event_column="seq")
    (tmp_path / "data.yaml").write_text("x: 1")
    with pytest.raises(UserError, match="expected a folder of class folders, a .csv file or a COCO Camera Traps"):
        load_dataset(tmp_path / "data.yaml")


def _learnable(root: Path, locations=4, sequences=3, frames=3) -> tuple[Path, dict]:
    """Sequences of 3 frames at 4 locations, each sequence one class (a tiny CNN tells them apart)."""
    images, annotations, truth = [], [], {}
    rng = np.random.default_rng(0)
    for loc in range(locations):
        for s in range(sequences):
            label = ("deer", "fox")[(loc + s) % 2]
            for f in range(frames):
                name = f"L{loc}/seq{s}_{f}.jpg"
                write_image(root / name, array=class_array(("deer", "fox").index(label), 2, (32, 32), rng))
                images.append({"id": name, "file_name": name, "seq_id": f"L{loc}S{s}", "location": f"L{loc}",
                               "datetime": f"2024-06-0{loc + 1} {10 + s}:00:0{f}", "frame_num": f,
                               "seq_num_frames": frames})
                annotations.append((name, label))
                truth[name] = f"L{loc}S{s}"
    return _write(root, images, annotations), truth


def test_train_and_eval_a_coco_file_end_to_end(tmp_path):
    data, truth = _learnable(tmp_path / "data")
    # --group-by site keeps locations apart
    splits, _, report = split_dataset(TrainConfig(data=str(data), out="unused", group_by="site", val_fraction=0.25))
    sites = {name: {r.camera for r in records} for name, records in splits.items()}
    assert not sites["train"] & sites["val"] and report.events == 4

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                     os.environ.get("PYTHONPATH")]))}
    cli = [sys.executable, "-m", "imgcls.cli", "-q"]
    done = subprocess.run([*cli, "train", str(data), "--out", str(run), "--model", "cifarnet", "--epochs", "3",
                           "--batch-size", "8", "--workers", "0", "--lr", "3e-3", "--warmup-epochs", "0",
                           "--label-smoothing", "0"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((run / "split.csv").open()))
    assert len(rows) == 36
    sides: dict[str, set] = {}
    for row in rows:
        name = Path(row["path"]).relative_to(data.parent).as_posix()
        assert row["group"] == truth[name]  # the sequence is the group
        sides.setdefault(row["group"], set()).add(row["split"])
    assert all(len(s) == 1 for s in sides.values()) and len(sides) == 12  # no sequence crosses the split
    assert {"train", "val"} <= {s for ss in sides.values() for s in ss}

    done = subprocess.run([*cli, "eval", str(run), str(data), "--events", "--json"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["n"] == 36 and result["labels"] == ["deer", "fox"]
    events = result["events"]
    assert (events["events"], events["frames"], events["frames_per_event"], events["source"]) == (12, 36, 3.0, "data")
    assert sum(map(sum, events["confusion_matrix"])) == 12
    saved = json.loads((run / "eval.json").read_text())
    assert saved["events"]["events"] == 12 and saved["accuracy"] == result["accuracy"]

    done = subprocess.run([*cli, "eval", str(run), str(_broken(tmp_path, "unknown_category"))], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 2 and "category_id 9" in done.stderr and len(done.stderr.strip().splitlines()) == 1
