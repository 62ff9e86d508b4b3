"""Prediction speed and memory against the bars of issue #5 (not a test).

    python benchmarks/predict.py                          # everything, the real sizes (25-40 min on 2 shared cores)
    python benchmarks/predict.py --n 100 --small-n 2000   # a quick check
    python benchmarks/predict.py --parts e2e engine       # some parts only
    python benchmarks/predict.py --parts memory           # peak RSS at 1,000 / 10,000 / 200,000 tiny files

Model: the ImageNet-pretrained EfficientNet-Lite0 run directory that
``benchmarks/make_run.py`` builds (once) in ``<root>/run-lite0``.  Images are
written once under ``<root>`` (default ``/tmp/imgcls-bench``) and reused:
``big/`` holds 2048x1536 JPEGs (quality 90), ``small/`` 320x240 ones, both made
from scikit-image's sample photos (chelsea, coffee, astronaut, rocket, ...)
with random crops, scales and flips, so they decode like photos, not noise.
Smaller ``--n`` / ``--small-n`` use hard-linked subsets (``big-N/``, ``small-N/``).

Parts (``--parts``, default all):

``e2e``  (bar: >= 5x; goal >= 10x)
    Wall time of ``imgcls predict RUN big/ --out X.csv`` in a subprocess,
    start-up included, as a user runs it: on a CPU that is the run's int8
    model (training keeps one when it passes its accuracy gate; this run has
    no split to gate on, so ``model.int8.onnx`` is quantized here, on
    ``--calib`` images of ``<root>/calib/`` that are never timed, into
    ``<root>/run-lite0-int8``, RUN's files linked).  Beside it, in the same
    rounds, the same command with ``--precision fp32``, and a naive pipeline,
    also a subprocess: PIL
    ``open().convert("RGB")``, torchvision ``Resize(resize_size)``,
    ``CenterCrop``, ``ToTensor``, ``Normalize`` with the run's mean/std and
    interpolation, ``DataLoader(batch 32, num_workers=2)``, timm eager fp32
    under ``inference_mode`` with the run's weights.  The three alternate
    (A B C, C B A ... over ``--e2e-rounds``); also reported: the CPU seconds per
    image of each (user + sys of the child and its children, steadier than
    wall time on a shared machine), start-up alone (one image), top-1
    agreement of int8 with fp32 (on the images fp32 is >= 50% sure of) and of
    imgcls with naive, and how many disagreements go away when
    imgcls's engine gets a full-size decode (i.e. are due to reduced-size
    JPEG decoding).
``engine``  (bars: imgcls engine / ORT fp32 >= 1.0; int8 / fp32 >= 1.2)
    Model-only images/s on one batch of real images (``--batch``), round-robin
    over ``--repeats`` rounds after a warm-up (each row in its own process,
    order reversed each round, a pause before every call so no row runs
    beside the still-spinning threads of the one before): the engine ``imgcls.load(RUN)``
    picks, ONNX Runtime with its default session options on the same
    ``model.onnx``, and the int8 model (:func:`imgcls.export.quantize_int8`,
    calibrated on ``--calib`` big images that are not in the timed batch;
    export_run's accuracy gate needs a split.csv this run does not have).
    Also top-1 agreement of int8 with fp32 on ``--agree-n`` images.
``rss``  (bar: peak RSS at 10,000 files <= peak at 1,000 + 100 MB)
    Peak RSS of ``imgcls predict`` (``ru_maxrss`` from ``os.wait4`` of that
    child, a fresh process per measurement, started by a small launcher
    process: see ``run_child``) on ``small-1000/`` and ``small/``, alternating
    over ``--rss-rounds``; one ``/usr/bin/time -f %M`` run as a cross-check.
``threads``
    End-to-end images/s of ``Predictor.iter_probs`` on ``--threads-n`` big
    images with decode workers {1, 2} x ORT intra-op threads {1, 2}
    (``OnnxEngine(threads=...)``), round-robin over ``--repeats`` rounds,
    plus what the defaults resolve to.
``batch``
    ``imgcls predict RUN big/ --batch-size B`` for B in ``--batches`` (default
    8 16 32), alternating over ``--e2e-rounds`` rounds: wall time and peak
    RSS per batch size (the figures behind ``imgcls.prediction.predict.CPU_BATCH``).
``memory``  (bar: peak RSS at 200,000 files <= peak at 10,000 + 50 MB)
    Does memory stay flat in the number of files?  Tiny 8x8 PNGs in camera
    folders of 1,000 (``<root>/tiny/``, made once; the smaller sets are hard
    links to its first folders) and a hand-built ONNX model (uint8 8x8 -> the
    mean colour as 3 logits, with imgcls metadata: no training, no torch).
    Peak RSS (``ru_maxrss`` through the launcher, as ``rss``) of, per size in
    ``--memory-sizes`` (default 1,000 10,000 200,000): enumeration alone
    (``iter_inputs``, and the eager ``collect_inputs`` list beside it), a whole
    ``imgcls predict`` to CSV, ``imgcls predict --shard 1/50`` (the whole
    tree enumerated and hashed, a fiftieth predicted), and ``--resume`` of that
    CSV with its last tenth of rows cut (nine tenths read back and checked).  Needs no run directory:
    ``--parts memory`` alone builds nothing else.
``ray``  (not in the default set: needs ``pip install "imgcls[cluster]"``)
    ``imgcls predict RUN vga-N/`` locally and with ``--ray`` (a local cluster
    of this machine's CPUs) on ``--ray-n`` 640x480 JPEGs, alternating over
    ``--ray-rounds``: wall time of each, Ray's start-up apart, top-1 agreement;
    then in-process the steady rates (local, and per 1-CPU actor once Ray is
    up) and a paper estimate of what 1 million camera-trap photos cost on N
    nodes with M GPUs (``--ray-cores-per-node``, ``--ray-gpu-rate``: assumed).
    ``python benchmarks/predict.py --parts ray --n 32`` (``--n``: the big
    images whose decode rate the estimate uses).

The machine may be shared: every figure comes with the load average at the
time, and ratios are taken between runs made side by side.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from worker_process import WorkerProcess, serve

HERE = Path(__file__).resolve().parent
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "coins")
BIG, SMALL = (2048, 1536), (320, 240)
QUALITY = 90


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}"


def say(*parts) -> None:
    print(*parts, flush=True)


# ----------------------------------------------------------------------------- images

_BASES: dict = {}


def _base(name: str):
    from PIL import Image
    from skimage import data

    if name not in _BASES:
        _BASES[name] = Image.fromarray(getattr(data, name)()).convert("RGB")
    return _BASES[name]


def _make_one(args: tuple[str, int, tuple[int, int]]) -> None:
    """Image ``index``: a random 4:3 crop (40-100% of the photo's side), maybe flipped, scaled to ``size``."""
    from PIL import Image

    path, index, size = args
    rng = np.random.default_rng(index)
    base = _base(PHOTOS[index % len(PHOTOS)])
    w, h = base.size
    ch = rng.uniform(0.4, 1.0) * min(h, w * 3 / 4)
    cw = ch * 4 / 3
    left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    image = base.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    tmp = f"{path}.tmp"
    image.save(tmp, "JPEG", quality=QUALITY)
    os.replace(tmp, path)


def image_folders(root: Path, kind: str, sizes) -> dict[int, Path]:
    """A folder of exactly n images for each n in ``sizes`` (the largest made first: see image_folder)."""
    sizes = sorted(set(sizes), reverse=True)
    return {n: image_folder(root, kind, n) for n in sizes}


def image_folder(root: Path, kind: str, n: int) -> Path:
    """``root/kind`` holding at least ``n`` images (made once), or a hard-linked subset ``root/kind-n`` of exactly n.

    ``root/kind`` itself is returned when it holds exactly n images; ask for the largest
    n first (:func:`image_folders`), or a later call may add files to a folder already handed out.
    """
    size = BIG if kind == "big" else SMALL
    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{kind}_{i:05d}.jpg" for i in range(n)]
    missing = [(str(folder / name), i, size) for i, name in enumerate(names) if not (folder / name).exists()]
    if missing:
        t0 = time.perf_counter()
        say(f"  writing {len(missing)} {size[0]}x{size[1]} JPEGs to {folder} ...")
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(_make_one, missing, chunksize=16))
        say(f"  ... {time.perf_counter() - t0:.0f} s")
    present = sorted(p.name for p in folder.glob(f"{kind}_*.jpg"))
    if present == names:
        return folder
    subset = root / f"{kind}-{n}"
    subset.mkdir(exist_ok=True)
    for name in names:
        if not (subset / name).exists():
            os.link(folder / name, subset / name)
    for extra in set(p.name for p in subset.glob("*.jpg")) - set(names):
        (subset / extra).unlink()
    return subset


