"""``imgcls predict --ray``: the same rows as a local run, computed by Ray Data actors; a kill of a --ray run
and --resume; the one-line hint without the extra.

One local Ray instance with 2 CPUs serves the module (its start-up costs 10-20 s on a small machine): the
in-process CLI uses that connection, a subprocess connects to it by address.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from imagezoo import make_class_tree
from PIL import Image

import imgcls
from imgcls.cli import main

LABELS = ["empty", "deer", "fox"]
NEEDS_RAY = "needs Ray Data: pip install 'imgcls[cluster]'"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model on ONNX Runtime and 40 new images to predict, one of them corrupt."""
    root = tmp_path_factory.mktemp("cluster")
    make_class_tree(root / "data", {label: 14 for label in LABELS}, size=(32, 32), seed=3)
    result = imgcls.train(root / "data", root / "run", epochs=3, progress=False, **{**FAST, "export_onnx": True})
    make_class_tree(root / "new", {"empty": 13, "deer": 13, "fox": 13}, size=(32, 32), seed=9)
    (root / "new" / "deer" / "deer_9999.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert imgcls.load(result.run_dir).backend.startswith("onnxruntime")
    return result.run_dir, root / "new"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs for the module; yields its address."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        pytest.skip(NEEDS_RAY)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def csv_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("window", [None, 16], ids=["one-window", "windows-of-16"])
def test_ray_gives_the_rows_of_a_local_run(trained, cluster, tmp_path, capsys, caplog, monkeypatch, window):
    """Also when the inputs go through in windows (40 inputs in windows of 16: three actor pools)."""
    if window:
        import imgcls.prediction.cluster
        monkeypatch.setattr(imgcls.prediction.cluster, "WINDOW", window)
    caplog.set_level(logging.INFO, logger="imgcls")
    run, new = trained
    local, remote = tmp_path / "local.csv", tmp_path / "ray.csv"
    assert main(["-q", "predict", str(run), str(new), "--out", str(local), "--top-k", "3"]) == 0
    assert main(["-q", "predict", str(run), str(new), "--out", str(remote), "--top-k", "3", "--ray", cluster,
                 "--ray-actors", "2", "--batch-size", "4"]) == 0
    assert "40 images" in capsys.readouterr().out
    assert [r.args[0] for r in caplog.records if r.msg.startswith("ray: %d images")] == ([16, 16, 8] if window else [40])
    a, b = csv_rows(local), csv_rows(remote)
    assert len(a) == len(b) == 40
    assert [r["path"] for r in b] == [r["path"] for r in a]  # input order
    assert [r["error"] for r in b] == [r["error"] for r in a]
    assert [os.path.basename(r["path"]) for r in b if r["error"]] == ["deer_9999.png"]  # a row, not a failure
    for x, y in zip(a, b):
        assert [x[f"label_{k}"] for k in (1, 2, 3)] == [y[f"label_{k}"] for k in (1, 2, 3)]
        if not x["error"]:
            np.testing.assert_allclose([float(y[f"prob_{k}"]) for k in (1, 2, 3)],
                                       [float(x[f"prob_{k}"]) for k in (1, 2, 3)], atol=1e-5)


def _slow_inputs(root, new):
    """30 tiny images, then 20 large smooth PNGs (each a fraction of a second to decode): with one actor and
    --batch-size 4 (chunks of 32), the second chunk is still being decoded when the first chunk's rows are on
    disk."""
    folder = root / "slow"
    folder.mkdir()
    tiny = sorted(p for p in new.rglob("*.png") if "9999" not in p.name)[:30]
    for i, path in enumerate(tiny):
        shutil.copyfile(path, folder / f"img_{i:03d}.png")
    pixels = np.zeros((4000, 4000, 3), np.uint8)
    pixels[..., 0] = np.arange(4000)[None, :] % 256
    Image.fromarray(pixels).save(folder / "img_030.png")
    for i in range(31, 50):
        shutil.copyfile(folder / "img_030.png", folder / f"img_{i:03d}.png")
    return folder, sorted(str(p) for p in folder.iterdir())


def test_a_killed_ray_run_resumes_to_one_row_per_input_in_order(trained, cluster, tmp_path, capsys):
    run, new = trained
    folder, inputs = _slow_inputs(tmp_path, new)
    out = tmp_path / "rows.csv"
    cmd = [sys.executable, "-m", "imgcls.cli", "-q", "predict", str(run), str(folder), "--out", str(out),
           "--batch-size", "4", "--ray", cluster, "--ray-actors", "1"]  # one actor: chunks done in order
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 21:  # header + 20 rows
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = len(csv_rows(out))
    assert 20 <= kept < 50

    assert main(["-q", "predict", str(run), str(folder), "--out", str(out), "--batch-size", "4", "--resume",
                 "--ray", cluster]) == 0
    assert f"{50 - kept} images (+ {kept} kept from before)" in capsys.readouterr().out  # only the rest was sent
    rows = csv_rows(out)
    assert [r["path"] for r in rows] == inputs  # exactly one row per input, in input order
    assert all(r["label"] in LABELS and not r["error"] for r in rows)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_ctrl_c_stops_the_local_cluster_it_started_and_keeps_the_rows(trained, tmp_path, capsys):
    """--ray alone starts a cluster of this machine; Ctrl-C exits 130, keeps the rows and leaves no Ray process."""
    pytest.importorskip("ray.data", reason=NEEDS_RAY)
    run, new = trained
    folder, inputs = _slow_inputs(tmp_path, new)
    out = tmp_path / "rows.csv"
    cmd = [sys.executable, "-m", "imgcls.cli", "-q", "predict", str(run), str(folder), "--out", str(out),
           "--batch-size", "4", "--ray", "--ray-actors", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, ray_processes = time.monotonic() + 180, set()
        while time.monotonic() < deadline and proc.poll() is None:
            ray_processes |= _descendants(proc.pid)
            if out.exists() and out.read_text().count("\n") >= 21:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before Ctrl-C: {proc.communicate()}"
        assert ray_processes, "--ray started no processes"
        at_signal, t_signal = out.read_text().count("\n"), time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        err += f"\n{at_signal} lines at the signal, exit {time.monotonic() - t_signal:.1f} s later"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(map(_alive, ray_processes)):
        time.sleep(0.2)
    assert not [pid for pid in ray_processes if _alive(pid)]
    kept = len(csv_rows(out))
    assert 20 <= kept < 50, err
    assert main(["-q", "predict", str(run), str(folder), "--out", str(out), "--resume"]) == 0  # locally
    assert f"{50 - kept} images (+ {kept} kept from before)" in capsys.readouterr().out
    assert [r["path"] for r in csv_rows(out)] == inputs


def test_without_ray_the_option_says_what_to_install(trained, tmp_path, monkeypatch, capsys):
    run, new = trained
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    out = tmp_path / "rows.csv"
    assert main(["predict", str(run), str(new), "--out", str(out), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install "imgcls[cluster]"' in err
    assert not out.exists()


def test_more_actors_or_gpus_than_the_cluster_has_is_a_user_error(trained, cluster, tmp_path, capsys):
    run, new = trained
    for option, hint in ((["--ray-actors", "5"], "--ray-actors 2 or fewer"), (["--ray-gpus-per-actor", "1"], "0 GPUs")):
        out = tmp_path / "rows.csv"
        assert main(["-q", "predict", str(run), str(new), "--out", str(out), "--ray", cluster, *option]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and hint in err, err
    assert main(["predict", str(run), str(new), "--out", str(tmp_path / "x.csv"), "--ray-actors", "2"]) == 2
    assert "go with --ray" in capsys.readouterr().err
    # nothing listens there: one line at once (Ray itself would retry for minutes), no output touched
    assert main(["-q", "predict", str(run), str(new), "--out", str(tmp_path / "y.csv"), "--ray", "127.0.0.1:1"]) == 2
    assert "no Ray cluster answers there" in capsys.readouterr().err and not (tmp_path / "y.csv").exists()
