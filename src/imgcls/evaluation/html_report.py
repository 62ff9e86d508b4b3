"""One self-contained HTML page about a run: data, config, curves, metrics, confusions with the images
behind them, calibration and the review budget.

The page opens offline: inline CSS and a few lines of inline JS, plots as PNG data URIs, image
thumbnails (at most :data:`MAX_THUMBS`, <= :data:`THUMB_PX` px, JPEG) as CSS classes so an image shown
in several galleries is embedded once.  Everything comes from the run's files
(``<split>_predictions.csv`` gives the galleries), so no model runs; :func:`build_report` also takes
per-image predictions in memory (``imgcls report --data`` and ``imgcls eval``: :func:`imgcls.api.report`).

Imports the run files' modules, ``calibration``, ``report`` (matplotlib, inside its functions) and
``data.decode`` (Pillow) - no torch, no predictor, so training can write the page too.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import rundir
from ..errors import UserError, first_line
from .calibration import figures, read_calibration, scaled_probs, single_label

log = logging.getLogger("imgcls")

THUMB_PX = 96
MAX_THUMBS = 200          # distinct images embedded in one page
GALLERY = 24              # most confident mistakes / least confident right answers shown
MAX_MATRIX = 30           # classes in the clickable confusion matrix (the most confused ones beyond)
MAX_LISTED = 100          # rows of skipped files / duplicates listed
PRED_COLUMNS = ("path", "label", "predicted", "confidence")
PROB = "prob_"            # + class name: one column per class


# --------------------------------------------------------------------------- per-image predictions


def write_predictions(path: Path, records, logits: np.ndarray, classes: list[str], temperature: float = 1.0) -> Path:
    """``<split>_predictions.csv``: path, true label, predicted label, its probability and every class's
    probability, after temperature scaling."""
    probs = scaled_probs(logits, temperature)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*PRED_COLUMNS, *(PROB + c for c in classes)])
    for record, p in zip(records, probs):
        top = int(p.argmax())
        writer.writerow([str(record.path), record.label, classes[top], f"{p[top]:.6g}", *(f"{v:.6g}" for v in p)])
    rundir.atomic_write(path, out.getvalue())
    return path


@dataclass
class Scored:
    """Per-image predictions of one split: paths, true class indices, calibrated probabilities."""

    name: str                        # val, test, eval
    paths: list[str]
    truth: np.ndarray                # (N,) class index
    probs: np.ndarray                # (N, K), calibrated
    logits: np.ndarray | None = None  # raw, when known (scored in memory)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(1)


def read_predictions(path: Path, classes: list[str], name: str) -> Scored | None:
    """A predictions file as :class:`Scored`; None when it is missing or not ours."""
    if not path.is_file():
        return None
    index = {c: i for i, c in enumerate(classes)}
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        if header != [*PRED_COLUMNS, *(PROB + c for c in classes)]:
            log.warning("%s: not a predictions file of this run's classes; left out of the report", path)
            return None
        rows = [r for r in reader if len(r) == len(header) and r[1] in index]
    if not rows:
        return None
    probs = np.array([[float(v) for v in r[len(PRED_COLUMNS):]] for r in rows])
    return Scored(name, [r[0] for r in rows], np.array([index[r[1]] for r in rows]), probs)


# --------------------------------------------------------------------------- small HTML helpers


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def _pct(value) -> str:
    return "" if value is None else f"{100 * float(value):.1f}%"


def _num(value, digits: int = 4) -> str:
    return "" if value is None else f"{float(value):.{digits}f}"


def _table(head: list[str], rows: list[list], cls: str = "") -> str:
    out = [f'<table class="{cls}"><thead><tr>', *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _png(data: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _png_file(path: Path, alt: str) -> str:
    return _png(path.read_bytes(), alt) if path.is_file() else ""


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{esc(title)}</h2>{body}</section>'


def _read_json(path: Path):
    try:
        return rundir.read_json(path) if path.is_file() else None
    except Exception as err:  # noqa: BLE001 - a damaged file is a gap in the report, not a failure
        log.warning("report: %s left out (%s)", path, first_line(err))
        return None


# --------------------------------------------------------------------------- thumbnails


class Thumbs:
    """The distinct images embedded in the page (at most ``cap``), each one CSS class."""

    def __init__(self, cap: int = MAX_THUMBS):
        self.cap = cap
        self.classes: dict[str, str] = {}      # path -> css class ("" when it could not be read)
        self.css: list[str] = []

    def admit(self, path: str) -> bool:
        """Whether ``path`` is (or now becomes) embedded."""
        if path in self.classes:
            return bool(self.classes[path])
        if len(self.css) >= self.cap:
            return False
        self.classes[path] = data = _thumbnail(path)
        if data:
            name = f"t{len(self.css)}"
            self.css.append(f".{name}{{background-image:url(data:image/jpeg;base64,{data})}}")
            self.classes[path] = name
        return True

    def tile(self, path: str, caption: str, tone: str = "") -> str:
        name = self.classes.get(path, "")
        face = (f'<div class="th {name}" role="img" aria-label="{esc(Path(path).name)}"></div>' if name
                else '<div class="th missing">not readable now</div>')
        return f'<figure class="tile {tone}" title="{esc(path)}">{face}<figcaption>{caption}</figcaption></figure>'


def _thumbnail(path: str) -> str:
    """A <= THUMB_PX JPEG of the image as base64; "" when it cannot be read (moved, deleted, damaged)."""
    from ..data.decode import ImageError, open_image

    try:
        image = open_image(path, min_size=THUMB_PX)
    except (ImageError, OSError):
        return ""
    image.thumbnail((THUMB_PX, THUMB_PX))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return base64.b64encode(out.getvalue()).decode()


# --------------------------------------------------------------------------- sections


def _skipped(unreadable: list[dict]) -> str:
    rows = [[f"<code>{esc(u.get('path'))}</code>", esc(u.get("split", "")), esc(u.get("reason", ""))]
            for u in unreadable[:MAX_LISTED]]
    more = f"<p>... and {len(unreadable) - MAX_LISTED} more.</p>" if len(unreadable) > MAX_LISTED else ""
    return f"<h3>Skipped files ({len(unreadable)})</h3>" + _table(["file", "split", "reason"], rows) + more


def _data_section(run: Path, scored: list[Scored], labels: list[str], on_data: str | None) -> str:
    parts = []
    if on_data is not None:  # the data scored now, not the run's own
        s = scored[0]
        counts = np.bincount(s.truth, minlength=len(labels))
        parts.append(f"<p>Scored: <code>{esc(on_data)}</code>, {len(s.truth)} images read.</p>"
                     + _table(["class", "images"], [[esc(c), int(n)] for c, n in zip(labels, counts)], "num"))
        if s.unreadable:
            parts.append(_skipped([{"path": p, "split": s.name, "reason": why} for p, why in s.unreadable]))
        return "".join(parts)
    split_rows = rundir.read_split(run)
    scan = _read_json(run / rundir.SCAN) or {}
    if split_rows:
        splits = list(dict.fromkeys(r["split"] for r in split_rows))
        labels = sorted({r["label"] for r in split_rows})
        counts = {(r["label"], r["split"]): 0 for r in split_rows}
        for r in split_rows:
            counts[(r["label"], r["split"])] += 1
        rows = [[esc(c), *(counts.get((c, s), 0) for s in splits), sum(counts.get((c, s), 0) for s in splits)]
                for c in labels]
        rows.append(["<b>all</b>", *(f"<b>{sum(counts.get((c, s), 0) for c in labels)}</b>" for s in splits),
                     f"<b>{len(split_rows)}</b>"])
        parts.append("<h3>Images per class and split</h3>" + _table(["class", *splits, "total"], rows, "num"))
    unreadable = scan.get("unreadable") or []
    if unreadable:
        parts.append(_skipped(unreadable))
    elif scan:
        parts.append("<p>Skipped files: none (every file could be read).</p>")
    duplicates = scan.get("duplicates") or []
    if duplicates:
        rows = [[esc(d.get("kind", "")), "<br>".join(f"<code>{esc(p)}</code>" for p in d.get("paths", [])),
                 esc(", ".join(d.get("splits", []))), esc(", ".join(d.get("labels", [])))]
                for d in duplicates[:MAX_LISTED]]
        extra = len(duplicates) - MAX_LISTED
        more = f"<p>... and {extra} more (scan.json).</p>" if extra > 0 else ""
        parts.append(f"<h3>Duplicates ({len(duplicates)} groups)</h3>"
                     + _table(["kind", "files", "splits", "labels"], rows) + more)
    elif scan:
        parts.append("<p>Duplicates: none.</p>")
    events = scan.get("events")
    if events and events.get("source") not in (None, "none"):
        keys = [k for k in ("source", "events", "frames", "mean_frames", "max_frames", "from_exif", "from_mtime",
                            "leaked_by_random_split", "across_given_splits") if k in events]
        parts.append("<h3>Capture events</h3>" + _table(["", "value"], [[esc(k.replace("_", " ")), esc(events[k])]
                                                                        for k in keys]))
    return "".join(parts) or "<p>No data files in this run (split.csv, scan.json).</p>"


def _config_section(run: Path) -> str:
    parts = []
    path = run / rundir.CONFIG
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(f"<details><summary>config.yaml ({text.count(chr(10))} lines)</summary><pre>{esc(text)}</pre>"
                     "</details>")
    head = _head_selection(run)
    epochs = 0
    if (run / rundir.METRICS).is_file():
        with (run / rundir.METRICS).open(newline="") as handle:
            epochs = sum(1 for _ in csv.DictReader(handle))
    if head and epochs <= 1:  # one fit, no curve over epochs to draw
        parts.append(head)
        return "".join(parts)
    curves = _png_file(run / rundir.CURVES, "training curves: loss and accuracy per epoch")
    parts.append(curves or "<p>No training curves (training_curves.png).</p>")
    parts.append(head)
    return "".join(parts)


def _head_selection(run: Path) -> str:
    """The features head's cross-validation (features.json), drawn with its caption; "" without one."""
    from .plots import chosen_cv_row, plot_head_selection

    info = _read_json(run / rundir.FEATURES)
    if not isinstance(info, dict):
        return ""
    alt = "the head's cross-validation: held-out loss and accuracy per penalty"
    picture = _png_file(run / rundir.HEAD_SELECTION, alt)  # training drew it; older runs are drawn here
    if not picture:
        out = io.BytesIO()
        if not plot_head_selection(info, out):
            return ""
        picture = _png(out.getvalue(), alt)
    chosen = chosen_cv_row(info)
    family = "the head with the source classifier as prior" if info.get("prior_used") else "the plain linear head"
    which = (f" It chose {family} at the penalty {info['penalty']:.3g} per image (the star)." if chosen else "")
    rule = ("families ranked by held-out accuracy, then loss, since the classes weigh alike"
            if info.get("cv_selection") == "balanced_accuracy" else "the family with the lower held-out loss")
    caption = (f"<p>The head was fitted once on frozen features of {info.get('views', '?')} views per training"
               f" image, so there is no curve over epochs. {info.get('cv_folds', '?')}-fold cross-validation on the"
               f" training images chose how to fit it: {rule}, then in it the strongest penalty whose held-out"
               f" loss is within one standard error of the best.{which} Validation images were not used.")
    share = info.get("near_copy_share")
    if share is not None and share >= 0.05:  # below that, near-copies move the held-out figures little
        caption += (f" {share:.0%} of the training images have a near-copy (as the frames of a burst do); the folds"
                    " deal images, not bursts, so these held-out figures run higher than validation's.")
    caption += "</p>"
    return caption + picture


