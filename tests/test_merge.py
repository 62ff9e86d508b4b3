"""imgcls merge: the shards of one job -> the output of the unsharded run, and every way parts may not fit."""

from __future__ import annotations

import csv
import json
import logging

import pytest
from conftest import FAST
from imagezoo import make_class_tree

import imgcls
from imgcls.cli import main
from imgcls.prediction.fingerprint import meta_path

N = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny cifarnet on ONNX Runtime; 30 new images in five camera folders."""
    root = tmp_path_factory.mktemp("merge")
    make_class_tree(root / "data", {label: 12 for label in ("empty", "deer", "fox")}, size=(32, 32), seed=3)
    result = imgcls.train(root / "data", root / "run", epochs=2, progress=False, **{**FAST, "export_onnx": True})
    make_class_tree(root / "new", {f"cam{i}": 6 for i in range(5)}, size=(32, 32), seed=11)
    (root / "new" / "cam2" / "cam2_broken.png").write_bytes(b"junk")
    return result.run_dir, root / "new"


def predict(*args) -> int:
    return main(["-q", "predict", *map(str, args)])


def merge(*args) -> int:
    return main(["-q", "merge", *map(str, args)])


def csv_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _shards(run, new, folder, name, *options, by="path"):
    folder.mkdir(exist_ok=True)
    parts = [folder / name.format(k=k) for k in range(1, N + 1)]
    for k, part in enumerate(parts, start=1):
        assert predict(run, new, "--out", part, "--shard", f"{k}/{N}", "--shard-by", by, *options) == 0
    return parts


@pytest.mark.parametrize("by, events", [("path", []), ("folder", ["--aggregate", "mean"])])
def test_merged_csv_shards_are_the_unsharded_output(trained, tmp_path, by, events):
    run, new = trained
    assert predict(run, new, "--out", tmp_path / "whole.csv", "--top-k", "2", *events) == 0
    parts = _shards(run, new, tmp_path / "out", "part_{k}.csv", "--top-k", "2", *events, by=by)
    sizes = [len(csv_rows(p)) for p in parts]
    assert sum(sizes) == 31 and sum(1 for s in sizes if s) >= 2
    globbed = sorted((tmp_path / "out").glob("part_*.csv"))  # as the shell expands out/part_*.csv
    assert len(globbed) == (2 * N if events else N)  # with the event rows of each part
    assert merge(*globbed, "--out", tmp_path / "all.csv") == 0
    whole, merged = csv_rows(tmp_path / "whole.csv"), csv_rows(tmp_path / "all.csv")
    assert merged == whole  # every row, in the order of the unsharded run, probabilities to the digit
    assert (tmp_path / "all.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    if events:  # shards by folder keep each camera's events whole: the event rows are the unsharded ones
        assert (tmp_path / "all.events.csv").read_bytes() == (tmp_path / "whole.events.csv").read_bytes()
    meta, whole_meta = (json.loads(meta_path(tmp_path / f).read_text()) for f in ("all.csv", "whole.csv"))
    assert meta["fingerprint"] == whole_meta["fingerprint"] and meta["shard"] is None
    assert meta["complete"] and meta["rows"] == 31 and meta["merged_from"] == [str(p) for p in parts]


def test_merged_jsonl_megadetector_and_camtrapdp_shards_are_the_unsharded_output(trained, tmp_path):
    run, new = trained
    for name, suffix in (("jsonl", ".jsonl"), ("megadetector", ".json"), ("camtrapdp", "")):
        assert predict(run, new, "--out", tmp_path / f"whole{suffix}", "--format", name) == 0
        parts = _shards(run, new, tmp_path / name, "part_{k}" + suffix, "--format", name, by="folder")
        assert merge(*parts, "--out", tmp_path / f"all{suffix}") == 0
        whole, merged = tmp_path / f"whole{suffix}", tmp_path / f"all{suffix}"
        if name == "jsonl":
            assert merged.read_bytes() == whole.read_bytes()
        elif name == "megadetector":
            a, b = json.loads(merged.read_text()), json.loads(whole.read_text())
            assert a["images"] == b["images"] and len(a["images"]) == 31
            assert a["classification_categories"] == b["classification_categories"]
        else:
            assert (merged / "media.csv").read_bytes() == (whole / "media.csv").read_bytes()
            a, b = csv_rows(merged / "observations.csv"), csv_rows(whole / "observations.csv")
            for row in a + b:
                row.pop("classificationTimestamp")
            assert a == b and len(a) == 31
            assert (merged / "deployments.csv").read_bytes() == (whole / "deployments.csv").read_bytes()
            a, b = (json.loads((folder / "datapackage.json").read_text()) for folder in (merged, whole))
            for key in ("resources", "temporal", "taxonomic"):
                assert a[key] == b[key], key


def test_merge_refuses_parts_of_another_model_naming_it(trained, tmp_path, capsys):
    run, new = trained
    parts = _shards(run, new, tmp_path, "part_{k}.csv")
    odd = parts[1]
    assert predict(run, new, "--out", odd, "--shard", f"2/{N}", "--backend", "torch", "--overwrite") == 0
    capsys.readouterr()
    assert merge(*parts, "--out", tmp_path / "all.csv") == 2
    err = capsys.readouterr().err.strip()
    fps = {json.loads(meta_path(p).read_text())["fingerprint"]["model"][:12] for p in parts}
    assert len(err.splitlines()) == 1 and f"{odd} (model " in err and all(fp in err for fp in fps)
    assert str(parts[0]) not in err and not (tmp_path / "all.csv").exists()


def test_merge_refuses_gaps_repeats_unfinished_parts_and_a_path_twice(trained, tmp_path, capsys, caplog):
    run, new = trained
    parts = _shards(run, new, tmp_path, "part_{k}.csv")
    for args, message in [
        (parts[:2], f"shard(s) 3 of {N} missing"),
        ([*parts, tmp_path / "copy.csv"], f"shard 1/{N} is given twice"),
        ([*parts, parts[0]], "named twice"),
    ]:
        if "copy.csv" in str(args[-1]):
            (tmp_path / "copy.csv").write_bytes(parts[0].read_bytes())
            meta_path(tmp_path / "copy.csv").write_bytes(meta_path(parts[0]).read_bytes())
        capsys.readouterr()
        assert merge(*args, "--out", tmp_path / "all.csv") == 2
        assert message in capsys.readouterr().err
    # an interrupted part (its sidecar is not marked complete) is refused
    meta = json.loads(meta_path(parts[2]).read_text())
    meta_path(parts[2]).write_text(json.dumps({**meta, "complete": False}))
    assert merge(*parts, "--out", tmp_path / "all.csv") == 2
    assert f"{parts[2]} is not finished" in capsys.readouterr().err
    meta_path(parts[2]).write_text(json.dumps(meta))
    # outputs that are not shards merge with a warning; a path in two of them is an error naming it
    assert predict(run, new / "cam0", "--out", tmp_path / "a.csv") == 0
    assert predict(run, new / "cam1", "--out", tmp_path / "b.csv") == 0
    with caplog.at_level(logging.WARNING, logger="imgcls"):
        assert merge(tmp_path / "a.csv", tmp_path / "b.csv", "--out", tmp_path / "ab.csv") == 0
    assert "not shards of one run" in caplog.text
    assert len(csv_rows(tmp_path / "ab.csv")) == 12
    assert predict(run, new / "cam1" / "cam1_0003.png", new / "cam2", "--out", tmp_path / "c.csv") == 0
    capsys.readouterr()
    assert merge(tmp_path / "b.csv", tmp_path / "c.csv", "--out", tmp_path / "bc.csv") == 2
    err = capsys.readouterr().err
    assert "cam1_0003.png is in two of the parts" in err and not (tmp_path / "bc.csv").exists()
    # a finished --out is replaced only with --overwrite
    assert merge(*parts, "--out", tmp_path / "ab.csv") == 2
    assert merge(*parts, "--out", tmp_path / "ab.csv", "--overwrite") == 0
    assert len(csv_rows(tmp_path / "ab.csv")) == 31


def test_merge_refuses_mixed_formats_and_options(trained, tmp_path, capsys):
    run, new = trained
    parts = _shards(run, new, tmp_path, "part_{k}.csv")
    assert predict(run, new, "--out", parts[2], "--shard", f"3/{N}", "--top-k", "2", "--overwrite") == 0
    capsys.readouterr()
    assert merge(*parts, "--out", tmp_path / "all.csv") == 2
    assert f"{parts[2]} (options " in capsys.readouterr().err


def test_an_empty_shard_is_an_output_too_and_merges(trained, tmp_path):
    run, new = trained
    n = 8  # five camera folders in eight shards by folder: at least three shards are empty
    parts = [tmp_path / f"part_{k}.jsonl" for k in range(1, n + 1)]
    for k, part in enumerate(parts, start=1):
        assert predict(run, new, "--out", part, "--shard", f"{k}/{n}", "--shard-by", "folder") == 0
    sizes = [len(part.read_bytes().splitlines()) for part in parts]
    assert sizes.count(0) >= 3 and sum(sizes) == 31
    assert all(json.loads(meta_path(p).read_text())["complete"] for p in parts)
    assert predict(run, new, "--out", tmp_path / "whole.jsonl") == 0
    assert merge(*parts, "--out", tmp_path / "all.jsonl") == 0
    assert (tmp_path / "all.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_card_folders_named_alike_in_other_shards_stay_apart_when_merged(trained, tmp_path):
    """site0/100RECNX ... site3/100RECNX: each shard sees some of them, yet names each camera as the unsharded
    run does (among every folder of the inputs), so the merged deployments and events are the unsharded ones."""
    run, _ = trained
    cards = tmp_path / "cards"
    make_class_tree(tmp_path / "flat", {f"site{i}": 4 for i in range(4)}, size=(32, 32), seed=5)
    for i in range(4):
        (cards / f"site{i}").mkdir(parents=True)
        (tmp_path / "flat" / f"site{i}").rename(cards / f"site{i}" / "100RECNX")
    options = ("--format", "camtrapdp", "--events")
    assert predict(run, cards, "--out", tmp_path / "whole", *options) == 0
    parts = _shards(run, cards, tmp_path / "parts", "part_{k}", *options, by="folder")
    seen = [{row["deploymentID"] for row in csv_rows(p / "deployments.csv")} for p in parts]
    assert sum(1 for s in seen if s) >= 2  # the cards are spread over the shards
    assert merge(*parts, "--out", tmp_path / "all") == 0
    merged, whole = csv_rows(tmp_path / "all" / "deployments.csv"), csv_rows(tmp_path / "whole" / "deployments.csv")
    assert merged == whole and sorted(r["deploymentID"] for r in whole) == [f"site{i}/100RECNX" for i in range(4)]
    a, b = csv_rows(tmp_path / "all" / "observations.csv"), csv_rows(tmp_path / "whole" / "observations.csv")
    for row in a + b:
        row.pop("classificationTimestamp")
    assert a == b
