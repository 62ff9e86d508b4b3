"""Capture events: grouping frames by EXIF time per camera, and splits that keep events whole."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

import imgcls
from imgcls.data.events import (MAX_MTIME_FRAMES, cameras, capture_time, events_on_both_sides,
                                group_events)
from imgcls.data.records import Record
from imgcls.errors import UserError
from imgcls.train.config import TrainConfig
from imgcls.train.prepare import split_dataset


def _jpeg(path, when: str | None, seed: int = 0, colour=(0, 0, 0)):
    """A small JPEG; ``when`` ("YYYY:MM:DD HH:MM:SS") goes into EXIF DateTimeOriginal."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if when is not None:
        exif.get_ifd(0x8769)[36867] = when
    Image.fromarray(pixels).save(path, exif=exif)
    return path


def test_capture_time_reads_exif_and_falls_back_to_the_file_time(tmp_path):
    timed = _jpeg(tmp_path / "a.jpg", "2024:05:01 10:00:03")
    seconds, source = capture_time(timed)
    assert source == "exif" and seconds == pytest.approx(1714557603.0)
    bare = _jpeg(tmp_path / "b.jpg", None)
    os.utime(bare, (1_600_000_000, 1_600_000_000))
    assert capture_time(bare) == (1_600_000_000, "mtime")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    assert capture_time(tmp_path / "broken.jpg")[1] == "mtime"  # the scan reports the file; its time is still known
    assert capture_time(tmp_path / "missing.jpg") == (None, "none")


def test_frames_group_into_events_per_camera(tmp_path):
    times = {  # camera -> frame times; a burst, a gap of 11 s, another burst
        "cam1": ["2024:05:01 10:00:00", "2024:05:01 10:00:02", "2024:05:01 10:00:09", "2024:05:01 10:00:20",
                 "2024:05:01 10:00:21"],
        "cam2": ["2024:05:01 10:00:01", "2024:05:01 10:00:03"],  # the same minute as cam1, another camera
    }
    records = []
    for camera, stamps in times.items():
        for k, when in enumerate(stamps):
            records.append(Record(_jpeg(tmp_path / camera / f"{k}.jpg", when, k), "deer", camera=camera))
    bare = _jpeg(tmp_path / "cam2" / "bare.jpg", None)
    os.utime(bare, (1_700_000_000, 1_700_000_000))  # a file time far from every EXIF time
    records.append(Record(bare, "deer", camera="cam2"))
    out, report = group_events(records, gap=10)
    groups = [r.group for r in out]
    assert groups[0] == groups[1] == groups[2] != groups[3]  # 9 s after the previous frame: the same event
    assert groups[3] == groups[4]
    assert groups[5] == groups[6] and groups[5] not in groups[:5]  # cameras never share an event
    assert groups[7] not in groups[:7]
    assert (report.events, report.frames, report.max_frames) == (4, 8, 3)
    assert (report.from_exif, report.from_mtime, report.without_time) == (7, 1, 0)
    assert [r.path for r in out] == [r.path for r in records]  # order kept
    out, report = group_events(records, gap=30)
    assert len({r.group for r in out[:5]}) == 1 and report.events == 3


