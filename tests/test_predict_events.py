"""Capture events at predict time: --events groups frames per camera folder by EXIF time, --aggregate writes
one row per event (aggregate_probs of its readable frames), in csv, JSON Lines and Camtrap DP."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from conftest import FAST
from imagezoo import class_array, make_class_tree
from PIL import Image

import imgcls
from imgcls.evaluation.aggregate import aggregate_probs
from imgcls.cli import main
from imgcls.data.events import group_events
from imgcls.data.sources import collect_inputs
from imgcls.evaluation.thresholds import decide

CLASSES = ["empty", "deer", "fox"]  # the training order: class_array(i) draws class CLASSES[i]
# camera -> frames (EXIF DateTimeOriginal, class drawn); "cut" is a JPEG whose header (and time) reads but whose
# pixels do not decode: a failed frame inside an event
FRAMES = {
    "cam1": [("2024:05:01 10:00:00", "deer"), ("2024:05:01 10:00:04", "deer"), ("2024:05:01 10:00:09", "deer"),
             ("2024:05:01 10:05:00", "fox"), ("2024:05:01 10:05:02", "fox")],
    "cam2": [("2024:05:01 10:00:01", "empty"), ("2024:05:01 10:00:03", "empty"), ("2024:05:01 10:00:05", "cut")],
}
EVENTS = [["cam1/f0.jpg", "cam1/f1.jpg", "cam1/f2.jpg"], ["cam1/f3.jpg", "cam1/f4.jpg"],
          ["cam2/f0.jpg", "cam2/f1.jpg", "cam2/f2.jpg"]]


def _jpeg(path, when, index, rng):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[36867] = when
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(class_array(index, len(CLASSES), (32, 32), rng)).save(path, exif=exif)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("events")
    make_class_tree(root / "data", {label: 14 for label in CLASSES}, size=(32, 32), seed=5)
    run = imgcls.train(root / "data", root / "run", epochs=3, progress=False, **{**FAST, "export_onnx": True}).run_dir
    rng = np.random.default_rng(11)
    photos = root / "photos"
    for camera, frames in FRAMES.items():
        for k, (when, drawn) in enumerate(frames):
            path = _jpeg(photos / camera / f"f{k}.jpg", when, CLASSES.index(drawn) if drawn != "cut" else 0, rng)
            if drawn == "cut":
                path.write_bytes(path.read_bytes()[:-50])  # EXIF intact, pixels cut short
    return run, photos


def rows_of(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _predict(run, photos, out, *options):
    assert main(["-q", "predict", str(run), str(photos), "--out", str(out), *map(str, options)]) == 0


def _rel(path, photos):
    return os.path.relpath(path, photos)


def test_events_group_frames_per_camera_within_the_gap(setup, tmp_path):
    run, photos = setup
    _predict(run, photos, tmp_path / "rows.csv", "--events")
    rows = rows_of(tmp_path / "rows.csv")
    assert list(rows[0]) == ["path", "label", "prob", "event", "error"]
    by_event = {}
    for row in rows:
        by_event.setdefault(row["event"], []).append(_rel(row["path"], photos))
    assert sorted(by_event.values()) == sorted(EVENTS)
    assert all(e.startswith(("cam1/2024-05-01T10:0", "cam2/2024-05-01T10:0")) for e in by_event)
    expected, _ = group_events(collect_inputs([photos]), 10)  # the same grouping the data module does
    assert [r["event"] for r in rows] == [r.group for r in expected]
    assert [r["error"] != "" for r in rows] == [_rel(r["path"], photos) == "cam2/f2.jpg" for r in rows]

    _predict(run, photos, tmp_path / "tight.csv", "--events", "--event-gap", "3")  # 4 s apart: another event
    tight = {_rel(r["path"], photos): r["event"] for r in rows_of(tmp_path / "tight.csv")}
    assert tight["cam1/f0.jpg"] != tight["cam1/f1.jpg"] and tight["cam2/f0.jpg"] == tight["cam2/f1.jpg"]


def _probs(row, labels):
    """Every class's probability from a row that ranks all of them."""
    out = np.zeros(len(labels))
    for k in range(1, len(labels) + 1):
        out[labels.index(row[f"label_{k}"])] = float(row[f"prob_{k}"])
    return out