def _metrics_section(metrics: dict[str, dict], calibration: dict[str, dict]) -> str:
    if not metrics:
        return "<p>No metrics in this run (val.json, test.json, eval.json).</p>"
    top5 = any("top5_accuracy" in m for m in metrics.values())  # five classes or more
    rows = []
    for split, m in metrics.items():
        cal = calibration.get(split, {})
        rows.append([f"<b>{esc(split)}</b>", m.get("n", ""), _pct(m.get("accuracy")), _pct(m.get("balanced_accuracy")),
                     *([_pct(m.get("top5_accuracy"))] if top5 else []), _num(m.get("loss")),
                     _num(cal.get("ece_before")), _num(cal.get("ece_after"))])
    parts = [_table(["split", "images", "accuracy", "balanced accuracy", *(["top-5"] if top5 else []), "loss (NLL)",
                     "ECE", "ECE calibrated"], rows, "num")]
    parts.append('<div class="grid">')
    for split, m in metrics.items():
        per_class = [[esc(r["label"]), _num(r["precision"], 3), _num(r["recall"], 3), _num(r["f1"], 3), r["support"]]
                     for r in m.get("per_class", [])]
        parts.append(f"<div><h3>{esc(split)}: per class</h3>"
                     + _table(["class", "precision", "recall", "F1", "images"], per_class, "num") + "</div>")
    parts.append("</div>")
    return "".join(parts)


