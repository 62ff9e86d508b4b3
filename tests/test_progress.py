"""Progress output: a tqdm bar on a terminal, whole lines in a file or pipe."""

import logging
import os
import subprocess
import sys

from imgcls import progress

from conftest import FAST


def test_plain_progress_logs_lines_not_carriage_returns(monkeypatch, caplog):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    caplog.set_level(logging.INFO, logger="imgcls")
    bar = progress.bar(range(5), desc="decode", unit="img")
    assert isinstance(bar, progress.PlainProgress)
    assert list(bar) == [0, 1, 2, 3, 4]
    assert [r.getMessage() for r in caplog.records][-1].startswith("decode: 5/5 img in ")
    caplog.clear()
    # a bar that vanishes on a terminal says nothing when it ends quickly ...
    assert list(progress.bar(range(3), desc="epoch 1/2", leave=False)) == [0, 1, 2]
    assert not caplog.records
    # ... and a long phase gets a line every interval
    slow = progress.PlainProgress(total=4, desc="predict", unit="img", leave=False, interval=0.0)
    slow.set_postfix(loss="0.5")
    slow.update()
    slow.update(3)
    slow.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[1].startswith("predict: 4/4 img in") and lines[1].endswith("loss=0.5)")


def test_train_piped_to_a_file_writes_one_line_per_epoch(tiny_tree, tmp_path):
    log_file = tmp_path / "train.log"
    options = [f"--model={FAST['model']}", "--batch-size=8", "--workers=0", "--warmup-epochs=0",
               "--int8=off", "--no-calibrate", f"--cache-dir={tmp_path / 'cache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log_file.open("w") as out:
        subprocess.run([sys.executable, "-m", "imgcls.cli", "train", str(tiny_tree), "--out", str(tmp_path / "run"),
                        "--epochs", "3", *options], stdout=out, stderr=subprocess.STDOUT, check=True, env=env,
                       timeout=600)
    text = log_file.read_text()
    assert "\r" not in text
    for epoch in (1, 2, 3):
        assert sum(line.startswith(f"epoch {epoch}/3") for line in text.splitlines()) == 1, text