@pytest.mark.parametrize("how", ["mean", "max"])
def test_aggregate_writes_event_rows_equal_to_aggregate_probs_of_the_image_rows(setup, tmp_path, how):
    run, photos = setup
    labels = imgcls.load(run).labels
    _predict(run, photos, tmp_path / "rows.csv", "--aggregate", how, "--threshold", "0.7")
    rows = rows_of(tmp_path / "rows.csv")
    assert "label_3" in rows[0] and "event" in rows[0]  # every class is kept, so events can be recomputed
    events = rows_of(tmp_path / "rows.events.csv")
    assert list(events[0]) == ["event", "frames", "failed", "label", "prob", "decision"]
    assert [e["event"] for e in events] == list(dict.fromkeys(r["event"] for r in rows))
    for event in events:
        members = [r for r in rows if r["event"] == event["event"]]
        good = [r for r in members if not r["error"]]
        agg = aggregate_probs(np.stack([_probs(r, labels) for r in good]), how)
        assert int(event["frames"]) == len(members) and int(event["failed"]) == len(members) - len(good)
        assert event["label"] == labels[int(np.argmax(agg))]
        assert float(event["prob"]) == pytest.approx(agg.max(), abs=2e-6)
        assert event["decision"] == decide(event["label"], float(event["prob"]), {label: 0.7 for label in labels})
    assert sorted((int(e["frames"]), int(e["failed"])) for e in events) == [(2, 0), (3, 0), (3, 1)]

    _predict(run, photos, tmp_path / "rows.jsonl", "--aggregate", how, "--threshold", "0.7")
    lines = [json.loads(x) for x in (tmp_path / "rows.events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["frames"], e["failed"], e["label"], e["decision"]) for e in lines] == \
        [(e["event"], int(e["frames"]), int(e["failed"]), e["label"], e["decision"]) for e in events]
    assert [e["prob"] for e in lines] == [float(e["prob"]) for e in events]


def test_camtrapdp_has_media_and_event_observations_timed_by_exif(setup, tmp_path):
    run, photos = setup
    _predict(run, photos, tmp_path / "rows.csv", "--aggregate", "max")
    image_rows, events = rows_of(tmp_path / "rows.csv"), rows_of(tmp_path / "rows.events.csv")
    _predict(run, photos, tmp_path / "package", "--aggregate", "max")
    observations = rows_of(tmp_path / "package" / "observations.csv")
    media = {m["mediaID"]: m for m in rows_of(tmp_path / "package" / "media.csv")}
    at_media = [o for o in observations if o["observationLevel"] == "media"]
    at_event = [o for o in observations if o["observationLevel"] == "event"]
    assert len(at_media) == len(image_rows) == len(media) and len(at_event) == len(events) == 3
    times = {f"{camera}/f{k}.jpg": when for camera, frames in FRAMES.items() for k, (when, _) in enumerate(frames)}

    def iso(when):  # EXIF "2024:05:01 10:00:04" -> "2024-05-01T10:00:04+00:00"
        return when.replace(":", "-", 2).replace(" ", "T") + "+00:00"

    for obs, row in zip(at_media, image_rows):
        name = _rel(row["path"], photos)
        medium = media[obs["mediaID"]]
        assert medium["filePath"] == row["path"] and medium["fileMediatype"] == "image/jpeg"
        assert obs["deploymentID"] == medium["deploymentID"] == name.split("/")[0]  # the camera folder
        assert medium["timestamp"] == obs["eventStart"] == obs["eventEnd"] == iso(times[name])
        assert obs["eventID"] == row["event"] and obs["mediaID"] and obs["classificationMethod"] == "machine"
        if row["error"]:
            assert obs["observationType"] == "unknown" and obs["scientificName"] == ""
        else:
            assert obs["observationType"] == ("blank" if row["label"] == "empty" else "animal")
            assert float(obs["classificationProbability"]) == float(row["prob"])
    for obs, event in zip(at_event, events):
        frames = [_rel(r["path"], photos) for r in image_rows if r["event"] == event["event"]]
        assert obs["eventID"] == event["event"] and obs["mediaID"] == ""
        assert obs["eventStart"] == iso(times[frames[0]]) and obs["eventEnd"] == iso(times[frames[-1]])
        assert obs["deploymentID"] == frames[0].split("/")[0]
        assert float(obs["classificationProbability"]) == float(event["prob"])
        assert obs["observationType"] == ("blank" if event["label"] == "empty" else "animal")
        assert obs["scientificName"] == (event["label"] if obs["observationType"] == "animal" else "")
    assert len({o["observationID"] for o in observations}) == len(observations)
    # each camera a deployment, from its first frame's EXIF time to its last's
    deployments = rows_of(tmp_path / "package" / "deployments.csv")
    assert [(d["deploymentID"], d["deploymentStart"], d["deploymentEnd"]) for d in deployments] == \
        [(camera, iso(frames[0][0]), iso(frames[-1][0])) for camera, frames in FRAMES.items()]
    package = json.loads((tmp_path / "package" / "datapackage.json").read_text())
    assert package["temporal"] == {"start": "2024-05-01", "end": "2024-05-01"}
    assert package["taxonomic"] == [{"scientificName": "deer"}, {"scientificName": "fox"}]


def test_camtrapdp_reuses_the_ids_of_a_given_media_csv(setup, tmp_path):
    run, photos = setup
    given = photos / "media.csv"
    names = [f"{camera}/f{k}.jpg" for camera, frames in FRAMES.items() for k in range(len(frames))]
    with given.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mediaID", "deploymentID", "captureMethod", "timestamp", "filePath", "filePublic",
                         "fileMediatype"])
        for i, name in enumerate(names):
            writer.writerow([f"M{i}", f"DEP-{name[:4]}", "activityDetection", f"2024-05-01T12:00:0{i}+02:00", name,
                             "false", "image/jpeg"])
    try:
        _predict(run, photos, tmp_path / "package", "--events", "--media", given)
        observations = rows_of(tmp_path / "package" / "observations.csv")
        assert (tmp_path / "package" / "media.csv").read_bytes() == given.read_bytes()  # theirs, unchanged
        # no deployments.csv beside theirs: one made from their deployment IDs and times
        deployments = rows_of(tmp_path / "package" / "deployments.csv")
        assert [(d["deploymentID"], d["deploymentStart"], d["deploymentEnd"]) for d in deployments] == \
            [("DEP-cam1", "2024-05-01T12:00:00+02:00", "2024-05-01T12:00:04+02:00"),
             ("DEP-cam2", "2024-05-01T12:00:05+02:00", "2024-05-01T12:00:07+02:00")]
        theirs = photos / "deployments.csv"  # with one beside it, that one is the package's, unchanged
        text = ("deploymentID,latitude,longitude,deploymentStart,deploymentEnd\r\n"
                "DEP-cam1,52.1,5.8,2024-04-01T00:00:00Z,2024-06-01T00:00:00Z\r\n"
                "DEP-cam2,52.2,5.9,2024-04-02T00:00:00Z,2024-06-30T00:00:00Z\r\n")
        theirs.write_bytes(text.encode())
        try:
            _predict(run, photos, tmp_path / "carried", "--events", "--media", given)
        finally:
            theirs.unlink()
        assert (tmp_path / "carried" / "deployments.csv").read_bytes() == text.encode()
        package = json.loads((tmp_path / "carried" / "datapackage.json").read_text())
        assert package["temporal"] == {"start": "2024-04-01", "end": "2024-06-30"}
        assert not any("latitude" in item for item in package["imgcls"]["to_complete"])
        at_media = [o for o in observations if o["observationLevel"] == "media"]
        assert sorted(o["mediaID"] for o in at_media) == sorted(f"M{i}" for i in range(len(names)))
        for obs in at_media:
            i = int(obs["mediaID"][1:])
            assert obs["deploymentID"] == f"DEP-{names[i][:4]}"
            assert obs["eventStart"] == f"2024-05-01T12:00:0{i}+02:00"  # the table's time wins over EXIF
        assert sum(o["observationLevel"] == "event" for o in observations) == 3  # --events: event rows (mean)
        given.write_text(given.read_text().replace("cam2/f1.jpg", "elsewhere.jpg"))
        assert main(["-q", "predict", str(run), str(photos), "--out", str(tmp_path / "p2"), "--media",
                     str(given)]) == 2  # an image the table lacks: refused before any prediction
        assert not (tmp_path / "p2").exists()
    finally:
        given.unlink()


