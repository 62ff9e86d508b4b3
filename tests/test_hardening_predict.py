"""Hardening of the prediction side: the output file, resume, hostile inputs, what model files may say.

Most tests use a fake engine (mean colour -> logits), so no model is trained;
those that need real processes (the output lock, FIFOs) run small scripts in
subprocesses with a timeout.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from imagezoo import make_class_tree, write_extreme_aspect_png, write_fifo, write_image

from imgcls.cli import main
from imgcls.data.decode import ImageError
from imgcls.data.preprocess import Augment, Preprocess
from imgcls.errors import UserError
from imgcls.prediction.predict import Predictor, predict_to_csv

SMALL = Preprocess(input_size=32, resize="squash", crop_pct=1.0)
SHORTER = Preprocess(input_size=32, resize="shorter", crop_pct=0.875)
LABELS = ["cat", "dog", "fox"]


class FakeEngine:
    """Mean colour -> logits; raises KeyboardInterrupt on call number ``stop_at`` (a Ctrl-C mid-run)."""

    def __init__(self, stop_at: int | None = None):
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return (batch.reshape(len(batch), 3, -1).mean(-1) / 16.0).astype(np.float32)


def predictor(stop_at=None, spec=SMALL) -> Predictor:
    return Predictor(FakeEngine(stop_at), LABELS, spec, batch_size=2)


def rows_of(path):
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def images(tmp_path):
    tree = make_class_tree(tmp_path / "img", {"cat": 4, "dog": 4}, seed=2)
    return tmp_path / "img", [p for paths in tree.values() for p in paths]


# --------------------------------------------------------------------------- 1. one writer per output

_WRITER = textwrap.dedent("""
    import sys, time, pathlib
    import numpy as np
    from imgcls.data.preprocess import Preprocess
    from imgcls.errors import UserError
    from imgcls.prediction.predict import Predictor, predict_to_csv

    folder, out, go = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])

    def engine(batch):  # waits for the test's go-ahead: the run holds its output meanwhile
        deadline = time.time() + 50
        while not go.exists() and time.time() < deadline:
            time.sleep(0.02)
        return np.zeros((len(batch), 3), np.float32)

    p = Predictor(engine, ["a", "b", "c"], Preprocess(input_size=32, resize="squash", crop_pct=1.0), batch_size=2)
    try:
        result = predict_to_csv(p, [folder], out, progress=False, overwrite="--overwrite" in sys.argv)
    except UserError as err:
        print("imgcls: error:", err)
        sys.exit(2)
    print(result["images"])