def test_memory_card_folders_named_alike_are_different_cameras(tmp_path):
    """Cards name their folders alike (100RECNX): site1/100RECNX and site2/100RECNX, triggered in the same
    seconds, are two cameras, so two events, not one; a folder named like no other keeps its own name."""
    records = []
    for site in ("site1", "site2"):
        for k in range(3):
            records.append(Record(_jpeg(tmp_path / site / "100RECNX" / f"IMG_{k:04d}.JPG",
                                        f"2024:05:01 10:00:0{k}", k), "deer"))
    records.append(Record(_jpeg(tmp_path / "site3" / "cam" / "IMG_0000.JPG", "2024:05:01 10:00:00"), "fox"))
    assert cameras(records) == ["site1/100RECNX"] * 3 + ["site2/100RECNX"] * 3 + ["cam"]
    out, report = group_events(records, gap=10)
    assert len({r.group for r in out[:3]}) == len({r.group for r in out[3:6]}) == 1
    assert len({r.group for r in out}) == report.events == 3
    assert all(r.group.startswith("site1/100RECNX/") for r in out[:3])
    given = [Record(r.path, r.label, camera="C1") for r in records]  # a camera column wins over folders
    assert cameras(given) == ["C1"] * 7
    # split folders are not cameras: a burst cut between train/deer and val/deer is still one event
    cut = [Record(_jpeg(tmp_path / "data" / split / "deer" / f"{k}.jpg", f"2024:05:01 11:00:0{k}", k), "deer")
           for k, split in enumerate(("train", "train", "Val"))]
    assert len(set(cameras(cut))) == 1
    out, _ = group_events(cut, gap=10)
    assert len({r.group for r in out}) == 1
    # nor are class folders: images sorted by species, then by site, keep a burst whose animal walks out whole
    walked = [Record(_jpeg(tmp_path / "sorted" / label / "site1" / f"{k}.jpg", f"2024:05:01 12:00:0{k}", k), label)
              for k, label in enumerate(("deer", "deer", "empty"))]
    walked.append(Record(_jpeg(tmp_path / "sorted" / "deer" / "site2" / "9.jpg", "2024:05:01 12:00:01", 9), "deer"))
    assert cameras(walked) == ["site1"] * 3 + ["site2"]
    out, _ = group_events(walked, gap=10)
    assert len({r.group for r in out[:3]}) == 1 and out[3].group != out[0].group


def test_copied_files_are_not_one_event(tmp_path):
    records = [Record(_jpeg(tmp_path / "fox" / f"{k}.jpg", None, k), "fox") for k in range(12)]
    for r in records:
        os.utime(r.path, (1_650_000_000, 1_650_000_000))  # one copy time for the whole folder
    out, report = group_events(records)
    assert len({r.group for r in out}) == 12 and report.mtime_split == 12
    # their IDs name the camera and the file, not the machine's folders (they go into shared Camtrap DP files)
    assert out[3].group.startswith(f"{tmp_path.name}/3.jpg#") and str(tmp_path.parent) not in out[3].group
    again, _ = group_events([Record(records[3].path, "fox")] + records)  # a file named twice: one event
    assert again[0].group == again[4].group == out[3].group
    # one camera (a column), files of one name in two folders: two events
    twins = [Record(_jpeg(tmp_path / side / "same.jpg", None, 1), camera="cam") for side in ("a", "b")]
    for r in twins:
        os.utime(r.path, (1_650_000_000, 1_650_000_000))
    assert len({r.group for r in group_events(twins)[0]}) == 2
    # no camera column: the folder, less the class folder; unlabelled, the folder itself
    assert cameras(records)[0] == tmp_path.name and cameras([Record(records[0].path)]) == ["fox"]
    assert MAX_MTIME_FRAMES >= 10


def _burst_csv(tmp_path, cameras=3, events=6, frames=4):
    """A CSV of bursts: each event's frames 1 s apart, events 10 minutes apart, labels per event."""
    rows = []
    for c in range(cameras):
        for e in range(events):
            label = ("deer", "fox")[(c + e) % 2]
            for f in range(frames):
                minute, second = divmod(e * 600 + f, 60)
                hour, minute = divmod(minute, 60)
                when = f"2024:05:0{c + 1} {10 + hour:02d}:{minute:02d}:{second:02d}"
                name = f"c{c}/e{e}_f{f}.jpg"
                _jpeg(tmp_path / name, when, seed=c * 100 + e * 10 + f, colour=(200, 60, 60) if label == "deer"
                      else (60, 60, 200))
                rows.append({"path": name, "label": label, "camera": f"cam{c}", "truth": f"c{c}e{e}"})
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, rows


def _config(data, **options):
    return TrainConfig(data=str(data), out="unused", **options)


def test_no_event_crosses_the_split_and_the_report_counts_a_random_split_s_leaks(tmp_path):
    data, rows = _burst_csv(tmp_path)
    splits, classes, report = split_dataset(_config(data, val_fraction=0.3))
    truth = {str(tmp_path / r["path"]): r["truth"] for r in rows}
    sides = {}
    for name, records in splits.items():
        for r in records:
            sides.setdefault(truth[str(r.path)], set()).add(name)
    assert all(len(s) == 1 for s in sides.values())  # every true event on one side
    assert report.source == "exif" and report.events == 18 and report.max_frames == 4
    assert report.leaked_by_random_split > 0  # a split of single frames would have cut bursts
    assert events_on_both_sides(splits) == 0
    # --group-by none is that split of single frames
    splits, _, report = split_dataset(_config(data, val_fraction=0.3, group_by="none"))
    sides = {}
    for name, records in splits.items():
        for r in records:
            sides.setdefault(truth[str(r.path)], set()).add(name)
    assert any(len(s) > 1 for s in sides.values()) and report.source == "none"