def _matrix_classes(confusion: np.ndarray) -> list[int]:
    """The classes the clickable matrix shows: all, or the MAX_MATRIX most confused, in class order."""
    k = len(confusion)
    if k <= MAX_MATRIX:
        return list(range(k))
    off = confusion - np.diag(np.diag(confusion))
    score = off.sum(0) + off.sum(1)
    return sorted(np.argsort(-score, kind="stable")[:MAX_MATRIX].tolist())


def _caption(s: Scored, i: int, labels: list[str]) -> str:
    t, p = int(s.truth[i]), int(s.pred[i])
    if t == p:
        return f"{esc(labels[t])} <span>{_pct(s.probs[i, p])}</span>"
    return (f'<span class="bad">{esc(labels[p])} {_pct(s.probs[i, p])}</span><br>'
            f"true {esc(labels[t])} {_pct(s.probs[i, t])}")


@dataclass
class _Plan:
    """What one split's page parts show: its galleries and the images of each matrix cell, best first."""

    s: Scored
    mistakes: np.ndarray
    unsure: np.ndarray
    confusion: np.ndarray
    shown: list[int]
    cells: dict[tuple[int, int], np.ndarray]


def _plan(s: Scored, k: int) -> _Plan:
    conf = s.probs.max(1)
    wrong = np.flatnonzero(s.pred != s.truth)
    right = np.flatnonzero(s.pred == s.truth)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (s.truth, s.pred), 1)
    shown = _matrix_classes(confusion)
    cells: dict[tuple[int, int], np.ndarray] = {}
    for t in shown:
        for p in shown:
            members = np.flatnonzero((s.truth == t) & (s.pred == p))
            if len(members):  # mistakes: most confident first; right answers: least confident first
                cells[(t, p)] = members[np.argsort(-conf[members] if t != p else conf[members], kind="stable")]
    return _Plan(s, wrong[np.argsort(-conf[wrong], kind="stable")][:GALLERY],
                 right[np.argsort(conf[right], kind="stable")][:GALLERY], confusion, shown, cells)


