"""Prediction outputs: csv, JSON Lines, MegaDetector batch output and Camtrap DP, end to end through the CLI,
kill -9 + --resume in a real subprocess, and --sort-into."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from imagezoo import make_class_tree

import imgcls
from imgcls.cli import main
from imgcls.prediction.outputs import DEPLOYMENT_COLUMNS, OBSERVATION_COLUMNS

LABELS = ["empty", "deer", "fox"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model on ONNX Runtime, and new images to predict: 4 per class in class folders plus a
    corrupt file among them."""
    root = tmp_path_factory.mktemp("outputs")
    make_class_tree(root / "data", {label: 14 for label in LABELS}, size=(32, 32), seed=3)
    result = imgcls.train(root / "data", root / "run", epochs=3, progress=False, **{**FAST, "export_onnx": True})
    make_class_tree(root / "new", {label: 4 for label in LABELS}, size=(32, 32), seed=9)
    (root / "new" / "deer" / "deer_9999.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert imgcls.load(result.run_dir).backend.startswith("onnxruntime")
    return result.run_dir, root / "new"


def csv_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def jsonl_rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8").read().splitlines()]


def _predict(run, inputs, out, *options):
    assert main(["-q", "predict", str(run), str(inputs), "--out", str(out), *map(str, options)]) == 0


@pytest.fixture(scope="module")
def every_format(trained, tmp_path_factory):
    """The same inputs written in every format (and a CSV with every class ranked, the reference)."""
    run, new = trained
    out = tmp_path_factory.mktemp("formats")
    paths = {"csv": out / "rows.csv", "jsonl": out / "rows.jsonl", "megadetector": out / "md.json",
             "camtrapdp": out / "package", "ranked": out / "ranked.csv"}
    for name in ("csv", "jsonl", "megadetector", "camtrapdp"):
        _predict(run, new, paths[name])
    _predict(run, new, paths["ranked"], "--top-k", "3")
    return paths


def test_csv_and_jsonl_hold_the_same_rows_with_numbers_as_numbers(every_format):
    rows, lines = csv_rows(every_format["csv"]), jsonl_rows(every_format["jsonl"])
    assert list(rows[0]) == ["path", "label", "prob", "error"]
    assert len(rows) == len(lines) == 13
    for row, line in zip(rows, lines):
        assert list(line) == list(row) and line["path"] == row["path"]
        if row["error"]:
            assert line["label"] is None and line["prob"] is None and line["error"] == row["error"]
        else:
            assert isinstance(line["prob"], float) and line["prob"] == float(row["prob"])
            assert line["label"] == row["label"] and line["error"] is None
    failed = [r for r in rows if r["error"]]
    assert [os.path.basename(r["path"]) for r in failed] == ["deer_9999.png"]  # the corrupt file is a row


def _check_megadetector_rules(d):
    """MegaDetector's validate_batch_results.py, rule by rule."""
    assert isinstance(d, dict)
    for key in ("info", "images", "detection_categories"):
        assert key in d
    assert isinstance(d["info"], dict) and "format_version" in d["info"]
    assert float(d["info"]["format_version"]) >= 1.3
    for table in ("detection_categories", "classification_categories"):
        for k, v in d.get(table, {}).items():
            assert isinstance(k, str) and str(int(k)) == k and isinstance(v, str) and v
    assert isinstance(d["images"], list)
    for im in d["images"]:
        assert isinstance(im, dict) and "file" in im
        if im.get("detections") is not None:
            for det in im["detections"]:
                assert {"category", "conf", "bbox"} <= set(det)
                assert isinstance(det["conf"], float)  # a Python float, never an int
                assert det["category"] in d["detection_categories"]
                for c in det.get("classifications") or []:
                    assert isinstance(c[0], str) and int(c[0]) >= 0
                    assert isinstance(c[1], (float, int))
        if im.get("failure") is not None:
            assert isinstance(im["failure"], str) and "detections" in im and im["detections"] is None
        if "failure" not in im:
            assert isinstance(im["detections"], list)
    assert set(d) <= {"info", "images", "detection_categories", "classification_categories",
                      "classification_category_descriptions"}


def test_megadetector_file_passes_the_validator_rules_and_says_what_the_csv_says(trained, every_format):
    run, new = trained
    d = json.loads(every_format["megadetector"].read_text())
    _check_megadetector_rules(d)
    assert d["info"]["format_version"] == "1.6"
    assert d["info"]["classifier"].startswith("cifarnet") and str(run) in d["info"]["classifier"]
    assert "classification_completion_time" in d["info"]
    assert d["detection_categories"] == {"1": "animal"}
    labels = imgcls.load(run).labels  # sorted class folders: deer, empty, fox
    assert d["classification_categories"] == {str(i): label for i, label in enumerate(labels)}
    ranked = csv_rows(every_format["ranked"])
    assert len(d["images"]) == len(ranked)
    for image, row in zip(d["images"], ranked):
        assert image["file"] == os.path.relpath(row["path"], new)  # relative to the one input folder
        if row["error"]:
            assert image["failure"] == row["error"] and image["detections"] is None
            continue
        assert "failure" not in image
        (det,) = image["detections"]
        assert det["category"] == "1" and det["bbox"] == [0.0, 0.0, 1.0, 1.0]
        probs = {row[f"label_{k}"]: float(row[f"prob_{k}"]) for k in (1, 2, 3)}
        assert det["conf"] == pytest.approx(1.0 - probs["empty"], abs=2e-6)
        names = [d["classification_categories"][c] for c, _ in det["classifications"]]
        assert names == [row[f"label_{k}"] for k in (1, 2, 3)]  # every class, highest first
        assert [p for _, p in det["classifications"]] == sorted((p for _, p in det["classifications"]), reverse=True)
        assert all(p == pytest.approx(probs[n], abs=1e-6) for n, (_, p) in zip(names, det["classifications"]))
    assert not (every_format["megadetector"].parent / "md.json.partial.jsonl").exists()  # the journal is gone


def test_camtrapdp_package_holds_media_and_observations(every_format):
    package = every_format["camtrapdp"]
    assert sorted(os.listdir(package)) == ["datapackage.json", "deployments.csv", "media.csv", "observations.csv"]
    meta = json.loads((package / "datapackage.json").read_text())
    assert [r["path"] for r in meta["resources"]] == ["deployments.csv", "media.csv", "observations.csv"]
    assert "camtrap-dp/1.0" in meta["profile"]
    with open(package / "observations.csv", newline="") as handle:
        assert next(csv.reader(handle)) == OBSERVATION_COLUMNS
    observations, media = csv_rows(package / "observations.csv"), csv_rows(package / "media.csv")
    reference = csv_rows(every_format["csv"])
    assert len(observations) == len(media) == len(reference)  # no events: media-level rows only
    # one deployment per camera folder, from its first to its last image; where it stood is left to the user
    deployments = csv_rows(package / "deployments.csv")
    with open(package / "deployments.csv", newline="") as handle:
        assert next(csv.reader(handle)) == DEPLOYMENT_COLUMNS
    spans = {}
    for medium in media:
        spans.setdefault(medium["deploymentID"], []).append(datetime.fromisoformat(medium["timestamp"]))
    assert [d["deploymentID"] for d in deployments] == sorted(spans)
    for d in deployments:
        assert datetime.fromisoformat(d["deploymentStart"]) == min(spans[d["deploymentID"]])
        assert datetime.fromisoformat(d["deploymentEnd"]) == max(spans[d["deploymentID"]])
        assert d["latitude"] == d["longitude"] == ""
    every_time = [t for times in spans.values() for t in times]
    assert meta["temporal"] == {"start": min(every_time).date().isoformat(), "end": max(every_time).date().isoformat()}
    labels = meta["imgcls"]["labels"]
    assert "empty" in labels and meta["taxonomic"] == [{"scientificName": label} for label in labels
                                                       if label != "empty"]  # the empty class is no taxon
    assert any("latitude" in item for item in meta["imgcls"]["to_complete"])
    for obs, medium, row in zip(observations, media, reference):
        assert obs["mediaID"] == medium["mediaID"] and obs["observationLevel"] == "media"
        assert medium["filePath"] == row["path"] and medium["fileMediatype"] == "image/png"
        assert obs["deploymentID"] == medium["deploymentID"] == os.path.basename(os.path.dirname(row["path"]))
        assert medium["timestamp"] and obs["eventStart"] == obs["eventEnd"] == medium["timestamp"]
        assert obs["classificationMethod"] == "machine" and obs["classifiedBy"].startswith("cifarnet")
        assert obs["classificationTimestamp"].endswith("+00:00")
        if row["error"]:
            assert obs["observationType"] == "unknown" and obs["classificationProbability"] == ""
            assert row["error"] in obs["observationComments"]
            continue
        assert float(obs["classificationProbability"]) == float(row["prob"])
        expected = "blank" if row["label"] == "empty" else "animal"
        assert obs["observationType"] == expected
        assert obs["scientificName"] == (row["label"] if expected == "animal" else "")


def test_format_comes_from_the_extension_unless_given(trained, tmp_path):
    run, new = trained
    _predict(run, new / "fox", tmp_path / "rows.txt", "--format", "jsonl")
    assert len(jsonl_rows(tmp_path / "rows.txt")) == 4
    assert main(["-q", "predict", str(run), str(new), "--out", str(tmp_path / "rows.txt")]) == 2  # no format known
    (tmp_path / "existing").mkdir()
    _predict(run, new / "fox", tmp_path / "existing")  # an existing folder: Camtrap DP
    assert (tmp_path / "existing" / "observations.csv").exists()
    assert main(["-q", "predict", str(run), str(new), "--out", str(tmp_path / "m.json"), "--media", "x.csv"]) == 2


# --------------------------------------------------------------------------- kill -9, then --resume

_RUN = textwrap.dedent("""
    import sys, time
    import numpy as np
    import imgcls.prediction.predict
    from imgcls.cli import main
    from imgcls.data.preprocess import Preprocess

    delay = float(sys.argv[1])

    def engine(batch):  # slow enough to be killed mid-run; deterministic logits from the mean colour
        time.sleep(delay)
        return (batch.reshape(len(batch), 3, -1).mean(-1) / 16.0).astype(np.float32)

    imgcls.prediction.predict.load = lambda *a, **k: imgcls.prediction.predict.Predictor(
        engine, ["empty", "deer", "fox"], Preprocess(input_size=32, resize="squash", crop_pct=1.0), "fake",
        batch_size=2)
    sys.exit(main(["-q", "predict", "RUN", *sys.argv[2:]]))
""")


def _run(delay, *args, timeout=120):
    return subprocess.run([sys.executable, "-c", _RUN, str(delay), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _killed_after(rows_file, min_lines, *args):
    """Start the run, SIGKILL it once ``rows_file`` holds ``min_lines`` complete lines."""
    proc = subprocess.Popen([sys.executable, "-c", _RUN, "0.3", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            if rows_file.exists() and rows_file.read_bytes().count(b"\n") >= min_lines:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    make_class_tree(root / "img", {label: 6 for label in LABELS}, size=(32, 32), seed=4)
    (root / "img" / "fox" / "fox_broken.png").write_bytes(b"junk")
    return root / "img"


def test_jsonl_survives_kill_9_and_resume_finishes_it(many, tmp_path):
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    assert _run(0, many, "--out", full, "--aggregate", "mean").returncode == 0
    _killed_after(out, 3, many, "--out", out, "--aggregate", "mean")
    written = out.read_bytes()
    assert 3 <= written.count(b"\n") < 19 and not (tmp_path / "out.events.jsonl").exists()
    with out.open("ab") as handle:  # a row cut in the middle by the kill
        handle.write(b'{"path": "' + str(many).encode() + b'/fox/fox_0003.png", "label": "fo')
    refused = _run(0, many, "--out", out, "--aggregate", "mean")  # without --resume: refused, untouched
    assert refused.returncode == 2 and "--resume" in refused.stderr
    done = _run(0, many, "--out", out, "--aggregate", "mean", "--resume")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == full.read_bytes()  # nothing lost, duplicated or cut
    assert (tmp_path / "out.events.jsonl").read_bytes() == (tmp_path / "full.events.jsonl").read_bytes()
    assert not (tmp_path / "out.jsonl.lock").exists()


def test_megadetector_survives_kill_9_through_its_journal(many, tmp_path):
    full, out = tmp_path / "full.json", tmp_path / "out.json"
    journal = tmp_path / "out.json.partial.jsonl"
    assert _run(0, many, "--out", full).returncode == 0
    _killed_after(journal, 4, many, "--out", out)
    assert journal.exists() and not out.exists()  # the final file is written only at the end
    kept = journal.read_bytes().count(b"\n")
    refused = _run(0, many, "--out", out)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    done = _run(0, many, "--out", out, "--resume")
    assert done.returncode == 0, done.stderr
    assert f"(+ {kept} kept from before)" in done.stdout
    assert not journal.exists()
    result, expected = json.loads(out.read_text()), json.loads(full.read_text())
    _check_megadetector_rules(result)
    assert result["images"] == expected["images"]
    again = _run(0, many, "--out", out, "--resume")  # finished: nothing to do, the file stays
    assert again.returncode == 0 and json.loads(out.read_text())["images"] == expected["images"]
    assert _run(0, many, "--out", out).returncode == 2  # a finished file needs --overwrite
    assert _run(0, many, "--out", out, "--overwrite").returncode == 0


# --------------------------------------------------------------------------- --sort-into


def test_sort_into_links_or_copies_by_decision_and_never_overwrites(trained, tmp_path):
    run, new = trained
    before = {p: p.read_bytes() for p in new.rglob("*") if p.is_file()}
    _predict(run, new, tmp_path / "plain.csv")
    # a threshold at the median probability: some decisions are labels, some uncertain
    t = str(np.median([float(r["prob"]) for r in csv_rows(tmp_path / "plain.csv") if not r["error"]]))
    links = tmp_path / "linked"
    _predict(run, new, tmp_path / "rows.csv", "--threshold", t, "--sort-into", links)
    rows = csv_rows(tmp_path / "rows.csv")
    decisions = {r["decision"] for r in rows if not r["error"]}
    assert "uncertain" in decisions and len(decisions) >= 2
    for row in rows:
        folder = "_failed" if row["error"] else row["decision"]
        placed = links / folder / os.path.basename(row["path"])
        assert placed.is_symlink() and os.path.samefile(placed, row["path"])
    assert sorted(os.listdir(links)) == sorted({"_failed" if r["error"] else r["decision"] for r in rows})

    copies = tmp_path / "copied"
    first = next(r for r in rows if not r["error"])
    squatter = copies / first["decision"] / os.path.basename(first["path"])
    squatter.parent.mkdir(parents=True)
    squatter.write_bytes(b"someone else's file")
    _predict(run, new, tmp_path / "rows2.csv", "--threshold", t, "--sort-into", copies, "--copy")
    assert squatter.read_bytes() == b"someone else's file"  # never overwritten
    stem, suffix = os.path.splitext(os.path.basename(first["path"]))
    moved = copies / first["decision"] / f"{stem}_1{suffix}"
    assert not moved.is_symlink() and moved.read_bytes() == before[Path(first["path"])]
    copied = [p for p in copies.rglob("*") if p.is_file()]
    assert len(copied) == len(rows) + 1 and not any(p.is_symlink() for p in copied)
    # a second run finds its own copies there and adds nothing; the originals never moved
    _predict(run, new, tmp_path / "rows3.csv", "--threshold", t, "--sort-into", copies, "--copy")
    assert len([p for p in copies.rglob("*") if p.is_file()]) == len(rows) + 1
    assert {p: p.read_bytes() for p in new.rglob("*") if p.is_file()} == before


def _fake():
    from imgcls.data.preprocess import Preprocess
    from imgcls.prediction.predict import Predictor

    engine = lambda batch: (batch.reshape(len(batch), 3, -1).mean(-1) / 16.0).astype(np.float32)  # noqa: E731
    return Predictor(engine, LABELS, Preprocess(input_size=32, resize="squash", crop_pct=1.0), "fake", batch_size=2)


@pytest.mark.parametrize("content", ["x", "remember the milk\n", '{"a": 1}\n', '["path"]'])
def test_a_jsonl_file_we_did_not_write_is_never_touched(many, tmp_path, content):
    from imgcls.errors import UserError
    from imgcls.prediction.predict import predict_to_file

    out = tmp_path / "notes.jsonl"
    out.write_text(content)
    for resume in (False, True):
        with pytest.raises(UserError, match="not an imgcls predict JSON Lines file"):
            predict_to_file(_fake(), [many], out, progress=False, resume=resume)
    assert out.read_text() == content
    predict_to_file(_fake(), [many], out, progress=False, overwrite=True)
    assert len(jsonl_rows(out)) == 19


def test_jsonl_resume_keeps_whole_rows_and_refuses_other_options(many, tmp_path):
    from imgcls.errors import UserError
    from imgcls.prediction.predict import predict_to_file

    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    predict_to_file(_fake(), [many], full, progress=False, top_k=2)
    lines = full.read_text().splitlines(keepends=True)
    out.write_text(lines[0][:25])  # killed inside the first row
    result = predict_to_file(_fake(), [many], out, progress=False, top_k=2, resume=True)
    assert (result["kept"], result["images"]) == (0, 19) and out.read_bytes() == full.read_bytes()
    out.write_text("".join(lines[:5]) + "{broken}\n" + "".join(lines[5:7]))
    with pytest.raises(UserError, match=r"out.jsonl:6: not a row imgcls predict wrote"):
        predict_to_file(_fake(), [many], out, progress=False, top_k=2, resume=True)
    out.write_text("".join(lines[:5]))
    with pytest.raises(UserError, match="has fields .* not .*another --top-k"):
        predict_to_file(_fake(), [many], out, progress=False, top_k=3, resume=True)
    with pytest.raises(UserError, match="row 1 is .* but input 1 is"):
        predict_to_file(_fake(), [many / "fox"], out, progress=False, top_k=2, resume=True)
    with pytest.raises(UserError, match="lies inside the input folder"):
        predict_to_file(_fake(), [many], tmp_path / "x.csv", progress=False, sort_into=many / "sorted")
    assert not (tmp_path / "x.csv").exists()


def test_a_kill_after_the_final_file_before_the_journal_is_removed_resumes_cleanly(many, tmp_path):
    from imgcls.prediction.predict import predict_to_file

    out = tmp_path / "md.json"
    predict_to_file(_fake(), [many], out, progress=False)
    expected = json.loads(out.read_text())["images"]
    # the journal as it stood when the final file was written: every row, every class ranked
    journal = tmp_path / "md.json.partial.jsonl"
    predict_to_file(_fake(), [many], journal, format="jsonl", top_k=3, progress=False)
    result = predict_to_file(_fake(), [many], out, progress=False, resume=True)
    assert (result["kept"], result["images"]) == (19, 0)
    assert not journal.exists() and json.loads(out.read_text())["images"] == expected