def test_group_by_site_keeps_cameras_apart_and_an_event_column_is_used(tmp_path):
    data, rows = _burst_csv(tmp_path, cameras=4, events=2)
    splits, _, report = split_dataset(_config(data, val_fraction=0.25, group_by="site"))
    cameras = {name: {r.camera for r in records} for name, records in splits.items()}
    assert not cameras["train"] & cameras["val"] and report.source == "site" and report.events == 4
    splits, _, report = split_dataset(_config(data, event_column="truth"))
    assert report.source == "column" and report.events == 8
    assert {r.group for r in splits["train"]}.isdisjoint({r.group for r in splits["val"]})
    with pytest.raises(UserError, match="no column 'nope' for --event-column"):
        split_dataset(_config(data, event_column="nope"))


def test_given_splits_that_cut_events_are_reported(tmp_path, caplog):
    data, rows = _burst_csv(tmp_path, cameras=2, events=2)
    lines = data.read_text().splitlines()
    header, body = lines[0] + ",split", lines[1:]
    data.write_text("\n".join([header] + [f"{line},{'val' if k % 4 == 3 else 'train'}" for k, line in
                                          enumerate(body)]) + "\n")
    with caplog.at_level("WARNING", logger="imgcls"):
        _, _, report = split_dataset(_config(data))
    assert report.across_given_splits == 4  # the last frame of each burst is in val
    assert "4 events have frames in more than one of the data's own splits" in caplog.text


def test_train_records_events_in_split_csv_and_scan_json(tmp_path):
    data, rows = _burst_csv(tmp_path, cameras=2, events=4, frames=3)
    result = imgcls.train(data, tmp_path / "run", model="cifarnet", epochs=1, batch_size=8, workers=0,
                          progress=False)
    split_rows = list(csv.DictReader((result.run_dir / "split.csv").open()))
    assert len({r["group"] for r in split_rows}) == 8 and all(r["group"] for r in split_rows)
    by_group = {}
    for r in split_rows:
        by_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_group.values())
    events = json.loads((result.run_dir / "scan.json").read_text())["events"]
    assert events["source"] == "exif" and events["events"] == 8 and events["mean_frames"] == 3.0


def test_data_in_bursts_gets_the_strategy_s_milder_crops_unless_crops_were_given():
    from imgcls.data.events import EventReport
    from imgcls.data.preprocess import Augment
    from imgcls.train.config import with_strategy_defaults
    from imgcls.train.prepare import with_bursts

    features = with_strategy_defaults({"pretrained": True, "device": "cpu"})
    assert features["burst_augment"] == {"crop_scale": [0.35, 1.0]}
    given = with_strategy_defaults({"pretrained": True, "device": "cpu", "augment": {"crop_scale": (0.2, 1.0)}})
    assert "burst_augment" not in given and given["augment"]["crop_scale"] == (0.2, 1.0)
    assert "burst_augment" not in with_strategy_defaults({"pretrained": True, "device": "cpu", "strategy": "finetune"})

    augment = Augment.from_dict(features["augment"])
    bursts = EventReport("exif", events=8, frames=24)            # 3 frames an event: camera-trap bursts
    assert with_bursts(augment, features["burst_augment"], bursts).crop_scale == (0.35, 1.0)
    assert with_bursts(augment, features["burst_augment"], bursts).jitter == augment.jitter  # the rest stays
    singles = EventReport("exif", events=24, frames=24)          # photos: one frame an event
    by_site = EventReport("site", events=2, frames=24)           # whole cameras are no bursts
    for report, changes in [(singles, features["burst_augment"]), (by_site, features["burst_augment"]), (bursts, {})]:
        assert with_bursts(augment, changes, report).crop_scale == augment.crop_scale == (0.08, 1.0)