def _admit(plans: list[_Plan], thumbs: Thumbs) -> None:
    """Spend the thumbnail budget: every split's two galleries first, then round the matrix cells of all
    splits, mistakes first, so that every cell shows some of its images."""
    for plan in plans:
        for i in [*plan.mistakes, *plan.unsure]:
            thumbs.admit(plan.s.paths[i])
    queue = [(plan, c) for plan in plans for c in sorted(plan.cells, key=lambda tp: tp[0] == tp[1])]
    depth = 0
    while len(thumbs.css) < thumbs.cap and any(depth < len(plan.cells[c]) for plan, c in queue):
        for plan, c in queue:
            if depth < len(plan.cells[c]):
                thumbs.admit(plan.s.paths[plan.cells[c][depth]])
        depth += 1


def _galleries(plan: _Plan, labels: list[str], thumbs: Thumbs) -> tuple[str, str]:
    """(the confusion matrix with its cell galleries, the mistakes / unsure galleries) of one split."""
    s, confusion, shown, cells, mistakes, unsure = (plan.s, plan.confusion, plan.shown, plan.cells, plan.mistakes,
                                                    plan.unsure)
    k = len(labels)
    wrong = int((s.pred != s.truth).sum())
    right = len(s.truth) - wrong

    def tiles(indices) -> str:
        return "".join(thumbs.tile(s.paths[i], _caption(s, i, labels), "bad" if s.pred[i] != s.truth[i] else "")
                       for i in indices if s.paths[i] in thumbs.classes)

    head = "".join(f'<th class="col" title="{esc(labels[p])}"><span>{esc(labels[p])}</span></th>' for p in shown)
    rows, panels = [], []
    for t in shown:
        total = max(int(confusion[t].sum()), 1)
        row = [f'<th class="row">{esc(labels[t])}</th>']
        for p in shown:
            n = int(confusion[t, p])
            rate = n / total
            tone = (f"background:rgba(40,110,200,{0.08 + 0.8 * rate:.2f})" if t == p
                    else f"background:rgba(220,70,50,{0.1 + 0.85 * rate:.2f})" if n else "")
            light = ' class="cell hi"' if rate > 0.55 else ' class="cell"'
            if n:
                ident = f"g-{s.name}-{t}-{p}"
                row.append(f'<td{light} style="{tone}" data-g="{ident}" data-true="{t}" data-pred="{p}" tabindex="0"'
                           f' title="true {esc(labels[t])}, predicted {esc(labels[p])}: {n}">{n}</td>')
                embedded = [i for i in cells[(t, p)] if s.paths[i] in thumbs.classes]
                note = (f" ({len(embedded)} shown; the page embeds at most {thumbs.cap} images)"
                        if len(embedded) < n else "")
                panels.append(f'<div class="cellgal" id="{ident}" hidden><h4>true <b>{esc(labels[t])}</b>, predicted'
                              f" <b>{esc(labels[p])}</b>: {n} image{'s' * (n != 1)}{note}</h4>"
                              f'<div class="tiles">{tiles(cells[(t, p)])}</div></div>')
            else:
                row.append(f'<td class="cell zero" data-true="{t}" data-pred="{p}">0</td>')
        rows.append("<tr>" + "".join(row) + "</tr>")
    note = (f"<p>The {len(shown)} classes with the most confusions of {k}.</p>" if len(shown) < k else "")
    matrix = (f'<p class="hint">Rows: true class; columns: predicted. Click a cell to see its images.</p>{note}'
              f'<div class="scroll"><table class="confusion" data-split="{esc(s.name)}"><thead><tr>'
              f'<th class="corner">true \\ predicted</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
              "</table></div>"
              + "".join(panels))
    gallery = (f"<h3>Most confident mistakes ({wrong} mistakes in all)</h3>"
               + (f'<div class="tiles">{tiles(mistakes)}</div>' if len(mistakes) else "<p>No mistakes.</p>")
               + f"<h3>Least confident right answers ({right} right in all)</h3>"
               + (f'<div class="tiles">{tiles(unsure)}</div>' if len(unsure) else "<p>No right answers.</p>"))
    return matrix, gallery


