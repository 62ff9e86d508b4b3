"""The command line end to end: train -> eval -> predict, and its error messages."""

import csv
import json
import os
import subprocess
import sys

import pytest
from imagezoo import make_class_tree, write_bad_file_zoo, write_image

from imgcls.cli import main

TRAIN = ["--model", "cifarnet", "--epochs", "3", "--batch-size", "8", "--workers", "0", "--lr", "0.003",
         "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_class_tree(root / "data" / "train", {"cat": 14, "dog": 14, "fox": 14, "owl": 14, "yak": 14}, seed=1)
    make_class_tree(root / "data" / "test", {"cat": 4, "dog": 4, "fox": 4, "owl": 4, "yak": 4}, seed=2)
    assert main(["-q", "train", str(root / "data"), "--out", str(root / "run"), *TRAIN]) == 0
    return root


def test_train_reports_test_split(trained):
    summary = json.loads((trained / "run" / "summary.json").read_text())
    assert summary["n_test"] == 20 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert (trained / "run" / "test_confusion_matrix.png").exists()


def test_eval_json(trained, capsys):
    assert main(["eval", str(trained / "run"), str(trained / "data"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"accuracy", "balanced_accuracy", "top5_accuracy", "per_class", "confusion_matrix"} <= set(metrics)
    assert metrics["top5_accuracy"] == 1.0  # 5 classes: top-5 always right
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["n"] == 20
    summary = json.loads((trained / "run" / "summary.json").read_text())
    assert metrics["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert (trained / "run" / "eval_confusion_matrix.csv").exists()


def test_predict_folder_with_bad_files_and_top_k(trained, tmp_path):
    inputs = tmp_path / "new"
    make_class_tree(inputs / "x", {"cat": 2, "owl": 2}, seed=5)
    zoo = write_bad_file_zoo(inputs / "odd")
    out = tmp_path / "pred.csv"
    assert main(["-q", "predict", str(trained / "run"), str(inputs), "--out", str(out), "--top-k", "3",
                 "--backend", "torch"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "prob", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3",
                             "error"]
    by_name = {row["path"].split("/")[-1]: row for row in rows}
    for entry in zoo.values():
        row = by_name[entry.path.name]
        assert bool(row["error"]) == bool(entry.reason), (entry.path.name, row)
    good = [r for r in rows if not r["error"]]
    assert all(r["label"] == r["label_1"] and float(r["prob_1"]) >= float(r["prob_2"]) >= float(r["prob_3"])
               for r in good)
    assert len(rows) == 4 + len(zoo)


def test_predict_single_file_matches_python_api(trained, tmp_path):
    import imgcls

    image = write_image(tmp_path / "one.png", color=(30, 200, 90), pattern="noise")
    out = tmp_path / "p.csv"
    assert main(["-q", "predict", str(trained / "run" / "model.safetensors"), str(image), "--out", str(out)]) == 0
    row = next(csv.DictReader(out.open()))
    api_row = imgcls.load(trained / "run" / "model.safetensors").predict([image])[0]
    assert row["label"] == api_row["label"]
    assert float(row["prob"]) == pytest.approx(api_row["prob"], abs=1e-6)


@pytest.mark.parametrize("args, message", [
    (["train", "{tmp}/missing", "--out", "{tmp}/r"], "no such file or folder"),
    (["train", "{tmp}/bad.csv", "--out", "{tmp}/r"], "missing column"),
    (["train", "{tmp}/tree", "--out", "{tmp}/r", "--model", "vgg17"], "unknown model"),
    (["train", "{tmp}/tree", "--out", "{tmp}/r", "--model", "cifarnet", "--input-size", "4096"], "out of range|takes inputs"),
    (["eval", "{tmp}/missing", "{tmp}/tree"], "no such run directory"),
    (["predict", "{tmp}/tree", "{tmp}/tree", "--out", "{tmp}/p.csv"], "not an imgcls run directory"),
    (["train", "{tmp}/tree", "--out", "{tmp}/bad.csv"], "is a file"),
    (["train", "{tmp}/tree", "--out", "{tmp}/r", "--model", "resnet18", "--input-size", "16"], "from 32 to 384 px"),
    (["train", "{tmp}/tree", "--out", "{tmp}/r", "--lr", "-1"], "--lr -1.0 is out of range"),
    (["train", "{tmp}/tree", "--out", "{tmp}/r", "--val-fraction", "1"], "--val-fraction 1.0 is out of range"),
    (["train", "{tmp}/tree", "--out", "{tmp}/r", "--label-smoothing", "1.5"], "--label-smoothing"),
    (["stats", "{tmp}/bad.csv/inside"], "no such file|Not a directory"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    _assert_one_line_error(tmp_path, capsys, args, message)


def test_file_system_errors_exit_2_with_one_line(trained, tmp_path, capsys):
    # the helper writes {tmp}/bad.csv: a file, so no folder can be made under it
    args = ["predict", str(trained / "run"), str(trained / "data" / "test"), "--out", "{tmp}/bad.csv/p.csv"]
    _assert_one_line_error(tmp_path, capsys, args, "bad.csv.*check the path, its permissions and free space")


def _assert_one_line_error(tmp_path, capsys, args, message):
    import re

    make_class_tree(tmp_path / "tree", {"a": 2, "b": 2})
    (tmp_path / "bad.csv").write_text("file,species\nx.png,a\n")
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("imgcls: error:") and len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "imgcls.cli", "train", "/nonexistent/x", "--out", "/tmp/x"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no such file or folder" in result.stderr


def test_training_exports_onnx_and_predict_uses_it(trained, tmp_path):
    import imgcls

    summary = json.loads((trained / "run" / "summary.json").read_text())
    assert summary["onnx"].endswith("model.onnx")
    onnx_model = imgcls.load(trained / "run", precision="fp32")  # CPU: ONNX Runtime by default
    torch_model = imgcls.load(trained / "run", backend="torch")
    assert onnx_model.backend == "onnxruntime fp32 (model.onnx)" and torch_model.backend.startswith("torch")
    images = sorted((trained / "data" / "test").rglob("*.png"))
    a, b = onnx_model.predict(images), torch_model.predict(images)
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert max(abs(x["prob"] - y["prob"]) for x, y in zip(a, b)) < 1e-4


def test_predict_from_onnx_file_without_torch(trained, tmp_path):
    """The exported file alone predicts in an environment where torch cannot be imported."""
    image = write_image(tmp_path / "one.png", color=(200, 30, 30), pattern="noise")
    out = tmp_path / "p.csv"
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'timm'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from imgcls.cli import main\n"
        f"code = main(['-q', 'predict', {str(trained / 'run' / 'model.onnx')!r}, {str(image)!r}, '--out', {str(out)!r}])\n"
        "assert 'torch' not in sys.modules\n"
        "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    row = next(csv.DictReader(out.open()))
    assert row["label"] in {"cat", "dog", "fox", "owl", "yak"} and not row["error"]


def test_loading_an_onnx_run_does_not_import_torch_without_a_gpu(trained):
    import os

    if any(os.path.exists(n) for n in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")):
        pytest.skip("a GPU is present: torch is imported to use it")
    code = (f"import sys, imgcls; p = imgcls.load({str(trained / 'run')!r}); "
            "assert p.backend.startswith('onnxruntime'); assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_export_int8_reports_accuracy(trained, tmp_path):
    out = tmp_path / "m.int8.onnx"
    code = main(["-q", "export", str(trained / "run"), "--int8", "--out", str(out)])
    report = json.loads((trained / "run" / "export.json").read_text())
    assert {"fp32_val_accuracy", "int8_val_accuracy"} <= set(report)
    if report["fp32_val_accuracy"] - report["int8_val_accuracy"] > 0.01:
        assert code == 2 and not out.exists()  # refused, with the numbers
    else:
        assert code == 0 and out.exists()


def test_final_metrics_come_from_the_exported_model_and_match_torch(trained):
    import imgcls

    run = trained / "run"
    saved = json.loads((run / "test.json").read_text())
    torch_metrics = imgcls.evaluate(run, trained / "data", split="test", backend="torch", write=False)
    assert saved["accuracy"] == torch_metrics.accuracy
    assert abs(saved["loss"] - torch_metrics.loss) < 1e-4
    assert saved["confusion_matrix"] == torch_metrics.confusion.tolist()


def test_interrupted_predict_keeps_its_rows_and_resume_finishes_it(trained, tmp_path, capsys, monkeypatch):
    import imgcls
    from imgcls.prediction.predict import predict_to_csv

    inputs = tmp_path / "new"
    make_class_tree(inputs, {"cat": 5, "owl": 4}, seed=6)
    full, out = tmp_path / "full.csv", tmp_path / "part.csv"
    assert main(["-q", "predict", str(trained / "run"), str(inputs), "--out", str(full), "--top-k", "2"]) == 0
    expected = list(csv.DictReader(full.open()))

    predictor = imgcls.load(trained / "run")
    engine, calls = predictor.engine, []

    def interrupted_on_third_batch(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return engine(batch)

    predictor.engine = interrupted_on_third_batch
    with pytest.raises(KeyboardInterrupt):
        predict_to_csv(predictor, [inputs], out, batch_size=2, top_k=2, progress=False)
    kept = list(csv.DictReader(out.open()))
    assert kept == expected[:4]  # the two finished batches survived the interrupt
    with out.open("a") as handle:  # and a crash in the middle of writing a row is tolerated
        handle.write(str(inputs / "cat" / "cat_0004.png") + ",ca")  # not among the finished rows

    # the same command again refuses to replace finished work ...
    args = ["-q", "predict", str(trained / "run"), str(inputs), "--out", str(out), "--top-k", "2"]
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    # ... finishes it with --resume (no image predicted twice, however the folder is spelled) ...
    monkeypatch.chdir(tmp_path)
    assert main(args[:3] + ["./new/"] + args[4:] + ["--resume"]) == 0
    assert "(+ 4 kept from before)" in capsys.readouterr().out

    def absolute(rows):
        return [{**row, "path": os.path.abspath(row["path"])} for row in rows]

    assert absolute(csv.DictReader(out.open())) == absolute(expected)
    # ... refuses a resume with other columns, and starts afresh with --overwrite (or when only a header is there)
    assert main(args[:-2] + ["--top-k", "3", "--resume"]) == 2
    assert "another --top-k" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert list(csv.DictReader(out.open())) == expected
    out.write_text(full.read_text().splitlines()[0] + "\n")
    assert main(args) == 0
    assert list(csv.DictReader(out.open())) == expected


def test_prediction_batches_default_to_8_on_a_cpu(trained, tmp_path):
    import imgcls

    inputs = tmp_path / "new"
    make_class_tree(inputs, {"cat": 10, "owl": 10}, seed=7)
    for backend in ("onnx", "torch"):
        predictor = imgcls.load(trained / "run", backend=backend)
        engine, sizes = predictor.engine, []
        predictor.engine = lambda batch: sizes.append(len(batch)) or engine(batch)
        rows = predictor.predict([inputs])
        assert len(rows) == 20 and sizes == [8, 8, 4], backend  # 8 a call: as fast as 32 there, a quarter the memory
        sizes.clear()
        predictor.predict([inputs], batch_size=32)
        assert sizes == [20]
    with pytest.raises(imgcls.UserError, match="at least 1"):
        predictor.predict([inputs], batch_size=0)


@pytest.mark.parametrize("shape", ["3x0x0", "banana", "3x224"])
def test_summary_input_shape_is_checked(shape, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "cifarnet", "--input", shape])
    assert exit_info.value.code == 2
    assert "argument --input" in capsys.readouterr().err


def test_every_command_s_help_prints_every_flag(capsys):
    """argparse formats help text with %: one literal % in a help ("30% of the steps") broke `train --help`."""
    from imgcls.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert {"train", "eval", "predict", "serve"} <= set(commands)
    for name, parser in commands.items():
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
        printed = capsys.readouterr().out
        for action in parser._actions:
            for option in action.option_strings:
                assert option in printed, (name, option)
        if name == "train":
            assert "30% of the steps" in " ".join(printed.split())  # the % printed once, as written


def test_the_libraries_info_logs_stay_off_the_console():
    # ORT's quantizer says "Performing symbolic shape inference..." at INFO in every int8 export; a process
    # of its own, since pytest's log capture changes the root logger
    names = ["imgcls", "onnxruntime.quantization.shape_inference", "onnxscript", "onnx_ir"]
    code = ("import logging; from imgcls.cli import main; main(['recipes']); "
            f"print([logging.getLogger(n).isEnabledFor(logging.INFO) for n in {names!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[True, False, False, False]"