""")


def test_a_second_writer_of_the_same_output_is_refused(images, tmp_path):
    folder, files = images
    out, go = tmp_path / "out.csv", tmp_path / "go"
    args = [sys.executable, "-c", _WRITER, str(folder), str(out), str(go)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out.exists() and out.stat().st_size) and time.time() < deadline:  # its header is written
            time.sleep(0.05)
        assert out.exists(), first.stderr.read() if first.poll() is not None else "first writer did not start"
        second = subprocess.run(args + ["--overwrite"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert "another imgcls predict" in second.stdout and str(out) in second.stdout
        go.touch()
        stdout, stderr = first.communicate(timeout=60)
    finally:
        go.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert stdout.strip() == str(len(files))
    assert [r["path"] for r in rows_of(out)] == [str(p) for p in sorted(files)]  # one writer's rows, in order
    assert not (tmp_path / "out.csv.lock").exists()  # released and removed on exit


def test_the_lock_is_released_on_ctrl_c(images, tmp_path):
    folder, files = images
    out = tmp_path / "out.csv"
    with pytest.raises(KeyboardInterrupt):
        predict_to_csv(predictor(stop_at=2), [folder], out, progress=False)
    assert not (tmp_path / "out.csv.lock").exists()
    result = predict_to_csv(predictor(), [folder], out, progress=False, resume=True)  # not refused as locked
    assert result["kept"] == 2 and result["images"] == len(files) - 2


# --------------------------------------------------------------------------- 2. what may be replaced


@pytest.mark.parametrize("content", ["remember the milk\n", '{"a": 1}', "x", "path,label\n"])
def test_a_file_that_is_not_our_empty_output_is_never_replaced(images, tmp_path, content):
    folder, _ = images
    out = tmp_path / "notes.txt"
    out.write_text(content)
    with pytest.raises(UserError, match="not an imgcls predict CSV.*--overwrite"):
        predict_to_csv(predictor(), [folder], out, progress=False)
    with pytest.raises(UserError, match="not an imgcls predict CSV"):
        predict_to_csv(predictor(), [folder], out, progress=False, resume=True)
    assert out.read_text() == content
    predict_to_csv(predictor(), [folder], out, progress=False, overwrite=True)
    assert len(rows_of(out)) == 8


@pytest.mark.parametrize("content", ["", "path,label,prob,error\r\n", "path,label,prob,error\n"])
def test_our_header_alone_or_an_empty_file_is_replaced(images, tmp_path, content):
    folder, _ = images
    out = tmp_path / "out.csv"
    out.write_text(content)
    predict_to_csv(predictor(), [folder], out, progress=False)
    assert len(rows_of(out)) == 8


# --------------------------------------------------------------------------- 3. arguments before files


def test_bad_arguments_leave_the_output_untouched(images, tmp_path, capsys):
    folder, _ = images
    out = tmp_path / "big.csv"
    predict_to_csv(predictor(), [folder] * 250, out, progress=False)
    before = out.read_bytes()
    assert len(rows_of(out)) == 2000
    for kwargs, message in [(dict(batch_size=0), "--batch-size must be at least 1"),
                            (dict(top_k=0), "--top-k must be at least 1")]:
        with pytest.raises(UserError, match=message):
            predict_to_csv(predictor(), [folder], out, progress=False, overwrite=True, **kwargs)
    with pytest.raises(UserError, match="no such file"):
        predict_to_csv(predictor(), [tmp_path / "missing"], out, progress=False, overwrite=True)
    # the command line checks them before it even loads the model
    for option in (["--batch-size", "0"], ["--top-k", "0"]):
        code = main(["-q", "predict", str(tmp_path / "no-run"), str(folder), "--out", str(out), "--overwrite", *option])
        assert code == 2
        err = capsys.readouterr().err
        assert f"{option[0]} must be at least 1" in err and len(err.strip().splitlines()) == 1
    assert main(["-q", "predict", str(tmp_path / "no-run"), str(folder), "--out", str(out), "--overwrite"]) == 2
    assert out.read_bytes() == before
    with pytest.raises(UserError, match="--top-k must be at least 1"):
        list(predictor().iter_predict([folder], top_k=0))


# --------------------------------------------------------------------------- 4. resume by position


def _interrupted_then_resumed(inputs, out, stop_at=3):
    with pytest.raises(KeyboardInterrupt):
        predict_to_csv(predictor(stop_at), inputs, out, progress=False)
    return predict_to_csv(predictor(), inputs, out, progress=False, resume=True)


def test_resume_with_a_newline_in_a_path(tmp_path):
    files = [write_image(tmp_path / f"{i}.png", color=(40 * i, 90, 10)) for i in range(5)]
    files.insert(1, write_image(tmp_path / "two\nlines.png", color=(1, 2, 3)))
    full, out = tmp_path / "full.csv", tmp_path / "out.csv"
    predict_to_csv(predictor(), files, full, progress=False)
    result = _interrupted_then_resumed(files, out)
    assert result["kept"] == 4 and result["images"] == 2
    assert rows_of(out) == rows_of(full)
    assert rows_of(out)[1]["path"] == str(files[1])


def test_resume_with_the_same_file_listed_many_times(tmp_path):
    write_image(tmp_path / "same.png")
    (tmp_path / "list.csv").write_text("path\n" + "same.png\n" * 50)
    out = tmp_path / "out.csv"
    result = _interrupted_then_resumed([tmp_path / "list.csv"], out)
    assert (result["kept"], result["images"]) == (4, 46)
    assert len(rows_of(out)) == 50
    again = predict_to_csv(predictor(), [tmp_path / "list.csv"], out, progress=False, resume=True)
    assert (again["kept"], again["images"]) == (50, 0)  # finished: nothing to add


def test_resume_from_another_working_directory(images, tmp_path, monkeypatch):
    folder, files = images
    out = tmp_path / "out.csv"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        predict_to_csv(predictor(stop_at=3), ["img"], "out.csv", progress=False)
    assert rows_of(out)[0]["path"].startswith("img")  # relative, as given
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = predict_to_csv(predictor(), ["../img"], "../out.csv", progress=False, resume=True)
    assert (result["kept"], result["images"]) == (4, 4)
    assert [os.path.basename(r["path"]) for r in rows_of(out)] == [p.name for p in sorted(files)]


def test_resume_refuses_other_inputs_and_rows_it_did_not_write(images, tmp_path):
    folder, files = images
    out = tmp_path / "out.csv"
    with pytest.raises(KeyboardInterrupt):
        predict_to_csv(predictor(stop_at=3), [folder], out, progress=False)
    with pytest.raises(UserError, match="row 1 is .* but input 1 is .*written for other inputs"):
        predict_to_csv(predictor(), sorted(files)[1:], out, progress=False, resume=True)
    with pytest.raises(UserError, match="holds 4 rows but there are only 2 inputs"):
        predict_to_csv(predictor(), sorted(files)[:2], out, progress=False, resume=True)
    text = out.read_text()
    lines = text.splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + "hand,edited\r\n" + "".join(lines[2:]))
    with pytest.raises(UserError, match=r"out.csv:3: not a row imgcls predict wrote"):
        predict_to_csv(predictor(), [folder], out, progress=False, resume=True)
    # a last row cut inside a quoted field is dropped (the crash case), and the run finishes
    out.write_text(text + '"' + str(sorted(files)[4]) + "\nhalf")
    result = predict_to_csv(predictor(), [folder], out, progress=False, resume=True)
    assert (result["kept"], result["images"]) == (4, 4)
    assert [r["path"] for r in rows_of(out)] == [str(p) for p in sorted(files)]


def test_file_names_that_are_not_utf8_are_written_and_resumed(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: a surrogate in the str
    try:
        write_image(folder / odd)
    except (OSError, UnicodeEncodeError):
        pytest.skip("the file system refuses names that are not UTF-8")
    for i in range(3):
        write_image(folder / f"ok{i}.png")
    out = tmp_path / "out.csv"
    result = _interrupted_then_resumed([folder], out, stop_at=2)
    assert (result["kept"], result["images"]) == (2, 2)
    assert b"caf\xe9.png" in out.read_bytes()
    assert sorted(r["path"] for r in rows_of(out)) == sorted(str(p) for p in folder.iterdir())


# --------------------------------------------------------------------------- 5. FIFOs never hang

_FIFO_SCRIPT = textwrap.dedent("""
    import sys, json
    import numpy as np
    from imgcls.data.preprocess import Preprocess
    from imgcls.data.scan import check_image
    from imgcls.data.sources import collect_inputs, load_dataset
    from imgcls.errors import UserError
    from imgcls.prediction.predict import Predictor, predict_to_csv

    fifo, listing, fifo_csv, labelled, out = sys.argv[1:6]
    engine = lambda batch: np.zeros((len(batch), 3), np.float32)
    p = Predictor(engine, ["a", "b", "c"], Preprocess(input_size=32, resize="squash", crop_pct=1.0))
    predict_to_csv(p, [fifo, listing], out, progress=False)
    try:
        collect_inputs([fifo_csv])
        refused = ""
    except UserError as err:
        refused = str(err)
    dataset = load_dataset(labelled)  # training: the scan checks every file
    reasons = [check_image(r.path) for r in dataset.splits["all"]]
    print(json.dumps({"refused": refused, "reasons": reasons}))