def _calibration_section(calibration: dict[str, dict], stored: dict | None) -> str:
    from .plots import plot_reliability

    if not calibration:
        return "<p>No calibration in this run (calibration.json).</p>"
    parts = []
    if stored is not None:
        t = stored["temperature"]
        how = (f"fitted on {stored.get('n')} {esc(stored.get('fitted_on', 'val'))} images" if stored.get("fitted")
               else f"not fitted: {esc(stored.get('reason', ''))}")
        parts.append(f"<p>Temperature <b>T = {t:.3f}</b> ({how}). Predictions divide the logits by T before the"
                     " softmax: the ranking and accuracy stay the same, the probabilities come closer to how often"
                     " the model is right. ECE: expected calibration error, the gap between confidence and accuracy"
                     f" over {stored.get('bins', 15)} confidence bins (0 is perfect).</p>")
    rows = [[f"<b>{esc(split)}</b>", c.get("n", ""), _num(c.get("ece_before")), _num(c.get("ece_after")),
             _num(c.get("nll_before")), _num(c.get("nll_after"))] for split, c in calibration.items()]
    parts.append(_table(["split", "images", "ECE raw", "ECE calibrated", "NLL raw", "NLL calibrated"], rows, "num"))
    for split, c in calibration.items():
        if "reliability_before" not in c:
            continue
        out = io.BytesIO()
        plot_reliability([(f"{split}: raw softmax", c["reliability_before"]),
                          (f"{split}: calibrated", c["reliability_after"])], out)
        parts.append(_png(out.getvalue(), f"reliability diagram of {split}, before and after calibration"))
    return "".join(parts)