def folder_stats(folder: Path) -> str:
    sizes = [p.stat().st_size for p in folder.glob("*.jpg")]
    return f"{len(sizes)} files, mean {statistics.mean(sizes) / 1e3:.0f} kB"


# ----------------------------------------------------------------------------- subprocesses


# Runs one command and reports that process's own wall time, CPU time and peak RSS.  It is a
# separate small process on purpose: Python starts children with vfork/posix_spawn, and Linux
# carries the parent's RSS high-water mark over exec into the child's ru_maxrss, so a child of
# this (large) benchmark process would report at least our own size (measured: a child running
# `true` from an 800 MB parent reports 814 MB; through this launcher 11 MB).
_LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
with open(sys.argv[1], "wb") as out, open(sys.argv[2], "wb") as err:
    proc = subprocess.Popen(sys.argv[3:], stdout=out, stderr=err)
    _, status, ru = os.wait4(proc.pid, 0)
print(json.dumps({"wall": time.perf_counter() - t0, "status": os.waitstatus_to_exitcode(status),
                  "cpu": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024}))
"""


def run_child(cmd: list[str]) -> dict:
    """Run ``cmd``: wall seconds, CPU seconds (user+sys, its waited-for children included), peak RSS (MB).

    Output goes to files, not pipes (nobody reads a pipe while it runs, and tqdm's bar would fill it).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "out"), Path(tmp, "err")
        launcher = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(out), str(err), *cmd],
                                  capture_output=True, text=True, check=True)
        res = json.loads(launcher.stdout)
        res["stdout"], stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    if res["status"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res['status']}):\n{stderr[-3000:]}")
    return res


def time_v_peak_mb(cmd: list[str]) -> float | None:
    """Cross-check: peak RSS of ``cmd`` by GNU time (``/usr/bin/time -f %M``), None without it."""
    if not Path("/usr/bin/time").exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "time")
        subprocess.run(["/usr/bin/time", "-o", str(report), "-f", "%M", *cmd], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return int(report.read_text().split()[-1]) / 1024


def imgcls_cmd(run: Path, inputs: Path, out: Path) -> list[str]:
    """The installed ``imgcls`` console script (beside this interpreter), as a user runs it."""
    script = Path(sys.executable).parent / "imgcls"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "imgcls.cli"]
    return [*head, "predict", str(run), str(inputs), "--out", str(out), "--overwrite"]