""")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX named pipes")
def test_fifos_become_rows_with_a_reason_and_never_hang(tmp_path):
    import json

    fifo = write_fifo(tmp_path / "pipe.png")
    good = write_image(tmp_path / "good.png")
    (tmp_path / "list.csv").write_text("path\npipe.png\ngood.png\n")
    fifo_csv = write_fifo(tmp_path / "pipe.csv")
    (tmp_path / "labels.csv").write_text("path,label\npipe.png,cat\ngood.png,dog\n")
    out = tmp_path / "out.csv"
    proc = subprocess.run([sys.executable, "-c", _FIFO_SCRIPT, str(fifo), str(tmp_path / "list.csv"), str(fifo_csv),
                           str(tmp_path / "labels.csv"), str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = rows_of(out)
    assert [r["error"] for r in rows] == ["not a regular file (a FIFO)"] * 2 + [""]
    assert rows[2]["path"] == str(good)
    assert "pipe.csv" in result["refused"] and "not a regular file (a FIFO)" in result["refused"]
    assert result["reasons"] == ["not a regular file (a FIFO)", None]


# --------------------------------------------------------------------------- 6. extreme aspect ratios


def test_extreme_aspect_ratios_become_rows_with_a_reason(tmp_path):
    tall = write_extreme_aspect_png(tmp_path / "tall.png", 1, 2_000_000)
    wide = write_extreme_aspect_png(tmp_path / "wide.png", 100_000, 1)
    assert tall.stat().st_size < 8192 and wide.stat().st_size < 1024
    panorama = write_image(tmp_path / "panorama.png", size=(400, 40))  # 10:1 is fine
    out = tmp_path / "out.csv"
    predict_to_csv(Predictor(FakeEngine(), LABELS, SHORTER), [tall, wide, panorama], out, progress=False)
    rows = rows_of(out)
    assert rows[0]["error"].startswith("extreme aspect ratio: 1x2000000")
    assert rows[1]["error"].startswith("extreme aspect ratio: 100000x1")
    assert rows[2]["error"] == "" and rows[2]["label"]


def test_training_augmentation_refuses_extreme_aspect_ratios_too(tmp_path):
    pytest.importorskip("torch")
    from imgcls.data.dataset import base_image

    tall = write_extreme_aspect_png(tmp_path / "tall.png", 1, 100_000)
    for augment in (Augment(), None):
        with pytest.raises(ImageError, match="extreme aspect ratio"):
            base_image(tall, SHORTER, augment)


# --------------------------------------------------------------------------- 7. model files


def _onnx_model(path, n_outputs: int, props: dict[str, str]):
    """A hand-built ONNX model: uint8 (N,3,32,32) -> mean colour (N, n_outputs); no torch needed."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0)]
    if n_outputs != 3:
        nodes.append(helper.make_node("Slice", ["m", "starts", "ends", "axes"], ["logits"]))
        inits = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in
                 (("starts", 0), ("ends", n_outputs), ("axes", 1))]
    else:
        nodes.append(helper.make_node("Identity", ["m"], ["logits"]))
        inits = []
    graph = helper.make_graph(nodes, "fake",
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_outputs])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