def _budget_section(run: Path) -> str:
    data = _read_json(run / rundir.THRESHOLDS)
    if not data:
        return ""
    thresholds = data.get("thresholds", {}) if isinstance(data, dict) else {}
    chosen = data.get("chosen", {}) if isinstance(data, dict) else {}
    rows = []
    for label, t in thresholds.items():
        c = chosen.get(label, {}) if isinstance(chosen, dict) else {}
        rows.append([esc(label), _num(t), _pct(c.get("target_recall")), esc(c.get("pile", "")),
                     _pct(c.get("review_share"))])
    parts = ["<p>Predictions below their class's threshold are marked <i>uncertain</i> for a person to check"
             " (<code>imgcls thresholds</code>).</p>",
             _table(["class", "threshold", "recall of the others (target)", "set aside", "share reviewed"], rows,
                    "num")]
    for png in sorted(run.glob("thresholds_*.png")):
        parts.append(_png(png.read_bytes(), f"review budget of {png.stem.removeprefix('thresholds_')}"))
    return "".join(parts)


# --------------------------------------------------------------------------- the page


def build_report(run: str | Path, scored: list[Scored] | None = None, metrics: dict[str, dict] | None = None,
                 on_data: str | None = None, cap: int = MAX_THUMBS) -> str:
    """The page of run directory ``run``.  ``scored``/``metrics``: predictions and metrics computed in memory
    (``--data``); by default the run's own (``<split>_predictions.csv``, ``<split>.json``)."""
    run = Path(run)
    summary = _read_json(run / rundir.SUMMARY) or {}
    labels = (_read_json(run / rundir.LABELS) or summary.get("classes") or [])
    stored = read_calibration(run)
    temperature = float(stored["temperature"]) if stored else 1.0
    if scored is None:
        scored = [s for s in (read_predictions(run / rundir.predictions_file(split), labels, split)
                              for split in ("val", "test")) if s is not None]
    if metrics is None:
        metrics = {split: m for split in ("val", "test", "eval")
                   if isinstance(m := _read_json(run / rundir.metrics_files(split)["json"]), dict)}
    calibration: dict[str, dict] = {}
    if stored is not None:
        calibration[stored.get("fitted_on", "val")] = stored
        calibration.update(stored.get("held_out") or {})
    for s in scored:
        if s.logits is not None:
            calibration[s.name] = figures(s.logits, s.truth, temperature)
    thumbs = Thumbs(cap)
    plans = [_plan(s, len(labels)) for s in scored]
    _admit(plans, thumbs)
    pieces = [_galleries(plan, labels, thumbs) for plan in plans]
    title = f"imgcls report: {run.resolve().name}" + (f" on {Path(on_data).name}" if on_data else "")
    facts = [("model", summary.get("model")), ("strategy", summary.get("strategy")),
             ("classes", len(labels) or None), ("train images", summary.get("n_train")),
             ("val images", summary.get("n_val")), ("test images", summary.get("n_test")),
             ("training time", f"{summary['train_seconds']:.0f} s" if "train_seconds" in summary else None),
             ("temperature", f"{temperature:.3f}" if stored else None)]
    headline = "".join(f"<div><span>{esc(k)}</span><b>{esc(v)}</b></div>" for k, v in facts if v not in (None, ""))
    sections = [("data", "Data", _data_section(run, scored, labels, on_data)),
                ("training", "Configuration and training", _config_section(run)),
                ("metrics", "Metrics", _metrics_section(metrics, calibration))]
    for s, (matrix, gallery) in zip(scored, pieces):
        sections.append((f"confusion-{s.name}", f"Confusion matrix: {s.name}", matrix))
        sections.append((f"galleries-{s.name}", f"Mistakes and doubts: {s.name}", gallery))
    if not scored:
        sections.append(("confusion", "Confusion matrix", "<p>No per-image predictions in this run"
                         " (val_predictions.csv); train again, or use <code>imgcls report RUN --data DATA</code>.</p>"))
    sections.append(("calibration", "Calibration", _calibration_section(calibration, stored)))
    budget = _budget_section(run)
    if budget:
        sections.append(("budget", "Review budget", budget))
    nav = "".join(f'<a href="#{ident}">{esc(name)}</a>' for ident, name, _ in sections)
    body = "".join(_section(ident, name, content) for ident, name, content in sections)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{CSS}{''.join(thumbs.css)}</style></head><body>"
            f'<header><h1>{esc(title)}</h1><p class="sub"><code>{esc(run.resolve())}</code> - written {stamp}'
            f' - {len(thumbs.css)} images embedded</p><div class="facts">{headline}</div><nav>{nav}</nav></header>'
            f"<main>{body}</main><script>{JS}</script></body></html>")


