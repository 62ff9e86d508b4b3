"""`imgcls demo` and `imgcls stats` end to end."""

import json

from imgcls.cli import main


def test_demo_trains_evaluates_and_predicts(tmp_path, capsys):
    assert main(["-q", "demo", "--out", str(tmp_path), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"test accuracy: {summary['test_accuracy']:.4f}" in out
    assert summary["test_accuracy"] > 0.8  # 3 epochs; the full demo (15) reaches ~0.99
    assert (tmp_path / "run" / "test_confusion_matrix.png").exists()
    assert sum(1 for line in out.splitlines() if "->" in line) == 5  # sample predictions
    assert len(list((tmp_path / "digits" / "train").iterdir())) == 10


def test_stats_prints_mean_and_std(tmp_path, capsys):
    from PIL import Image

    for label, value in (("dark", 51), ("light", 204)):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (16, 16), (value, value, value)).save(tmp_path / label / f"{i}.png")
    assert main(["stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mean: 0.5000, 0.5000, 0.5000" in out  # (0.2 + 0.8) / 2
    assert "std:  0.3000, 0.3000, 0.3000" in out
