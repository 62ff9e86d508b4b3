"""Batch prediction at scale: the model fingerprint beside every output, kill -9 at random moments then
--resume, lazy inputs in the old order, shards that partition the inputs, progress that counts skipped files."""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import FAST
from imagezoo import make_class_tree, write_image

import imgcls
from imgcls.cli import main
from imgcls.data.sources import _images_under, collect_inputs, iter_inputs, keyed_inputs, read_csv
from imgcls.prediction.fingerprint import file_sha256, meta_path
from imgcls.prediction.shards import parse_shard, select, shard_of

LABELS = ["empty", "deer", "fox"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny cifarnet on ONNX Runtime, and 24 new images in four camera folders."""
    root = tmp_path_factory.mktemp("batch")
    make_class_tree(root / "data", {label: 12 for label in LABELS}, size=(32, 32), seed=3)
    result = imgcls.train(root / "data", root / "run", epochs=2, progress=False, **{**FAST, "export_onnx": True})
    make_class_tree(root / "new", {f"cam{i}": 6 for i in range(4)}, size=(32, 32), seed=9)
    return result.run_dir, root / "new"


def csv_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def predict(*args) -> int:
    return main(["-q", "predict", *map(str, args)])


# --------------------------------------------------------------------------- 1. the fingerprint


def test_every_output_records_the_model_file_it_came_from(trained, tmp_path):
    run, new = trained
    assert predict(run, new, "--out", tmp_path / "rows.csv", "--top-k", "2", "--aggregate", "mean") == 0
    meta = json.loads(meta_path(tmp_path / "rows.csv").read_text())
    assert meta["model"]["sha256"] == file_sha256(run / "model.onnx")  # the file that ran
    assert meta["model"]["file"] == str(run / "model.onnx")
    assert meta["model"]["labels"] == imgcls.load(run).labels
    assert meta["model"]["preprocess"]["input_size"] == imgcls.load(run).preprocess.input_size
    assert meta["options"] == {"format": "csv", "top_k": 3, "thresholds": None, "events": True,
                               "event_gap": 10.0, "aggregate": "mean", "media": None}
    assert meta["imgcls"] == imgcls.__version__ and meta["inputs"] == {"inputs": [str(new)]}
    assert meta["complete"] is True and meta["rows"] == 24 and meta["shard"] is None
    assert meta["files"] == [str(tmp_path / "rows.csv"), str(tmp_path / "rows.events.csv")]
    # the whole-file formats carry the fingerprint inside too
    assert predict(run, new, "--out", tmp_path / "md.json") == 0
    md = json.loads((tmp_path / "md.json").read_text())
    md_meta = json.loads(meta_path(tmp_path / "md.json").read_text())
    assert md["info"]["classifier_metadata"]["fingerprint"] == md_meta["fingerprint"]
    assert md_meta["fingerprint"]["model"] == meta["fingerprint"]["model"]  # one model, other options
    assert md_meta["fingerprint"]["options"] != meta["fingerprint"]["options"]
    assert predict(run, new / "cam0", "--out", tmp_path / "pkg") == 0
    package = json.loads((tmp_path / "pkg" / "datapackage.json").read_text())
    assert package["imgcls"]["fingerprint"] == json.loads((tmp_path / "pkg.meta.json").read_text())["fingerprint"]


def test_resume_with_another_model_or_options_is_refused_naming_both(trained, tmp_path, capsys, caplog):
    run, new = trained
    out = tmp_path / "rows.csv"
    assert predict(run, new, "--out", out) == 0
    full = out.read_bytes()
    meta = json.loads(meta_path(out).read_text())
    lines = full.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:6]))  # an interrupted run: 5 rows
    capsys.readouterr()
    # the same run on torch reads model.safetensors: another file, another fingerprint
    assert predict(run, new, "--out", out, "--resume", "--backend", "torch") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model file" in err
    other = json.loads(meta_path(out).read_text())
    assert other == meta  # refused before anything was written
    torch_sha = file_sha256(run / "model.safetensors")
    assert meta["fingerprint"]["model"][:12] in err and meta["model"]["sha256"][:12] in err
    assert torch_sha[:12] in err
    assert predict(run, new, "--out", out, "--resume") == 0
    assert out.read_bytes() == full
    # other options with the same columns: refused by the fingerprint too
    decided = tmp_path / "decided.csv"
    assert predict(run, new, "--out", decided, "--threshold", "0.5") == 0
    decided.write_bytes(b"".join(decided.read_bytes().splitlines(keepends=True)[:3]))
    capsys.readouterr()
    assert predict(run, new, "--out", decided, "--resume", "--threshold", "0.6") == 2
    err = capsys.readouterr().err
    assert "thresholds ({" in err and "0.5" in err and "0.6" in err and "model file" not in err
    # rows written by an older imgcls (no sidecar) resume with a warning, and get one
    out.write_bytes(b"".join(lines[:4]))
    meta_path(out).unlink()
    with caplog.at_level(logging.WARNING, logger="imgcls"):
        assert predict(run, new, "--out", out, "--resume") == 0
    assert "has rows but no rows.csv.meta.json" in caplog.text
    assert out.read_bytes() == full
    now = json.loads(meta_path(out).read_text())
    assert now["rows_before_meta"] == 3 and now["complete"] and now["fingerprint"] == meta["fingerprint"]


def test_progress_says_how_many_inputs_were_skipped(trained, tmp_path, caplog):
    run, new = trained
    out = tmp_path / "rows.jsonl"
    assert predict(run, new, "--out", out) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:7]))
    with caplog.at_level(logging.INFO, logger="imgcls"):
        assert main(["predict", str(run), str(new), "--out", str(out), "--resume"]) == 0
    assert "its 7 rows are the first 7 inputs, skipped" in caplog.text
    assert len(out.read_bytes().splitlines()) == 24


# --------------------------------------------------------------------------- 2. kill -9 at random moments

_RUN = textwrap.dedent("""
    import sys, time
    import numpy as np
    import imgcls.prediction.predict
    from imgcls.cli import main
    from imgcls.data.preprocess import Preprocess

    def engine(batch):  # slow enough to be killed mid-run; deterministic logits from the mean colour
        time.sleep(0.03)
        return (batch.reshape(len(batch), 3, -1).mean(-1) / 16.0).astype(np.float32)

    imgcls.prediction.predict.load = lambda *a, **k: imgcls.prediction.predict.Predictor(
        engine, ["empty", "deer", "fox"], Preprocess(input_size=8, resize="squash", crop_pct=1.0), "fake",
        batch_size=2)
    sys.exit(main(["-q", "predict", "RUN", *sys.argv[1:]]))
""")


def _start(*args):
    return subprocess.Popen([sys.executable, "-c", _RUN, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _same_camtrap(a, b):
    """Two Camtrap DP folders say the same (the classification time is when each run finished)."""
    rows_a, rows_b = csv_rows(a / "observations.csv"), csv_rows(b / "observations.csv")
    for rows in (rows_a, rows_b):
        for row in rows:
            row.pop("classificationTimestamp")
    return rows_a == rows_b and (a / "media.csv").read_bytes() == (b / "media.csv").read_bytes()


FORMATS = {  # name: (--out, extra options, the files compared)
    "csv": ("out.csv", [], lambda a, b: a.read_bytes() == b.read_bytes()),
    "jsonl-events": ("out.jsonl", ["--aggregate", "mean"],
                     lambda a, b: a.read_bytes() == b.read_bytes() and
                     a.with_name("out.events.jsonl").read_bytes() == b.with_name("out.events.jsonl").read_bytes()),
    "megadetector": ("out.json", [], lambda a, b: json.loads(a.read_text())["images"] ==
                     json.loads(b.read_text())["images"]),
    "camtrapdp": ("out", ["--events"], _same_camtrap),
}


@pytest.fixture(scope="module")
def sixty(tmp_path_factory):
    root = tmp_path_factory.mktemp("sixty")
    make_class_tree(root / "img", {f"cam{i}": 15 for i in range(4)}, size=(8, 8), seed=5)
    (root / "img" / "cam1" / "cam1_broken.png").write_bytes(b"junk")
    return root / "img"


@pytest.mark.parametrize("name", list(FORMATS))
def test_kill_9_at_random_moments_then_resume_finishes_every_format(sixty, tmp_path, name):
    out_name, options, same = FORMATS[name]
    full = tmp_path / "full" / out_name
    full.parent.mkdir()
    t0 = time.perf_counter()
    reference = _start(sixty, "--out", full, *options)
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    span = time.perf_counter() - t0
    rng = random.Random(f"kill-{name}")
    kills = 0
    for series in range(2):  # a run killed at a random moment (start-up, rows, final files), its resume too
        folder = tmp_path / f"killed{series}"
        folder.mkdir()
        out = folder / out_name
        for moment in (rng.uniform(0.05, 1.0) * span, rng.uniform(0.0, 0.6) * span):
            proc = _start(sixty, "--out", out, *options, "--resume")
            time.sleep(moment)
            if proc.poll() is not None:  # it finished first
                assert proc.returncode == 0, proc.stderr.read()
                continue
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            kills += 1
        done = _start(sixty, "--out", out, *options, "--resume")
        assert done.wait(timeout=120) == 0, done.stderr.read()
        assert same(full, out)
        left = sorted(p.name for p in folder.iterdir())  # no journal, lock or temp file
        assert left == sorted(p.name for p in full.parent.iterdir())
        meta = json.loads(meta_path(out).read_text())
        assert meta["complete"] and meta["rows"] == 61
    assert kills >= 2


# --------------------------------------------------------------------------- 3. lazy inputs


def _tricky_tree(root):
    for rel in ["a/x.png", "a.png", "a b/c.jpg", "a-b/d.jpg", "A/e.png", "a/b/c/f.png", "a/b.png", ".hidden/g.png",
                "z/.h.png", "z/j.PNG", "z/notes.txt", "Ä/l.png", "a0/m.png", "deep/1/2/3/4/n.webp"]:
        write_image(root / rel, size=(8, 8))
    os.symlink(root / "a", root / "link-to-folder")  # not followed, as rglob does not
    os.symlink(root / "a.png", root / "y.png")        # a link to a file is an input


def test_lazy_walk_gives_the_order_of_the_old_sorted_rglob(tmp_path):
    _tricky_tree(tmp_path / "t")
    old = _images_under(tmp_path / "t")  # the eager walk collect_inputs used before
    assert [r.path for r in collect_inputs([tmp_path / "t"])] == old
    assert [r.path for r in iter_inputs([tmp_path / "t"])] == old
    assert [key for _, key in keyed_inputs([tmp_path / "t"])] == \
        [p.relative_to(tmp_path / "t").as_posix() for p in old]


def test_inputs_are_enumerated_lazily(tmp_path):
    for folder in ("a", "m"):
        write_image(tmp_path / "t" / folder / "1.png", size=(8, 8))
    records = iter_inputs([tmp_path / "t"])
    assert next(records).path == tmp_path / "t" / "a" / "1.png"
    write_image(tmp_path / "t" / "m" / "late.png", size=(8, 8))  # made after the walk began, in a folder not yet read
    assert [r.path.name for r in records] == ["1.png", "late.png"]


def test_a_csv_of_paths_streams_in_the_order_of_the_file(tmp_path):
    names = [f"img/{i % 7}/{i}.png" for i in range(40)]
    for name in names:
        write_image(tmp_path / name, size=(8, 8))
    (tmp_path / "list.csv").write_text("id;path\n" + "".join(f"{i};{n}\n" for i, n in enumerate(reversed(names))))
    _, rows = read_csv(tmp_path / "list.csv")
    expected = [tmp_path / row["path"] for _, row in rows]
    assert [r.path for r in iter_inputs([tmp_path / "list.csv"])] == expected
    assert [r.path for r in collect_inputs([tmp_path / "list.csv", tmp_path / "img" / "3"])] == \
        expected + sorted((tmp_path / "img" / "3").iterdir())


# --------------------------------------------------------------------------- 4. shards


def _files(root, n_folders=12, per=9):
    for f in range(n_folders):
        for i in range(per):
            path = root / f"site{f % 3}" / f"cam{f}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()  # enumeration never opens a file
    return [r.path for r in iter_inputs([root])]


@pytest.mark.parametrize("by", ["path", "folder"])
def test_shards_partition_the_inputs(tmp_path, by):
    everything = _files(tmp_path / "data")
    n = 5
    shards = [[r.path for r in select(keyed_inputs([tmp_path / "data"]), parse_shard(f"{k}/{n}", by))]
              for k in range(1, n + 1)]
    assert sorted(p for shard in shards for p in shard) == sorted(everything)  # union = all, no repeats
    assert sum(map(len, shards)) == len(everything)
    for shard in shards:
        assert shard == [p for p in everything if p in set(shard)]  # input order kept
    if by == "folder":  # a camera's folder stays whole
        owner = {p.parent: k for k, shard in enumerate(shards) for p in shard}
        assert all(owner[p.parent] == k for k, shard in enumerate(shards) for p in shard)
        assert len(owner) == 12
    assert sum(1 for shard in shards if shard) >= 3
    # from another working directory, with the data elsewhere: the same shards (keys are relative)
    moved = tmp_path / "moved" / "copy"
    shutil.copytree(tmp_path / "data", moved)
    again = [[r.path.relative_to(moved) for r in select(keyed_inputs([moved]), parse_shard(f"{k}/{n}", by))]
             for k in range(1, n + 1)]
    assert again == [[p.relative_to(tmp_path / "data") for p in shard] for shard in shards]


def test_shards_do_not_depend_on_the_python_process(tmp_path):
    keys = [f"cam{i}/{j}.jpg" for i in range(20) for j in range(5)]
    here = [shard_of(k, 7) for k in keys] + [shard_of(k, 7, "folder") for k in keys]
    code = ("import json, sys; from imgcls.prediction.shards import shard_of; keys = json.loads(sys.argv[1]);"
            "print(json.dumps([shard_of(k, 7) for k in keys] + [shard_of(k, 7, 'folder') for k in keys]))")
    for seed in ("1", "2"):
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(keys)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60)
        assert json.loads(proc.stdout) == here
    assert set(here) == set(range(1, 8))


def test_shard_outputs_record_their_shard_and_refuse_another(trained, tmp_path, capsys):
    run, new = trained
    parts = [tmp_path / f"part_{k}.csv" for k in (1, 2, 3)]
    for k, part in enumerate(parts, start=1):
        assert predict(run, new, "--out", part, "--shard", f"{k}/3", "--shard-by", "folder") == 0
        assert json.loads(meta_path(part).read_text())["shard"] == {"k": k, "n": 3, "by": "folder"}
    rows = [csv_rows(p) for p in parts]
    assert sorted(r["path"] for shard in rows for r in shard) == sorted(r["path"] for r in
                                                                          csv_rows(_whole(run, new, tmp_path)))
    cameras = [{os.path.basename(os.path.dirname(r["path"])) for r in shard} for shard in rows]
    assert sum(map(len, cameras)) == 4  # each camera in one shard
    lines = parts[0].read_bytes().splitlines(keepends=True)
    if len(lines) > 2:
        parts[0].write_bytes(b"".join(lines[:2]))
    capsys.readouterr()
    assert predict(run, new, "--out", parts[0], "--shard", "2/3", "--shard-by", "folder", "--resume") == 2
    assert "shard (1/3 by folder -> 2/3 by folder)" in capsys.readouterr().err
    for bad in ("0/3", "4/3", "3", "a/b"):
        assert predict(run, new, "--out", tmp_path / "x.csv", "--shard", bad) == 2
        assert "expected K/N" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def _whole(run, new, tmp_path):
    out = tmp_path / "whole.csv"
    if not out.exists():
        assert predict(run, new, "--out", out) == 0
    return out