GOOD_SPEC = '{"input_size": 32, "resize": "squash", "crop_pct": 1.0}'


def test_onnx_labels_must_match_the_output_width_at_load(tmp_path, images):
    from imgcls.prediction.predict import load

    folder, _ = images
    ok = _onnx_model(tmp_path / "ok.onnx", 3, {"imgcls.labels": '["a", "b", "c"]', "imgcls.preprocess": GOOD_SPEC})
    assert len(load(ok).predict([folder])) == 8
    bad = _onnx_model(tmp_path / "bad.onnx", 2, {"imgcls.labels": '["a", "b", "c"]', "imgcls.preprocess": GOOD_SPEC})
    with pytest.raises(UserError, match=r"bad.onnx: .*names 3 classes but the model outputs 2"):
        load(bad)


@pytest.mark.parametrize("spec", ['{"input_size": "big"}', '{"input_size": 32, "mean": [0.5, "x", 0.5]}',
                                  '{"input_size": 32, "mean": 0.5}', '{"input_size": 32, "crop_pct": null}',
                                  '{"input_size": 32, "resize": "zoom"}', '{"input_size": 32, "std": [1, 1, 0]}',
                                  '[32]', '{"input_size": 32'])
def test_malformed_onnx_preprocessing_is_a_user_error_naming_the_file(tmp_path, spec):
    from imgcls.prediction.predict import load

    path = _onnx_model(tmp_path / "model.onnx", 3, {"imgcls.labels": '["a", "b", "c"]', "imgcls.preprocess": spec})
    with pytest.raises(UserError, match="model.onnx"):
        load(path)
