"""Hostile use of train, eval and export: never lose work, never leak a traceback, exit codes that tell."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import FAST
from imagezoo import make_class_tree

import imgcls
from imgcls import rundir
from imgcls.cli import main


def _cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "imgcls.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _in_process(capsys, *args):
    """`imgcls ARGS` in this process (no interpreter and torch start-up per call), like _cli."""
    capsys.readouterr()
    with warnings.catch_warnings():  # -q changes the warning filters of the process
        code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return _Result(code, captured.out, captured.err)


FAST_ARGS = ["--model", "cifarnet", "--batch-size", "8", "--workers", "0", "--lr", "3e-3", "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 1-epoch run (ONNX exported), trained with relative paths from its parent folder."""
    root = tmp_path_factory.mktemp("hard")
    make_class_tree(root / "data", {"cat": 10, "dog": 10}, seed=2)
    result = _cli("-q", "train", "data", "--out", "runs/a", "--epochs", "1", *FAST_ARGS, cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "runs" / "a"


def _metric_epochs(run: Path) -> list[int]:
    with (run / rundir.METRICS).open(newline="") as handle:
        return [int(r["epoch"]) for r in csv.DictReader(handle)]


def test_resume_of_a_copy_continues_the_copy_from_any_directory(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _cli("-q", "train", "--resume", copy, "--epochs", "2", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert _metric_epochs(copy) == [1, 2]
    assert _metric_epochs(run_dir) == [1]  # the original is untouched
    assert Path(rundir.read_yaml(copy / rundir.CONFIG)["data"]).is_absolute()


def test_resume_of_a_run_whose_metrics_file_has_fewer_columns_keeps_its_header(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with (copy / rundir.METRICS).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["input_size"] == "32"
    older = [c for c in rows[0] if c != "input_size"]  # as written before that column existed
    with (copy / rundir.METRICS).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=older, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow({**rows[0], "epoch": 2})  # written after the checkpoint: the resume drops it
    result = _in_process(capsys, "-q", "train", "--resume", copy, "--epochs", "2")
    assert result.returncode == 0, result.stderr
    with (copy / rundir.METRICS).open(newline="") as handle:
        reader = csv.reader(handle)
        header, *body = list(reader)
    assert header == older and [len(r) for r in body] == [len(older)] * 2
    assert _metric_epochs(copy) == [1, 2]


def test_resume_drops_metrics_rows_written_after_the_checkpoint(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    # killed after epoch 2's metrics row was appended, before its checkpoint was saved
    rundir.append_metrics(copy, {"epoch": 2, "lr": 0.001, "train_loss": 1.0, "train_accuracy": 0.5,
                                 "val_loss": 1.0, "val_accuracy": 0.5, "epoch_seconds": 1.0,
                                 "images_per_second": 1.0})
    assert _metric_epochs(copy) == [1, 2]
    result = _in_process(capsys, "-q", "train", "--resume", copy, "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert _metric_epochs(copy) == [1, 2]
    assert float(list(csv.DictReader((copy / rundir.METRICS).open()))[1]["train_loss"]) != 1.0


def test_out_folder_with_other_files_is_refused(tmp_path, run_dir, capsys):
    mine = tmp_path / "my_stuff"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "config.yaml.bak").write_text("mine too")
    result = _in_process(capsys, "train", run_dir.parent.parent / "data", "--out", mine, "--epochs", "1", *FAST_ARGS)
    assert result.returncode == 2 and "not an imgcls run" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml.bak", "notes.txt"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_training_saves_a_checkpoint_and_exits_with_the_signal(tmp_path, sig, code):
    make_class_tree(tmp_path / "data", {"cat": 40, "dog": 40}, seed=3)
    proc = subprocess.Popen([sys.executable, "-m", "imgcls.cli", "train", tmp_path / "data", "--out", tmp_path / "r",
                             "--epochs", "200", *FAST_ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "r" / rundir.CHECKPOINT).exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err
    assert "--resume" in out and (tmp_path / "r" / rundir.CHECKPOINT).exists()
    summary = json.loads((tmp_path / "r" / rundir.SUMMARY).read_text())
    assert summary["interrupted"] and summary["signal"] == sig


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, mask, mode):
    code = (f"import os; os.umask({mask}); from imgcls import rundir; rundir.write_json({str(tmp_path / 'x.json')!r}, 1)")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode


def test_export_refuses_to_replace_the_runs_own_files(run_dir, capsys):
    weights = (run_dir / rundir.WEIGHTS).read_bytes()
    for out in (run_dir / rundir.WEIGHTS, run_dir / rundir.CONFIG, run_dir / "model.txt"):
        result = _in_process(capsys, "export", run_dir, "--out", out)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (run_dir / rundir.WEIGHTS).read_bytes() == weights


def test_eval_prints_its_metrics_when_the_run_cannot_be_written(run_dir, monkeypatch, capsys):
    import imgcls.api

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(imgcls.api, "write_metrics", refuse)
    assert main(["eval", str(run_dir), str(run_dir.parent.parent / "data")]) == 0
    captured = capsys.readouterr()
    assert "accuracy" in captured.out


def test_rows_naming_the_same_file_stay_in_one_split_and_are_reported(tmp_path):
    files = make_class_tree(tmp_path / "img", {"cat": 12, "dog": 12}, seed=5)
    rows = [(p, c) for c, paths in files.items() for p in paths]
    twice = rows[0][0]
    rows += [(twice, "dog"), (Path(os.path.relpath(twice, tmp_path)), "cat")]  # another label; another spelling
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows((p if Path(p).is_absolute() else p, c) for p, c in rows)
    result = imgcls.train(tmp_path / "labels.csv", tmp_path / "r", epochs=1, progress=False, **FAST)
    groups = [g for g in json.loads((result.run_dir / rundir.SCAN).read_text())["duplicates"]
              if g["kind"] == "same file"]
    assert len(groups) == 1 and len(groups[0]["paths"]) == 3 and len(set(groups[0]["splits"])) == 1
    assert set(groups[0]["labels"]) == {"cat", "dog"}


@pytest.mark.parametrize("damage", ["truncated", "random", "huge header", "bad metadata", "no labels"])
def test_broken_model_files_end_in_one_line(run_dir, tmp_path, damage, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / rundir.ONNX).unlink()
    (copy / rundir.INT8).unlink(missing_ok=True)  # the damaged weights are what predict must read
    weights = copy / rundir.WEIGHTS
    data = weights.read_bytes()
    header = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header])
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        weights.write_bytes(os.urandom(4096))
    elif damage == "huge header":
        weights.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    else:
        imgcls_meta = json.loads(meta["__metadata__"]["imgcls"])
        if damage == "bad metadata":
            imgcls_meta["preprocess"]["input_size"] = "large"
        else:
            imgcls_meta["labels"] = 7
        meta["__metadata__"]["imgcls"] = json.dumps(imgcls_meta)
        blob = json.dumps(meta).encode()
        blob += b" " * (-len(blob) % 8)
        weights.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + header:])
    image = next((run_dir.parent.parent / "data" / "cat").iterdir())
    commands = [["predict", copy, image, "--out", tmp_path / "p.csv"]]
    if damage == "truncated":  # export reads the same file through the same loader
        commands.append(["export", copy])
    for command in commands:
        # one case through a real process (what a user sees), the others in this one
        result = _cli(*command) if damage == "truncated" else _in_process(capsys, *command)
        assert result.returncode == 2, (damage, command, result.stderr)
        assert "Traceback" not in result.stderr and str(weights) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("name, text", [(rundir.CONFIG, "epochs: [unclosed\n"), (rundir.CONFIG, "- a list\n"),
                                        (rundir.CONFIG, "batch_size: many\n"), (rundir.PREPROCESS, "{not json"),
                                        (rundir.PREPROCESS, '{"input_size": -3}'),
                                        (rundir.CHECKPOINT, "garbage")])
def test_resume_of_a_broken_run_ends_in_one_line(run_dir, tmp_path, name, text, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    if name == rundir.CONFIG and text == "batch_size: many\n":
        config = rundir.read_yaml(copy / name)
        config["batch_size"] = "many"
        rundir.write_yaml(copy / name, config)
    else:
        (copy / name).write_text(text)
    run = _cli if name == rundir.CHECKPOINT else (lambda *a: _in_process(capsys, *a))
    result = run("-q", "train", "--resume", copy, "--epochs", "2")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert name in result.stderr or "--batch-size" in result.stderr


def test_pickled_objects_in_a_pth_are_named_as_such(tmp_path):
    import torch

    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole_model.pth")
    from imgcls.errors import UserError
    from imgcls.models.weights import read_state_dict

    with pytest.raises(UserError, match="holds pickled Python objects besides tensors .*Linear"):
        read_state_dict(tmp_path / "whole_model.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x80\x04junk")
    with pytest.raises(UserError, match="not a readable PyTorch weight file"):
        read_state_dict(tmp_path / "junk.pth")


def test_quiet_silences_library_warnings(monkeypatch, capsys):
    import imgcls.cli

    def noisy(args):
        warnings.warn("a library complains", UserWarning)
        print("result")

    monkeypatch.setattr(imgcls.cli, "cmd_models", noisy)
    with warnings.catch_warnings():
        assert main(["-q", "models"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "result\n" and "complains" not in captured.err


def test_a_hostile_tree_through_train_eval_predict_and_export(tmp_path):
    """FIFOs, extreme aspect ratios, lying headers, undecodable names, among good images: every command
    finishes, the bad files become reasons, nothing hangs or leaks a traceback."""
    from imagezoo import write_extreme_aspect_png, write_fifo, write_lying_png

    root = tmp_path / "tree"
    make_class_tree(root, {"cat": 10, "dog": 10}, seed=6)
    bad = [write_fifo(root / "cat" / "pipe.png"), write_extreme_aspect_png(root / "dog" / "thin.png", 1, 2_000_000),
           write_lying_png(root / "cat" / "liar.png", 100_000, 100_000)]
    name = os.fsdecode(b"dog/caf\xe9.png")  # not valid UTF-8
    shutil.copy(next((root / "dog").glob("dog_*")), root / name)
    run = tmp_path / "run"
    steps = [["-q", "train", root, "--out", run, "--epochs", "1", *FAST_ARGS],
             ["-q", "eval", run, root],
             ["-q", "predict", run, root, bad[0], "--out", tmp_path / "rows.csv"],  # a walk skips FIFOs: named
             ["-q", "export", run, "--int8"]]
    for step in steps:
        result = subprocess.run([sys.executable, "-m", "imgcls.cli", *map(os.fsencode, map(str, step))],
                                capture_output=True, timeout=300)
        err = result.stderr.decode(errors="replace")
        assert result.returncode in (0, 2) and "Traceback" not in err, (step, err)
        assert result.returncode == 0 or step[1] == "export", (step, err)  # int8 may be refused by its gate
    reasons = {Path(r["path"]).name: r["reason"] for r in json.loads((run / rundir.SCAN).read_text())["unreadable"]}
    assert {"thin.png", "liar.png"} <= set(reasons) and "pipe.png" not in reasons  # the folder walk skips FIFOs
    with (tmp_path / "rows.csv").open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert len(rows) == 24 and all(rows[p.name]["error"] for p in bad)
    assert "not a regular file" in rows["pipe.png"]["error"]
    assert rows[Path(name).name]["label"] in ("cat", "dog") and not rows[Path(name).name]["error"]