def write_report(run: str | Path, out: str | Path | None = None, **options) -> Path:
    """:func:`build_report` written (atomically) to ``out`` (default ``RUN/report.html``)."""
    task = run_task(run)
    if not single_label(task):
        raise UserError(f"{run}: the HTML report handles single-label runs; this run's task is {task}")
    path = Path(out) if out is not None else Path(run) / rundir.REPORT
    rundir.atomic_write(path, build_report(run, **options))
    return path


def run_task(run: str | Path):
    """The task its model file names (None when it names none, or has no weights yet: multiclass)."""
    weights = Path(run) / rundir.WEIGHTS
    return rundir.read_weights_meta(weights).get("task") if weights.is_file() else None


def write_run_report(run: str | Path, out: str | Path | None = None, **options) -> Path | None:
    """:func:`write_report` where a failure must not cost the work around it (the end of training or
    evaluation): a warning, and None."""
    try:
        task = run_task(run)
        if not single_label(task):
            log.info("report: skipped (the HTML report handles single-label runs; task %s)", task)
            return None
        path = write_report(run, out, **options)
    except Exception as err:  # noqa: BLE001 - the report is a view of finished work, never a reason to fail it
        log.warning("report not written (%s: %s)", type(err).__name__, first_line(err))
        return None
    log.info("report: %s", path)
    return path


