"""Camera traps: capture events from EXIF times, what a split by event changes, and scoring by event (not a test).

    python benchmarks/camera_trap.py                      # all four parts (two trainings, ~6-12 min)
    python benchmarks/camera_trap.py --parts grouping     # the grouping only (seconds)
    python benchmarks/camera_trap.py --parts review events --run RUN   # parts 3-4 on a run of part 2's pool

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
4. **Events.** The event-split run's model scores the unseen events (the set's
   val split, 184 frames in 35 events) per image, then per event with
   ``imgcls eval --events --aggregate mean`` and ``max``: once with the true
   events (``--event-column event``), once with events grouped from EXIF times
   alone (a CSV with no ``event`` column; its ``camera`` column is kept, since
   the image folders here are the classes and grouping by folder would use the
   labels).  An event is right when its aggregated probabilities pick its class.

``--parts`` runs some of the parts; parts 3 and 4 need the event-split run,
trained by part 2 or on their own, or given with ``--run`` (a run of this
script's pool, e.g. kept in an earlier ``--work`` folder; its ``eval.json`` is
overwritten).
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


def write_csvs(data: Path, work: Path) -> tuple[Path, Path]:
    """The pool (the set's train split) and the unseen events (its val split), with neither event nor
    camera column: grouping from EXIF alone."""
    rows = truth_rows(data)
    pool, test = work / "pool.csv", work / "test.csv"
    for path, split in ((pool, "train"), (test, "val")):
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            writer.writerows([(str(data / r["path"]), r["label"]) for r in rows if r["split"] == split])
    return pool, test


def train(pool: Path, out: Path, group_by: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "imgcls.cli", "-q", "train", str(pool), "--model", "efficientnet_lite0",
                    "--pretrained", "--group-by", group_by, "--out", str(out)], check=True)
    return time.perf_counter() - t0


def evaluate(run: Path, data: Path, *options: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "imgcls.cli", "-q", "eval", str(run), str(data), "--json",
                           *options], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def split_runs(data: Path, pool: Path, test: Path, work: Path) -> Path:
    """Both runs trained and scored; the event-split run's directory."""
    rows = truth_rows(data)
    truth = {str(data / r["path"]): r["event"] for r in rows}
    print("\n| split of the pool | val frames | events cut by the split | val accuracy (reported) |"
          " accuracy on unseen events | balanced | train s |")
    print("|---|---|---|---|---|---|---|")
    for group_by in ("event", "none"):
        out = work / f"run-{group_by}"
        seconds = train(pool, out, group_by)
        summary = json.loads((out / "summary.json").read_text())
        sides: dict[str, set] = {}
        for r in csv.DictReader((out / "split.csv").open()):
            sides.setdefault(truth[r["path"]], set()).add(r["split"])
        cut = sum(len(s) > 1 for s in sides.values())
        metrics = evaluate(out, test)
        print(f"| {group_by} | {summary['n_val']} | {cut} | {summary['val_accuracy']:.4f} | {metrics['accuracy']:.4f} |"
              f" {metrics['balanced_accuracy']:.4f} | {seconds:.0f} |", flush=True)
    return work / "run-event"


def review(run: Path, test: Path, work: Path, label: str = SET_ASIDE) -> None:
    """Thresholds chosen on the run's own val split, then held to on the unseen events."""
    split = list(csv.DictReader((run / "split.csv").open()))
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


def event_scores(data: Path, run: Path, work: Path) -> None:
    """The unseen events scored per image, then per event (true events, EXIF-grouped), mean and max."""
    rows = [r for r in truth_rows(data) if r["split"] == "val"]
    given, exif = work / "val-events.csv", work / "val-exif.csv"
    for path, columns in ((given, ("path", "label", "event", "camera")), (exif, ("path", "label", "camera"))):
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows([(str(data / r["path"]), *(r[c] for c in columns[1:])) for r in rows])
    frames = evaluate(run, given)
    labels = frames["labels"]
    scored = [("per image", f"{frames['n']} frames", frames)]
    for name, source, options in (("true events", given, ("--event-column", "event")), ("EXIF-grouped", exif, ())):
        for how in ("mean", "max"):
            events = evaluate(run, source, "--events", "--aggregate", how, *options)["events"]
            scored.append((f"events {how} ({name})", f"{events['events']} events ({events['frames']} frames,"
                           f" {events['max_frames_per_event']} at most)", events))
    print(f"\nthe unseen events ({len(rows)} frames in {len({r['event'] for r in rows})} true events) scored by the"
          " event-split run, per image and per event (an event's frame probabilities aggregated):")
    print("| scored | items scored | accuracy | balanced accuracy | " + " | ".join(f"recall {c}" for c in labels) + " |")
    print("|---" * (4 + len(labels)) + "|")
    for name, items, m in scored:
        recall = {c["label"]: c["recall"] for c in m["per_class"]}
        print(f"| {name} | {items} | {m['accuracy']:.4f} | {m['balanced_accuracy']:.4f} | "
              + " | ".join(f"{recall[c]:.3f}" for c in labels) + " |", flush=True)


PARTS = ("grouping", "split", "review", "events")
NEED_RUN = {"review", "events"}  # parts that score the event-split run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()),
                        help="where devsuite/ is, or is extracted to")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    parser.add_argument("--run", type=Path, help="an event-split run of the pool to score (parts 3-4: no training)")
    parser.add_argument("--work", type=Path, help="folder for the runs and CSVs, kept (default: a temp folder)")
    args = parser.parse_args()
    parts = set(args.parts)
    if args.run is not None and "split" in parts:
        parser.error("--run skips training; part 'split' trains both of its runs (leave it out of --parts)")
    data = ensure(args.root)
    if "grouping" in parts:
        grouping(data)
    if not parts - {"grouping"}:
        return
    with tempfile.TemporaryDirectory() as temp:
        work = args.work or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        pool, test = write_csvs(data, work)
        run = args.run
        if "split" in parts:
            run = split_runs(data, pool, test, work)
        elif run is None and parts & NEED_RUN:
            run = work / "run-event"
            print(f"\nevent-split run trained in {train(pool, run, 'event'):.0f} s", flush=True)
        if "review" in parts:
            review(run, test, work)
        if "events" in parts:
            event_scores(data, run, work)


if __name__ == "__main__":
    main()
