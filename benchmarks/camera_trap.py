"""Camera traps: capture events from EXIF times, and what a split by event changes (not a test).

    python benchmarks/camera_trap.py                 # grouping quality + event vs random split (~6 min)
    python benchmarks/camera_trap.py --grouping-only # the grouping only (seconds)

Issue 12's yardstick, on ``camera-traps-veluwe`` from ``../shared/data/devsuite.tar``
(616 Reconyx frames in 117 events, extracted into ``--root``, default /tmp).

1. **Grouping.** The frames' ``event`` column is the ground truth; imgcls groups
   the frames from their EXIF times alone (the CSV given to it has no
   ``event`` or ``camera`` column, so the camera is the image's folder).
   Printed per gap: events found, and the pairwise precision / recall of "same
   event" against the truth (recall 1: no true event is cut; precision below
   1: events closer than the gap are merged, which only makes a split more
   careful).
2. **Split.** The set's own train split (432 frames) is given to
   ``imgcls train --model efficientnet_lite0 --pretrained`` twice, with
   ``--group-by event`` (the default) and ``--group-by none`` (a split of single
   frames).  Each run's own val accuracy is what it reports; its accuracy on
   the set's val split (184 frames of events no run has seen) is what it is
   worth.  A random split leaks bursts into val, so its val figure runs high.
3. **Review budget.** On the event-split run, ``imgcls thresholds`` picks the
   threshold of one class (``deer`` stands in for ``empty``) on the run's own val
   split at 95 / 99 / 99.5% recall of the other classes; ``imgcls predict`` then
   applies it to the unseen events, where the promise is checked and the share
   of frames a person still reviews is counted.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SET = Path("devsuite") / "camera-traps-veluwe"
SET_ASIDE = "deer"  # the set has no empty class; its commonest class plays the empty pile


def ensure(root: Path) -> Path:
    path = root / SET
    if not path.exists():
        with tarfile.open(SHARED / "devsuite.tar") as archive:
            archive.extractall(root, filter="data")
    return path


def truth_rows(data: Path) -> list[dict]:
    with (data / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def grouping(data: Path, gaps=(5, 10, 30)) -> None:
    from imgcls.data.events import group_events
    from imgcls.data.records import Record

    rows = truth_rows(data)
    records = [Record(data / r["path"], r["label"]) for r in rows]  # no camera: the folder stands in
    truth = [r["event"] for r in rows]
    print(f"grouping {len(records)} frames, {len(set(truth))} true events, camera = the image's folder")
    print("| gap s | events found | pair precision | pair recall | frames by EXIF time | seconds |")
    print("|---|---|---|---|---|---|")
    for gap in gaps:
        t0 = time.perf_counter()
        out, report = group_events(records, gap)
        seconds = time.perf_counter() - t0
        found = [r.group for r in out]
        same_found = same_true = both = 0
        for i, j in itertools.combinations(range(len(found)), 2):
            a, b = found[i] == found[j], truth[i] == truth[j]
            same_found, same_true, both = same_found + a, same_true + b, both + (a and b)
        print(f"| {gap:g} | {report.events} | {both / max(1, same_found):.3f} | {both / max(1, same_true):.3f} |"
              f" {report.from_exif} | {seconds:.2f} |")


def split_runs(data: Path, work: Path) -> None:
    rows = truth_rows(data)
    pool, test = work / "pool.csv", work / "test.csv"
    for path, split in ((pool, "train"), (test, "val")):
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])  # neither event nor camera: grouping from EXIF alone
            writer.writerows([(str(data / r["path"]), r["label"]) for r in rows if r["split"] == split])
    print("\n| split of the pool | val frames | events cut by the split | val accuracy (reported) |"
          " accuracy on unseen events | balanced | train s |")
    print("|---|---|---|---|---|---|---|")
    for group_by in ("event", "none"):
        out = work / f"run-{group_by}"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "imgcls.cli", "-q", "train", str(pool), "--model", "efficientnet_lite0",
                        "--pretrained", "--group-by", group_by, "--out", str(out)], check=True)
        seconds = time.perf_counter() - t0
        summary = json.loads((out / "summary.json").read_text())
        truth = {str(data / r["path"]): r["event"] for r in rows}
        split = list(csv.DictReader((out / "split.csv").open()))
        sides: dict[str, set] = {}
        for r in split:
            sides.setdefault(truth[r["path"]], set()).add(r["split"])
        cut = sum(len(s) > 1 for s in sides.values())
        evaluated = subprocess.run([sys.executable, "-m", "imgcls.cli", "-q", "eval", str(out), str(test), "--json"],
                                   check=True, capture_output=True, text=True)
        metrics = json.loads(evaluated.stdout)
        print(f"| {group_by} | {summary['n_val']} | {cut} | {summary['val_accuracy']:.4f} | {metrics['accuracy']:.4f} |"
              f" {metrics['balanced_accuracy']:.4f} | {seconds:.0f} |", flush=True)
        if group_by == "event":
            review(out, split, test, work)


def review(run: Path, split: list[dict], test: Path, work: Path, label: str = SET_ASIDE) -> None:
    """Thresholds chosen on the run's own val split, then held to on the unseen events."""
    val = work / "val.csv"
    with val.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([(r["path"], r["label"]) for r in split if r["split"] == "val"])
    print(f"\nset aside '{label}' (no empty class here: the commonest class stands in), threshold chosen on the"
          " run's val split, then applied to the unseen events:")
    print("| target recall of the others | threshold | others kept out, val | others kept out, unseen |"
          " share reviewed, unseen |")
    print("|---|---|---|---|---|")
    for target in (0.95, 0.99, 0.995):
        chosen = json.loads(subprocess.run(
            [sys.executable, "-m", "imgcls.cli", "-q", "thresholds", str(run), str(val), "--class", label,
             "--target-recall", str(target), "--json"], check=True, capture_output=True, text=True).stdout)["chosen"]
        rows_out = work / f"pred-{target}.csv"
        subprocess.run([sys.executable, "-m", "imgcls.cli", "-q", "predict", str(run), str(test), "--out",
                        str(rows_out), "--overwrite"], check=True, capture_output=True)
        truth = {r["path"]: r["label"] for r in csv.DictReader(test.open())}
        rows = list(csv.DictReader(rows_out.open()))
        others = [r for r in rows if truth[r["path"]] != label]
        kept_out = sum(r["decision"] != label for r in others) / max(1, len(others))
        reviewed = sum(r["decision"] != label for r in rows) / len(rows)
        print(f"| {target} | {chosen['threshold']:.4f} | {chosen['other_recall']:.4f} | {kept_out:.4f} |"
              f" {reviewed:.1%} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--grouping-only", action="store_true")
    args = parser.parse_args()
    data = ensure(args.root)
    grouping(data)
    if not args.grouping_only:
        with tempfile.TemporaryDirectory() as work:
            split_runs(data, Path(work))


if __name__ == "__main__":
    main()