CSS = """
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:#1d2430;background:#f3f5f8}header{background:#1f3a5f;color:#fff;padding:18px 28px 0}
h1{margin:0;font-size:22px;font-weight:600}.sub{margin:4px 0 12px;color:#c9d6e8;font-size:12px}
.sub code{color:#e6eef8}.facts{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:12px}
.facts div{background:rgba(255,255,255,.12);border-radius:6px;padding:5px 10px}
.facts span{display:block;font-size:11px;color:#b8c8de}.facts b{font-size:15px}
nav{display:flex;flex-wrap:wrap;gap:2px}nav a{color:#dbe7f5;text-decoration:none;padding:7px 10px;
border-radius:6px 6px 0 0}nav a:hover{background:#f3f5f8;color:#1f3a5f}
main{max-width:1180px;margin:0 auto;padding:16px 20px 40px}
section{background:#fff;border-radius:10px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:14px 20px 18px;
margin:16px 0}h2{margin:0 0 10px;font-size:18px;color:#1f3a5f}h3{font-size:15px;margin:16px 0 8px}
h4{font-weight:500;margin:12px 0 8px}table{border-collapse:collapse;margin:4px 0 10px}
th,td{padding:4px 10px;border-bottom:1px solid #e4e8ee;text-align:left;vertical-align:top}
thead th{background:#eef2f7;font-weight:600}table.num td{text-align:right}table.num td:first-child{text-align:left}
tbody tr:nth-child(even){background:#fafbfc}pre{background:#f6f8fa;padding:10px;border-radius:6px;overflow:auto;
max-height:420px;font-size:12px}code{font-size:12px}details summary{cursor:pointer;margin:6px 0}
img.plot{max-width:100%;height:auto;display:block;margin:8px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:8px 24px}
.scroll{overflow:auto}table.confusion{border-collapse:separate;border-spacing:2px}
table.confusion td.cell{min-width:44px;height:38px;text-align:center;border:0;border-radius:4px;font-weight:600;
font-variant-numeric:tabular-nums}table.confusion td.cell[data-g]{cursor:pointer}
table.confusion td.cell[data-g]:hover,table.confusion td.sel{outline:3px solid #f2a900}
table.confusion td.hi{color:#fff}table.confusion td.zero{color:#c3cad4;font-weight:400}
table.confusion th.row{text-align:right;white-space:nowrap;border:0}table.confusion th.corner{font-size:11px;
color:#667;border:0;background:none;vertical-align:bottom}
table.confusion th.col{border:0;background:none;vertical-align:bottom;padding:0 2px 4px}
table.confusion th.col span{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap}
.hint{color:#556;font-size:13px}.cellgal{border-top:2px solid #f2a900;margin-top:10px}
.tiles{display:flex;flex-wrap:wrap;gap:8px}
.tile{margin:0;width:112px;background:#f6f8fa;border-radius:6px;padding:6px;border:1px solid #e4e8ee}
.tile.bad{border-color:#f0b7ad;background:#fff6f4}
.th{width:100px;height:96px;background-size:contain;background-repeat:no-repeat;background-position:center;
image-rendering:auto;background-color:#e9edf2;border-radius:3px}
.th.missing{display:flex;align-items:center;justify-content:center;font-size:11px;color:#889;text-align:center}
figcaption{font-size:11.5px;line-height:1.3;margin-top:4px;word-break:break-word}
figcaption span{color:#556}figcaption .bad{color:#b3261e;font-weight:600}
"""

JS = """
document.querySelectorAll('table.confusion td.cell[data-g]').forEach(function (td) {
  function toggle() {
    var gallery = document.getElementById(td.dataset.g), open = !gallery.hidden;
    var section = td.closest('section');
    section.querySelectorAll('.cellgal').forEach(function (g) { g.hidden = true; });
    section.querySelectorAll('td.sel').forEach(function (c) { c.classList.remove('sel'); });
    if (!open) {
      gallery.hidden = false;
      td.classList.add('sel');
      gallery.scrollIntoView({block: 'nearest'});
    }
  }
  td.addEventListener('click', toggle);
  td.addEventListener('keydown', function (e) {
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); toggle(); }
  });
});
"""