def naive_cmd(run: Path, inputs: Path, out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--naive", str(run), str(inputs), str(out)]


def naive_main(run: Path, inputs: Path, out: Path, batch_size: int = 32, workers: int = 2) -> None:
    """The naive pipeline (see the module docstring); writes path,label like imgcls predict."""
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    t_start = time.perf_counter()
    meta = json.loads((run / "preprocess.json").read_text())
    labels = json.loads((run / "labels.json").read_text())
    transform = T.Compose([
        T.Resize(int(meta["input_size"] // meta["crop_pct"]), interpolation=T.InterpolationMode[meta["interpolation"].upper()]),
        T.CenterCrop(meta["input_size"]),
        T.ToTensor(),
        T.Normalize(meta["mean"], meta["std"]),
    ])
    paths = sorted(str(p) for p in inputs.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))

    class Files(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return transform(Image.open(paths[i]).convert("RGB"))

    net = timm.create_model("tf_efficientnet_lite0", num_classes=len(labels))
    net.load_state_dict(load_file(str(run / "model.safetensors")))
    net.eval()
    t_ready = time.perf_counter()
    loader = DataLoader(Files(), batch_size=batch_size, num_workers=workers)
    top1 = []
    with torch.inference_mode():
        for x in loader:
            top1.extend(net(x).argmax(1).tolist())
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows((p, labels[i]) for p, i in zip(paths, top1))
    print(json.dumps({"startup": t_ready - t_start, "loop": time.perf_counter() - t_ready}))


def disagreement_causes(run: Path, ours: dict[str, str], theirs: dict[str, str], ours_csv: Path) -> dict:
    """Where imgcls and the naive pipeline disagree: does a full-size decode (no DCT scaling) fix it?"""
    from imgcls.data.decode import open_image
    from imgcls.data.preprocess import resize_and_crop
    from imgcls.prediction.predict import load as imgcls_load

    with open(ours_csv, newline="") as handle:
        prob = {row["path"]: float(row["prob"] or 0) for row in csv.DictReader(handle)}
    confident = [p for p in ours.keys() & theirs.keys() if prob[p] >= 0.5]
    differ = sorted(p for p in ours.keys() & theirs.keys() if ours[p] != theirs[p])
    fixed = 0
    if differ:
        predictor = imgcls_load(run)
        spec = predictor.preprocess
        for i in range(0, len(differ), 32):
            chunk = differ[i:i + 32]
            x = np.stack([resize_and_crop(open_image(p), spec) for p in chunk])
            top = predictor.engine(x).argmax(1)
            fixed += sum(predictor.labels[t] == theirs[p] for p, t in zip(chunk, top))
    by_photo: dict[str, list[int]] = {}  # photo -> [disagreements, images]
    for path in ours.keys() & theirs.keys():
        stem = Path(path).stem
        photo = PHOTOS[int(stem.split("_")[-1]) % len(PHOTOS)] if stem.split("_")[-1].isdigit() else "?"
        counts = by_photo.setdefault(photo, [0, 0])
        counts[0] += ours[path] != theirs[path]
        counts[1] += 1
    return {"by_photo": by_photo, "confident": len(confident),
            "confident_agreement": (sum(ours[p] == theirs[p] for p in confident) / len(confident)
                                    if confident else float("nan")),
            "disagree": len(differ), "fixed_by_full_decode": int(fixed),
            "median_prob_disagree": statistics.median(prob[p] for p in differ) if differ else float("nan")}


def read_labels(path: Path) -> dict[str, str]:
    with open(path, newline="") as handle:
        return {row["path"]: row["label"] for row in csv.DictReader(handle)}


def agreement(a: dict[str, str], b: dict[str, str]) -> tuple[float, int]:
    common = a.keys() & b.keys()
    if not common:
        return float("nan"), 0
    return sum(a[p] == b[p] for p in common) / len(common), len(common)


# ----------------------------------------------------------------------------- parts


def e2e_run(args, run: Path, big: Path) -> Path:
    """RUN as ``imgcls predict`` finds a trained run: with ``model.int8.onnx`` (see the module docstring)."""
    from imgcls import rundir
    from imgcls.data.preprocess import Preprocess
    from imgcls.export import quantize_int8

    if (run / rundir.INT8).exists():
        return run
    copy = run.with_name(run.name + "-int8")
    copy.mkdir(exist_ok=True)
    for file in run.iterdir():
        if file.is_file() and not file.name.startswith("model.int8") and not (copy / file.name).exists():
            (copy / file.name).symlink_to(file.resolve())
    if not (copy / rundir.INT8).exists():
        # calibration photos of their own (other crops: indices no big/ file uses), never timed
        folder = args.root / "calib"
        folder.mkdir(exist_ok=True)
        calib = [folder / f"calib_{i:05d}.jpg" for i in range(args.calib)]
        for i, path in enumerate(calib):
            if not path.exists():
                _make_one((str(path), 10**6 + i, BIG))
        spec = Preprocess.load(run / rundir.PREPROCESS)
        t0 = time.perf_counter()
        quantize_int8(run / rundir.ONNX, copy / rundir.INT8,
                      (_decode_batch(calib[i:i + 16], spec) for i in range(0, len(calib), 16)))
        say(f"  quantized {copy / rundir.INT8} on {len(calib)} untimed images in {time.perf_counter() - t0:.0f} s")
    return copy


def fp32_cmd(run: Path, inputs: Path, out: Path) -> list[str]:
    return [*imgcls_cmd(run, inputs, out), "--precision", "fp32"]


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def part_e2e(args, run: Path, big: Path, work: Path) -> dict:
    n = len(list(big.glob("*.jpg")))
    run = e2e_run(args, run, big)
    say(f"\n== 1. end to end: imgcls predict (int8, its CPU default; and --precision fp32) vs naive PIL +"
        f" torchvision + DataLoader(2) + eager, {n} images ({folder_stats(big)}) ==")
    one = work / "one"
    one.mkdir(exist_ok=True)
    first = sorted(big.glob("*.jpg"))[0]
    if not (one / first.name).exists():
        os.link(first, one / first.name)
    pipelines = {"imgcls": imgcls_cmd, "fp32": fp32_cmd, "naive": naive_cmd}
    # start-up alone (one image), and a warm-up of the page cache / imports
    startup = {}
    for name, cmd in pipelines.items():
        startup[name] = min(run_child(cmd(run, one, work / f"{name}-one.csv"))["wall"] for _ in range(2))
        say(f"  start-up + 1 image, {name:8s}: {startup[name]:.2f} s  ({load()})")
    results: dict[str, list[dict]] = {name: [] for name in pipelines}
    order = list(pipelines)
    for r in range(args.e2e_rounds):
        for name in (order if r % 2 == 0 else order[::-1]):  # A B C, C B A, ...
            before = load()
            res = run_child(pipelines[name](run, big, work / f"{name}.csv"))
            res["load"] = f"{before} -> {load()}"
            results[name].append(res)
            say(f"  round {r + 1} {name:8s} wall {res['wall']:7.1f} s  {n / res['wall']:6.1f} img/s"
                f"  cpu {1e3 * res['cpu'] / n:6.1f} ms/img  peak rss {res['rss_mb']:5.0f} MB  ({res['load']})")
    ours, theirs = read_labels(work / "imgcls.csv"), read_labels(work / "naive.csv")
    agree, common = agreement(ours, theirs)
    fp32_rows = read_rows(work / "fp32.csv")
    sure = [p for p, row in fp32_rows.items() if p in ours and float(row["prob"] or 0) >= 0.5]
    int8_agree, _ = agreement(ours, {p: row["label"] for p, row in fp32_rows.items()})
    int8_sure = sum(ours[p] == fp32_rows[p]["label"] for p in sure) / len(sure) if sure else float("nan")
    diag = disagreement_causes(run, ours, theirs, work / "imgcls.csv")
    wall = {name: min(r["wall"] for r in rs) for name, rs in results.items()}
    cpu = {name: min(r["cpu"] for r in rs) for name, rs in results.items()}
    per_round = {name: [nv["wall"] / im["wall"] for im, nv in zip(results[name], results["naive"])]
                 for name in ("imgcls", "fp32")}
    say(f"  best wall: imgcls int8 {wall['imgcls']:.1f} s ({n / wall['imgcls']:.1f} img/s), fp32 {wall['fp32']:.1f} s"
        f" ({n / wall['fp32']:.1f} img/s), naive {wall['naive']:.1f} s ({n / wall['naive']:.1f} img/s)")
    for name, what in (("imgcls", "int8, the default"), ("fp32", "--precision fp32")):
        say(f"  speed-up, imgcls {what} (naive wall / imgcls wall): best {wall['naive'] / wall[name]:.2f}x, per round "
            + ", ".join(f"{x:.2f}x" for x in per_round[name]) + "   [bar >= 5x, goal >= 10x]")
    say(f"  int8 / fp32 end to end: best {wall['fp32'] / wall['imgcls']:.2f}x, per round "
        + ", ".join(f"{a['wall'] / b['wall']:.2f}x" for b, a in zip(results["imgcls"], results["fp32"])))
    say(f"  CPU time per image: imgcls int8 {1e3 * cpu['imgcls'] / n:.1f} ms, fp32 {1e3 * cpu['fp32'] / n:.1f} ms,"
        f" naive {1e3 * cpu['naive'] / n:.1f} ms -> {cpu['naive'] / cpu['imgcls']:.2f}x"
        f" ({cpu['naive'] / cpu['fp32']:.2f}x) less CPU")
    say(f"  top-1 agreement int8 vs fp32: {100 * int8_agree:.2f}% of {len(fp32_rows)};"
        f" {100 * int8_sure:.2f}% of the {len(sure)} where fp32 is >= 50% sure")
    say(f"  top-1 agreement imgcls (int8) vs naive: {100 * agree:.2f}% of {common};"
        f" {100 * diag['confident_agreement']:.2f}% of the {diag['confident']} where imgcls is >= 50% sure")
    if diag["disagree"]:
        say(f"  of the {diag['disagree']} disagreements, {diag['fixed_by_full_decode']} go away when imgcls's engine"
            f" gets a full-size decode instead of the reduced-size (DCT-scaled) one; median imgcls top-1 prob on"
            f" them {diag['median_prob_disagree']:.2f} (images the model is unsure about)")
        say("  disagreements by source photo: " + ", ".join(
            f"{photo} {d}/{t}" for photo, (d, t) in sorted(diag["by_photo"].items())))
    return {"disagreement": diag, "n": n, "wall": wall, "cpu": cpu, "startup": startup,
            "speedup_best": wall["naive"] / wall["imgcls"], "speedup_best_fp32": wall["naive"] / wall["fp32"],
            "speedup_rounds": per_round["imgcls"], "speedup_rounds_fp32": per_round["fp32"], "agreement": agree,
            "int8_fp32_agreement": int8_agree, "int8_fp32_agreement_sure": int8_sure,
            "rounds": {k: [{x: v for x, v in r.items() if x != "stdout"} for r in rs] for k, rs in results.items()}}


def _decode_batch(paths, spec) -> np.ndarray:
    from imgcls.data.decode import load_uint8

    return np.stack([load_uint8(p, spec) for p in paths])


SETTLE = 0.2  # seconds between timed calls; see part_engine


def engine_worker(kind: str, model: Path, batch_file: Path) -> None:
    """One engine in its own process: answers each stdin line with the images/s of one call."""
    x = np.load(batch_file)
    if kind == "imgcls":
        from imgcls.prediction.predict import load as imgcls_load

        call = imgcls_load(model).engine
    elif kind == "imgcls-onnx":
        from imgcls.prediction.engines import OnnxEngine

        call = OnnxEngine(model)
    else:  # "ort": ONNX Runtime's default session
        import onnxruntime as ort

        plain = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        call = lambda batch: plain.run(None, {"images": batch})[0]  # noqa: E731

    def handle(_line: str) -> dict:
        t0 = time.perf_counter()
        call(x)
        return {"ips": len(x) / (time.perf_counter() - t0)}

    serve(handle, ready=repr(call))


def engine_process(kind: str, model: Path, batch_file: Path) -> WorkerProcess:
    return WorkerProcess([sys.executable, str(Path(__file__).resolve()), "--engine-worker", kind, str(model),
                          str(batch_file)])


def part_engine(args, run: Path, big: Path, work: Path) -> dict:
    from imgcls.prediction.engines import OnnxEngine
    from imgcls.export import quantize_int8
    from imgcls.prediction.predict import load as imgcls_load

    say(f"\n== 2. model only: batch {args.batch} of real 224 px images, {args.repeats} rounds after a warm-up ==")
    predictor = imgcls_load(run)
    spec = predictor.preprocess
    paths = sorted(big.glob("*.jpg"))
    batch_file = work / "engine-batch.npy"
    np.save(batch_file, _decode_batch(paths[:args.batch], spec))
    int8_path = run / f"model.int8-calib{args.calib}.onnx"  # cached per calibration size
    if not int8_path.exists():
        calib = paths[args.batch:args.batch + args.calib]
        t0 = time.perf_counter()
        quantize_int8(run / "model.onnx", int8_path,
                      (_decode_batch(calib[i:i + 16], spec) for i in range(0, len(calib), 16)))
        say(f"  quantized {int8_path} on {len(calib)} calibration images in {time.perf_counter() - t0:.0f} s")

    # Fairness, three ways.  (1) Every row runs in its own process: two identical ORT sessions
    # in one process differ by ~2% depending on which was created first.  (2) A SETTLE pause
    # before each call: a default session's threads keep spinning after run() returns and
    # slowed the row timed after it to 0.84-0.86x.  (3) The order reverses every round.
    rows = {
        "imgcls.load(RUN) fp32": engine_process("imgcls", run, batch_file),
        "ORT fp32, default session": engine_process("ort", run / "model.onnx", batch_file),
        "imgcls OnnxEngine int8": engine_process("imgcls-onnx", int8_path, batch_file),
        "ORT int8, default session": engine_process("ort", int8_path, batch_file),
    }
    say(f"  imgcls engine: {rows['imgcls.load(RUN) fp32'].ready}")
    samples: dict[str, list[float]] = {k: [] for k in rows}
    try:
        for r in range(args.repeats + 1):
            for name, worker in (list(rows.items()) if r % 2 else list(rows.items())[::-1]):
                time.sleep(SETTLE)
                ips = worker.ask()["ips"]
                if r:
                    samples[name].append(ips)
            say(f"  round {r}/{args.repeats} ({load()})")
    finally:
        for proc in rows.values():
            proc.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    best = {k: max(v) for k, v in samples.items()}
    for name in rows:
        say(f"  {name:42s} median {med[name]:6.1f} img/s  best {best[name]:6.1f}")
    keys = list(rows)
    ratio_engine = med[keys[0]] / med[keys[1]]
    ratio_int8 = med[keys[2]] / med[keys[0]]
    # the same ratios round by round (each round's calls are side by side)
    per_round_engine = [a / b for a, b in zip(samples[keys[0]], samples[keys[1]])]
    per_round_int8 = [a / b for a, b in zip(samples[keys[2]], samples[keys[0]])]
    say(f"  imgcls engine / ORT fp32 default: {ratio_engine:.2f}x (median of medians; per-round median"
        f" {statistics.median(per_round_engine):.2f}x)   [bar >= 1.0]")
    say(f"  int8 / fp32 (imgcls engines): {ratio_int8:.2f}x (per-round median {statistics.median(per_round_int8):.2f}x)"
        f"   [bar >= 1.2]")
    int8 = OnnxEngine(int8_path)

    # int8 vs fp32 top-1 on images neither the timing batch nor the calibration used
    held = paths[args.batch + args.calib:][:args.agree_n]
    same = total = same_sure = sure = 0
    for i in range(0, len(held), 32):
        x = _decode_batch(held[i:i + 32], spec)
        fp32_probs = predictor.predict_proba(x)
        match = fp32_probs.argmax(1) == int8(x).argmax(1)
        confident = fp32_probs.max(1) >= 0.5
        same, total = same + int(match.sum()), total + len(x)
        same_sure, sure = same_sure + int(match[confident].sum()), sure + int(confident.sum())
    agree = same / total if total else float("nan")
    say(f"  top-1 agreement int8 vs fp32: {100 * agree:.2f}% of {total} held-out images;"
        f" {100 * same_sure / max(1, sure):.2f}% of the {sure} where fp32 is >= 50% sure")
    return {"median": med, "best": best, "engine_vs_ort": ratio_engine, "int8_vs_fp32": ratio_int8,
            "per_round_engine": per_round_engine, "per_round_int8": per_round_int8, "int8_agreement": agree}


def part_rss(args, run: Path, root: Path, work: Path) -> dict:
    small_n = args.small_n
    base_n = max(1, small_n // 10)
    folders = image_folders(root, "small", (small_n, base_n))
    folders = {base_n: folders[base_n], small_n: folders[small_n]}
    say(f"\n== 3. peak RSS of imgcls predict: {base_n} vs {small_n} files of {SMALL[0]}x{SMALL[1]}"
        f" ({folder_stats(folders[small_n])}), fresh process each ==")
    peaks: dict[int, list[float]] = {k: [] for k in folders}
    for r in range(args.rss_rounds):
        for k in (list(folders) if r % 2 == 0 else list(folders)[::-1]):
            before = load()
            res = run_child(imgcls_cmd(run, folders[k], work / f"rss-{k}.csv"))
            peaks[k].append(res["rss_mb"])
            say(f"  round {r + 1} {k:6d} files: peak rss {res['rss_mb']:6.1f} MB  wall {res['wall']:6.1f} s"
                f" ({k / res['wall']:.0f} img/s)  ({before} -> {load()})")
    check = time_v_peak_mb(imgcls_cmd(run, folders[base_n], work / "rss-check.csv"))
    if check is not None:
        say(f"  cross-check, /usr/bin/time -f %M on {base_n} files: {check:.1f} MB")
    growth = max(peaks[small_n]) - max(peaks[base_n])
    say(f"  peak RSS: {base_n} files {max(peaks[base_n]):.1f} MB, {small_n} files {max(peaks[small_n]):.1f} MB"
        f" -> +{growth:.1f} MB   [bar <= +100 MB]")
    return {"peaks_mb": peaks, "growth_mb": growth, "time_v_mb": check}


def part_batch(args, run: Path, big: Path, work: Path) -> dict:
    n = len(list(big.glob("*.jpg")))
    say(f"\n== 5. imgcls predict on {n} big JPEGs by --batch-size {args.batches}, {args.e2e_rounds} rounds ==")
    results: dict[int, list[dict]] = {b: [] for b in args.batches}
    for r in range(args.e2e_rounds):
        for b in (args.batches if r % 2 == 0 else args.batches[::-1]):
            res = run_child(imgcls_cmd(run, big, work / f"batch{b}.csv") + ["--batch-size", str(b)])
            results[b].append(res)
            say(f"  round {r + 1} batch {b:3d}: wall {res['wall']:6.2f} s  {n / res['wall']:6.1f} img/s"
                f"  peak rss {res['rss_mb']:5.0f} MB  ({load()})")
    summary = {b: {"wall_best": min(x["wall"] for x in rs), "rss_mb": max(x["rss_mb"] for x in rs)}
               for b, rs in results.items()}
    for b, row in summary.items():
        say(f"  batch {b:3d}: best wall {row['wall_best']:.2f} s, peak rss {row['rss_mb']:.0f} MB")
    return summary


def part_threads(args, run: Path, big: Path) -> dict:
    from imgcls.data.records import Record
    from imgcls.prediction.engines import OnnxEngine, available_cpus
    from imgcls.prediction.predict import Predictor
    from imgcls.system import default_workers as default_decode_workers
    from imgcls.prediction.predict import load as imgcls_load

    base = imgcls_load(run)
    records = [Record(p) for p in sorted(big.glob("*.jpg"))[:args.threads_n]]
    n = len(records)
    say(f"\n== 4. iter_probs end to end on {n} big images: decode workers x ORT intra-op threads,"
        f" {args.repeats} rounds after a warm-up ==")
    say(f"  defaults here: decode workers {default_decode_workers()}, ORT threads {available_cpus()}"
        f" ({len(os.sched_getaffinity(0))} CPUs)")
    configs = [(w, t) for w in (1, 2) for t in (1, 2)]
    predictors = {c: Predictor(OnnxEngine(run / "model.onnx", threads=c[1]), base.labels, base.preprocess)
                  for c in configs}
    samples: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    for r in range(args.repeats + 1):
        order = configs[r % len(configs):] + configs[:r % len(configs)]  # rotate who goes first
        for c in order:
            t0 = time.perf_counter()
            for _ in predictors[c].iter_probs(records, workers=c[0]):
                pass
            if r:
                samples[c].append(n / (time.perf_counter() - t0))
        say(f"  round {r}/{args.repeats} ({load()})" + ("" if not r else "  " + ", ".join(
            f"w{c[0]}/t{c[1]} {samples[c][-1]:.1f}" for c in configs)))
    med = {c: statistics.median(v) for c, v in samples.items()}
    ref = med[(2, 2)]
    for c in configs:
        ratios = [a / b for a, b in zip(samples[c], samples[(2, 2)])]  # side by side, round by round
        say(f"  decode workers {c[0]}, ORT threads {c[1]}: median {med[c]:6.1f} img/s  best {max(samples[c]):6.1f}"
            f"  ({med[c] / ref:.2f}x of workers 2 / threads 2; per round "
            + " ".join(f"{x:.2f}" for x in ratios) + ")")
    best = max(configs, key=lambda c: med[c])
    say(f"  best: decode workers {best[0]}, ORT threads {best[1]}")
    return {"median": {f"w{c[0]}t{c[1]}": v for c, v in med.items()},
            "samples": {f"w{c[0]}t{c[1]}": v for c, v in samples.items()}, "best": f"w{best[0]}t{best[1]}"}


TINY_FOLDER = 1000  # files per camera folder of the memory part


def tiny_tree(root: Path, n: int) -> Path:
    """``root/tiny-n``: n 8x8 PNGs in folders of TINY_FOLDER, hard links into ``root/tiny`` (made once)."""
    import io as _io

    from PIL import Image

    full, tree = root / "tiny", root / f"tiny-{n}"
    if tree.exists() and sum(1 for _ in tree.rglob("*.png")) == n:
        return tree
    rng = np.random.default_rng(0)
    for i in range(n):
        folder, name = f"cam{i // TINY_FOLDER:04d}", f"img{i % TINY_FOLDER:04d}.png"
        src = full / folder / name
        if not src.exists():
            src.parent.mkdir(parents=True, exist_ok=True)
            buffer = _io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
            src.write_bytes(buffer.getvalue())
        dest = tree / folder / name
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dest)
    return tree


def tiny_onnx(path: Path) -> Path:
    """A hand-built ONNX model: uint8 (N,3,8,8) -> the mean colour (N,3), labels and preprocessing inside."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["logits"], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.UINT8,
                                                                            ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in (("imgcls.labels", '["red", "green", "blue"]'), ("imgcls.model", "tiny-mean-colour"),
                       ("imgcls.preprocess", '{"input_size": 8, "resize": "squash", "crop_pct": 1.0}')):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


_ENUMERATE = """
import sys
from imgcls.data.sources import collect_inputs, iter_inputs
n = len(collect_inputs([sys.argv[2]])) if sys.argv[1] == "list" else sum(1 for _ in iter_inputs([sys.argv[2]]))
print(n)
"""


def part_memory(args, root: Path, work: Path) -> dict:
    sizes = sorted(args.memory_sizes)
    model = tiny_onnx(work / "tiny.onnx")
    say(f"\n== 6. peak RSS against the number of files: {', '.join(map(str, sizes))} 8x8 PNGs in folders of"
        f" {TINY_FOLDER}, a hand-built ONNX model; fresh process each ==")
    trees = {}
    for n in sizes:
        t0 = time.perf_counter()
        trees[n] = tiny_tree(root, n)
        say(f"  {trees[n]}: {n} files ready in {time.perf_counter() - t0:.0f} s")
    results: dict[int, dict] = {}
    for n in sizes:
        row = {}
        for what in ("lazy", "list"):
            res = run_child([sys.executable, "-c", _ENUMERATE, what, str(trees[n])])
            assert int(res["stdout"].split()[-1]) == n, res["stdout"]
            row[f"enumerate_{what}"] = res["rss_mb"]
        # with the progress bar (to a file), so its counting walk is measured too
        predict = [sys.executable, "-m", "imgcls.cli", "predict", str(model), str(trees[n]), "--overwrite", "--out"]
        res = run_child(predict + [str(work / f"memory-{n}.csv")])
        row["predict"], row["predict_wall"] = res["rss_mb"], res["wall"]
        res = run_child(predict + [str(work / f"memory-{n}-shard.csv"), "--shard", "1/50"])
        row["shard"], row["shard_wall"] = res["rss_mb"], res["wall"]
        # an interrupted run: the last tenth of the rows gone, then --resume (the rows read back as a stream)
        out = work / f"memory-{n}.csv"
        lines = out.read_bytes().splitlines(keepends=True)
        out.write_bytes(b"".join(lines[:len(lines) - n // 10]))
        res = run_child([a for a in predict if a != "--overwrite"] + [str(out), "--resume"])
        row["resume"], row["resume_wall"] = res["rss_mb"], res["wall"]
        results[n] = row
        say(f"  {n:7d} files: enumerate lazily {row['enumerate_lazy']:6.1f} MB (as a list"
            f" {row['enumerate_list']:6.1f} MB); predict all {row['predict']:6.1f} MB in {row['predict_wall']:5.0f} s"
            f" ({n / row['predict_wall']:.0f} img/s); --shard 1/50 {row['shard']:6.1f} MB in {row['shard_wall']:4.0f} s;"
            f" --resume of the last tenth {row['resume']:6.1f} MB  ({load()})")
    if len(sizes) >= 2:
        a, b = sizes[-2], sizes[-1]
        for key in ("enumerate_lazy", "enumerate_list", "predict", "shard", "resume"):
            say(f"  {key}: {b} files - {a} files = {results[b][key] - results[a][key]:+.1f} MB"
                + ("   [bar <= +50 MB]" if key in ("predict", "shard", "resume") else ""))
    return results


# ----------------------------------------------------------------------------- ray (imgcls predict --ray)

VGA = (640, 480)


def vga_folder(root: Path, n: int) -> Path:
    """``root/vga-N``: n 640x480 JPEGs made like the others (own folder: the shared helpers know two sizes)."""
    folder = root / f"vga-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    names = [folder / f"vga_{i:05d}.jpg" for i in range(n)]
    missing = [(str(path), i, VGA) for i, path in enumerate(names) if not path.exists()]
    if missing:
        say(f"  writing {len(missing)} {VGA[0]}x{VGA[1]} JPEGs to {folder} ...")
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(_make_one, missing, chunksize=16))
    return folder


def _timed_stream(stream) -> tuple[list, list[float]]:
    """Consume ``(record, logits, error)`` results; their arrival times (perf_counter) beside them."""
    results, times = [], []
    for item in stream:
        results.append(item)
        times.append(time.perf_counter())
    return results, times


def _decode_rate(paths: list[Path], spec) -> float:
    """Images/s of imgcls's decode + resize alone on one thread (what a decode core sustains)."""
    from imgcls.data.decode import load_uint8

    t0 = time.perf_counter()
    for path in paths:
        load_uint8(path, spec)
    return len(paths) / (time.perf_counter() - t0)


def part_ray(args, run: Path, big: Path, work: Path) -> dict:
    """``imgcls predict`` locally and with ``--ray`` (a local cluster of this machine) on the same JPEGs:
    end-to-end wall time of each as a user runs it, Ray's start-up apart, the steady per-actor rate, and a
    paper estimate for a cluster from that rate."""
    import re

    from imgcls.prediction.cluster import connect, ray_predictor
    from imgcls.data.records import Record
    from imgcls.prediction.predict import load as imgcls_load

    vga = vga_folder(args.root, args.ray_n)
    n = args.ray_n
    cpus = len(os.sched_getaffinity(0))
    say(f"\n== ray. imgcls predict locally vs --ray (local cluster, {cpus} CPUs) on {n} {VGA[0]}x{VGA[1]} JPEGs"
        f" ({folder_stats(vga)}) ==")
    # 1. as a user runs it: two subprocesses, alternating
    walls: dict[str, list[float]] = {"local": [], "ray": []}
    startups = []
    for r in range(args.ray_rounds):
        for name in (("local", "ray") if r % 2 == 0 else ("ray", "local")):
            cmd = imgcls_cmd(run, vga, work / f"ray-{name}.csv") + (["--ray"] if name == "ray" else [])
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            walls[name].append(wall)
            started = re.search(r"started a local cluster with \d+ CPUs in ([\d.]+) s", done.stderr)
            if started:
                startups.append(float(started.group(1)))
            say(f"  round {r + 1} {name:5s}: wall {wall:6.1f} s  {n / wall:5.1f} img/s"
                + (f"  (Ray start-up {startups[-1]:.1f} s of it)" if started else "") + f"  ({load()})")
    local_rows, ray_rows = (read_labels(work / f"ray-{name}.csv") for name in ("local", "ray"))
    agree, common = agreement(local_rows, ray_rows)
    say(f"  same top-1 label in {100 * agree:.2f}% of {common} rows")

    # 2. in this process: the steady rates, once the model is loaded (local) / the cluster is up (ray)
    base = imgcls_load(run)
    records = [Record(p) for p in sorted(vga.glob("*.jpg"))]
    local_rates = []
    for _ in range(2):  # the better of two passes: the machine may be shared
        t0 = time.perf_counter()
        _timed_stream(base.iter_logits(records))
        local_rates.append(n / (time.perf_counter() - t0))
    local_rate = max(local_rates)
    t0 = time.perf_counter()
    with connect("local"):
        startup = time.perf_counter() - t0
        predictor = ray_predictor(base, run)
        actors = cpus
        # every pass starts (and stops) its own actors: the images twice over minus once is the time of n images
        # with the actors up; the passes of n images before and after, the shorter one, time the start
        walls = {}
        for when, inputs in (("once", records), ("twice", records * 2), ("once again", records)):
            t1 = time.perf_counter()
            _timed_stream(predictor.iter_logits(inputs))
            walls[when] = time.perf_counter() - t1
    once = min(walls["once"], walls["once again"])
    ray_rate = n / max(walls["twice"] - once, 1e-9)
    first = max(once - n / ray_rate, 0.0)  # what a pass costs beyond its images: actors started, model loaded
    per_actor = ray_rate / actors
    say(f"  in-process: local {local_rate:.1f} img/s (model loaded); Ray start-up {startup:.1f} s; passes over the"
        f" {n} images {walls['once']:.1f} s / {walls['once again']:.1f} s, over them twice {walls['twice']:.1f} s:"
        f" ~{ray_rate:.1f} img/s once the {actors} actors are up = ~{per_actor:.1f} img/s per 1-CPU actor"
        f" (Ray / local: {ray_rate / local_rate:.2f}x), and ~{first:.1f} s per pass to start the actors")

    # 3. a paper estimate for a cluster, from the measured per-actor rate
    big_paths = sorted(big.glob("*.jpg"))[:32]
    vga_decode = _decode_rate([r.path for r in records[:64]], base.preprocess)
    big_decode = _decode_rate(big_paths, base.preprocess)
    infer_s = max(1 / per_actor - 1 / vga_decode, 0.0)  # an actor's time per image that is not decoding
    cpu_actor_big = 1 / (infer_s + 1 / big_decode)
    say(f"  decode + resize on one thread: {vga_decode:.0f} img/s at {VGA[0]}x{VGA[1]}, {big_decode:.0f} img/s at"
        f" {BIG[0]}x{BIG[1]} (a camera-trap photo); model time per image on one CPU ~{1e3 * infer_s:.0f} ms ->"
        f" {cpu_actor_big:.1f} img/s per 1-CPU actor on camera-trap photos")
    photos, cores, gpu_rate = 1_000_000, args.ray_cores_per_node, args.ray_gpu_rate
    say(f"  paper estimate: {photos:,} camera-trap photos ({BIG[0]}x{BIG[1]} JPEGs), this model. Assumed: nodes of"
        f" {cores} cores, each as fast as one core here was; no GPU: one 1-CPU actor per core at the rate above;"
        f" with GPUs: a GPU scores {gpu_rate:g} img/s (not measured here: a Lite0-class model at 224 px, batch 32)"
        " and its actor decodes on the node's cores shared among its GPUs; perfect scaling over nodes, the photos"
        f" on a shared file system fast enough; plus {startup + first:.0f} s of start-up (as here):")
    say("  | nodes | GPUs per node | images/s (bound by) | 1M photos |")
    say("  |---|---|---|---|")
    estimate = []
    for nodes in (1, 4, 16):
        for gpus in (0, 1, 4):
            decode = cores * big_decode
            rate = cores * cpu_actor_big if gpus == 0 else min(gpus * gpu_rate, decode)
            bound = "model on CPU" if gpus == 0 else ("GPU" if gpus * gpu_rate < decode else "JPEG decoding")
            total = nodes * rate
            seconds = photos / total + startup + first
            estimate.append({"nodes": nodes, "gpus": gpus, "rate": total, "seconds": seconds, "bound": bound})
            hours, minutes = int(seconds // 3600), int(seconds % 3600 // 60)
            say(f"  | {nodes} | {gpus} | {total:,.0f} ({bound}) | {hours} h {minutes:02d} min |")
    say(f"  (decoding bounds a GPU node at {cores * big_decode:,.0f} photos/s: more GPUs help only with more cores)")
    return {"n": n, "walls": walls, "startups": startups, "agreement": agree, "local_rate": local_rate,
            "ray_rate": ray_rate, "per_actor": per_actor, "startup": startup, "first_rows": first,
            "decode": {"vga": vga_decode, "big": big_decode}, "estimate": estimate}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/imgcls-bench"), help="images and run directory")
    parser.add_argument("--run", type=Path, help="run directory (default: <root>/run-lite0, made by make_run.py)")
    parser.add_argument("--parts", nargs="+", default=["e2e", "engine", "rss", "threads", "batch"],
                        choices=["e2e", "engine", "rss", "threads", "batch", "memory", "ray"])
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[1000, 10000, 200000],
                        help="memory part: numbers of tiny files")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32], help="batch part: sizes to compare")
    parser.add_argument("--n", type=int, default=1000, help="big images for the end-to-end comparison")
    parser.add_argument("--small-n", type=int, default=10000, help="small files for the RSS part (vs a tenth)")
    parser.add_argument("--e2e-rounds", type=int, default=2, help="alternating imgcls/naive rounds")
    parser.add_argument("--rss-rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (engine, threads)")
    parser.add_argument("--calib", type=int, default=64, help="calibration images for int8")
    parser.add_argument("--agree-n", type=int, default=256, help="images for int8 vs fp32 top-1 agreement")
    parser.add_argument("--threads-n", type=int, default=256, help="big images per threads measurement")
    parser.add_argument("--ray-n", type=int, default=400, help="ray part: 640x480 JPEGs")
    parser.add_argument("--ray-rounds", type=int, default=1, help="ray part: alternating local/--ray rounds")
    parser.add_argument("--ray-cores-per-node", type=int, default=32, help="ray part's estimate: cores per node")
    parser.add_argument("--ray-gpu-rate", type=float, default=2000,
                        help="ray part's estimate: images/s one GPU scores (assumed)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--naive", nargs=3, metavar=("RUN", "INPUT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--engine-worker", nargs=3, metavar=("KIND", "MODEL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.naive:
        return naive_main(*map(Path, args.naive))
    if args.engine_worker:
        return engine_worker(args.engine_worker[0], *map(Path, args.engine_worker[1:]))

    sys.path.insert(0, str(HERE))
    from make_run import make_run

    t_start = time.perf_counter()
    say(f"imgcls predict benchmark; {len(os.sched_getaffinity(0))} CPUs; {load()}")
    say(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    args.root.mkdir(parents=True, exist_ok=True)
    if set(args.parts) - {"memory"}:  # the memory part needs neither the run nor the photos
        run = make_run(args.run or args.root / "run-lite0")
        need_big = max(args.n if "e2e" in args.parts else 0,
                       args.batch + args.calib + args.agree_n if "engine" in args.parts else 0,
                       args.threads_n if "threads" in args.parts else 0)
        big = image_folders(args.root, "big", (need_big, args.n))[args.n]  # the other parts may want more than --n
        big_all = args.root / "big"
        say(f"run {run}; images {big} ({folder_stats(big)})")
    results: dict = {"load_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="imgcls-bench-") as tmp:
        work = Path(tmp)
        if "e2e" in args.parts:
            results["e2e"] = part_e2e(args, run, big, work)
        if "engine" in args.parts:
            results["engine"] = part_engine(args, run, big_all, work)
        if "rss" in args.parts:
            results["rss"] = part_rss(args, run, args.root, work)
        if "threads" in args.parts:
            results["threads"] = part_threads(args, run, big_all)
        if "batch" in args.parts:
            results["batch"] = part_batch(args, run, big, work)
        if "memory" in args.parts:
            results["memory"] = part_memory(args, args.root, work)
        if "ray" in args.parts:
            results["ray"] = part_ray(args, run, big, work)
    results["load_end"] = os.getloadavg()
    say(f"\n{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}"
        f"   (benchmark took {time.perf_counter() - t_start:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