def test_megadetector_with_events_stays_per_image(setup, tmp_path):
    run, photos = setup
    _predict(run, photos, tmp_path / "md.json", "--aggregate", "mean")
    d = json.loads((tmp_path / "md.json").read_text())
    assert set(d) == {"info", "detection_categories", "classification_categories", "images"}
    assert sorted(im["file"] for im in d["images"]) == sorted(n for e in EVENTS for n in e)
    (cut,) = [im for im in d["images"] if im.get("failure")]
    assert cut["file"] == "cam2/f2.jpg" and cut["detections"] is None
    assert not (tmp_path / "md.events.json").exists()


def test_two_sites_memory_card_folders_named_alike_are_two_deployments(setup, tmp_path):
    """site1/100RECNX and site2/100RECNX hold frames of the same seconds: two deployments in Camtrap DP, and
    their frames never share an event."""
    import shutil

    run, photos = setup
    cards = tmp_path / "cards"
    for site, camera in (("site1", "cam1"), ("site2", "cam1")):
        shutil.copytree(photos / camera, cards / site / "100RECNX")
    _predict(run, cards, tmp_path / "package", "--aggregate", "max")
    media = rows_of(tmp_path / "package" / "media.csv")
    assert {m["deploymentID"] for m in media} == {"site1/100RECNX", "site2/100RECNX"}
    for m in media:
        assert m["deploymentID"] == os.path.relpath(os.path.dirname(m["filePath"]), cards)
    deployments = rows_of(tmp_path / "package" / "deployments.csv")
    assert [d["deploymentID"] for d in deployments] == ["site1/100RECNX", "site2/100RECNX"]
    events = [o for o in rows_of(tmp_path / "package" / "observations.csv") if o["observationLevel"] == "event"]
    assert len(events) == 4 and sorted(o["deploymentID"] for o in events) == ["site1/100RECNX"] * 2 + \
        ["site2/100RECNX"] * 2  # cam1's two bursts at each site
