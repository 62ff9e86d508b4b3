"""The HTML report: written by training and evaluation, self-contained, small with more images than it
embeds, its confusion matrix equal to the metrics', and clickable in a real headless Chromium."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import CHROMIUM, NO_CHROMIUM, open_page
from conftest import FAST
from imagezoo import make_class_tree

import imgcls
from imgcls.evaluation import html_report
from imgcls import rundir
from imgcls.api import choose_thresholds
from imgcls.cli import main

SIZE_CAP = 5 * 2**20
SCREENSHOT = Path("/tmp/report_page.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A CSV with train/val/test splits: 246 val + test images (more than the page embeds), a tenth of the
    val labels wrong (mistakes to show), one damaged val file and one byte-identical copy."""
    root = tmp_path_factory.mktemp("report_data")
    written = make_class_tree(root / "img", {"cat": 102, "dog": 102, "fox": 102}, size=(32, 32), seed=1)
    rows = []
    names = list(written)
    for c, name in enumerate(names):
        for i, path in enumerate(written[name]):
            split = "train" if i < 20 else "val" if i < 92 else "test"
            label = names[(c + 1) % 3] if split == "val" and i % 10 == 0 else name
            rows.append((str(path), label, split))
    broken = root / "img" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows.append((str(broken), "cat", "val"))
    twin = root / "img" / "twin.png"
    shutil.copy(written["dog"][0], twin)
    rows.append((str(twin), "dog", "train"))
    table = root / "data.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return table


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_run") / "run"
    # two epochs: the browser test needs every class learned (a diagonal gallery beside each mistake),
    # which one epoch of 7 steps reaches only for some seeds
    return Path(imgcls.train(data, out, epochs=2, progress=False, **FAST).run_dir)


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the confusion matrices' cells."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.cells: dict[str, dict[tuple[int, int], int]] = {}
        self._split = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table" and "confusion" in (attrs.get("class") or ""):
            self._split = attrs["data-split"]
            self.cells[self._split] = {}
        if tag == "td" and self._split and "data-true" in attrs:
            self._cell = (int(attrs["data-true"]), int(attrs["data-pred"]))

    def handle_endtag(self, tag):
        if tag == "table":
            self._split = None

    def handle_data(self, text):
        if self._cell is not None:
            self.cells[self._split][self._cell] = int(text)
            self._cell = None


def _parse(path: Path) -> _Tags:
    tags = _Tags()
    tags.feed(path.read_text(encoding="utf-8"))
    return tags


def _matrix(cells: dict[tuple[int, int], int], k: int) -> list[list[int]]:
    return [[cells[(t, p)] for p in range(k)] for t in range(k)]


def _thumbs(text: str) -> int:
    return len(re.findall(r"\.t\d+\{background-image:url\(data:image/jpeg;base64,", text))


def test_training_writes_a_self_contained_report_under_the_cap(run):
    page = run / rundir.REPORT
    assert page.is_file()
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    tags = _parse(page).tags
    for tag, attrs in tags:
        if tag in ("script", "link", "img", "iframe", "source", "embed", "object"):
            for key in ("src", "href", "data"):
                value = attrs.get(key) or ""
                assert not value or value.startswith("data:") or value.startswith("#"), (tag, key, value[:60])
    assert not [a for t, a in tags if t == "link"]  # no stylesheet or font from anywhere
    n_scored = sum(1 for split in ("val", "test")
                   for _ in csv.DictReader((run / rundir.predictions_file(split)).open()))
    assert n_scored > html_report.MAX_THUMBS
    assert _thumbs(text) == html_report.MAX_THUMBS
    test_gallery = text[text.index('<section id="galleries-test">'):]
    assert test_gallery.count('<figure class="tile') >= min(30, html_report.GALLERY)  # not starved by val
    assert page.stat().st_size < SIZE_CAP
    for section in ("data", "training", "metrics", "confusion-val", "galleries-val", "confusion-test", "calibration"):
        assert f'<section id="{section}">' in text, section
    for words in ("Images per class and split", "Skipped files (1)", "broken.png", "Duplicates (1 groups)",
                  "twin.png", "config.yaml", "Most confident mistakes", "Least confident right answers",
                  "reliability diagram", "Temperature <b>T = "):
        assert words in text, words


def test_a_features_run_shows_how_its_head_was_chosen(run, data, tmp_path):
    """The features strategy fits its head once: the page draws the head's cross-validation (every penalty
    of both families, the chosen one named) where an epoch run has its curves, not a one-point curve."""
    fit = Path(imgcls.train(data, tmp_path / "features", weights=str(run), strategy="features", views=2,
                            progress=False, **FAST).run_dir)
    info = rundir.read_json(fit / rundir.FEATURES)
    assert len(info["cv"]) >= 2 and (fit / rundir.HEAD_SELECTION).read_bytes()[:4] == b"\x89PNG"
    text = (fit / rundir.REPORT).read_text(encoding="utf-8")
    section = text[text.index('<section id="training">'):text.index('<section id="metrics">')]
    assert 'cross-validation: held-out loss and accuracy per penalty"' in section and "training curves" not in section
    family = "head with the source classifier as prior" if info["prior_used"] else "plain linear head"
    assert f"It chose the {family} at the penalty {info['penalty']:.3g} per image" in section
    assert f"{info['cv_folds']}-fold cross-validation on the training images" in section
    # an epoch run keeps its curves and draws no head selection
    page = (run / rundir.REPORT).read_text(encoding="utf-8")
    assert "training curves: loss and accuracy per epoch" in page and "cross-validation" not in page
    assert not (run / rundir.HEAD_SELECTION).exists()


def test_the_chosen_row_is_the_fitted_family_and_penalty():
    from imgcls.evaluation.plots import chosen_cv_row

    cv = [{"prior": p, "lambda": lam, "loss": 1.0, "se": 0.1, "accuracy": 0.5} for p in (True, False)
          for lam in (1e-2, 1e-3 / 3)]
    assert chosen_cv_row({"cv": cv, "prior_used": False, "penalty": 1e-3 / 3}) is cv[3]
    assert chosen_cv_row({"cv": cv, "prior_used": True, "penalty": 1e-2}) is cv[0]
    assert chosen_cv_row({"cv": cv, "prior_used": True, "penalty": 0.1}) is None  # the fallback penalty: no CV
    assert chosen_cv_row({"cv": [], "prior_used": False, "penalty": 0.1}) is None


def test_the_head_caption_warns_when_near_copies_flatter_the_folds(tmp_path):
    cv = [{"prior": p, "lambda": lam, "loss": 0.5, "se": 0.1, "accuracy": 0.9}
          for p in (True, False) for lam in (1e-2, 1e-3)]
    for share, warned in ((0.58, True), (0.01, False), (None, False)):
        rundir.write_json(tmp_path / rundir.FEATURES, {"cv": cv, "prior_used": True, "penalty": 1e-3, "cv_folds": 5,
                                                       "views": 8, "near_copy_share": share})
        text = html_report._head_selection(tmp_path)
        assert "It chose the head with the source classifier as prior at the penalty 0.001 per image" in text
        assert ("58% of the training images have a near-copy" in text) is warned
    rundir.write_json(tmp_path / rundir.FEATURES, {"cv": [], "prior_used": False, "penalty": 0.1})
    assert html_report._head_selection(tmp_path) == ""  # a class too small to cross-validate: nothing to draw
    per_label = [{"label": j, **row} for j in range(2) for row in cv]  # a multi-label run: one head per label
    rundir.write_json(tmp_path / rundir.FEATURES, {"cv": per_label, "prior_used": True, "penalty": 1e-3})
    assert html_report._head_selection(tmp_path) == ""


def test_the_matrix_cells_are_the_val_and_test_confusion_matrices(run):
    cells = _parse(run / rundir.REPORT).cells
    for split in ("val", "test"):
        metrics = json.loads((run / f"{split}.json").read_text())
        assert _matrix(cells[split], len(metrics["labels"])) == metrics["confusion_matrix"]


def test_every_cell_with_images_has_its_gallery(run):
    text = (run / rundir.REPORT).read_text(encoding="utf-8")
    cells = _parse(run / rundir.REPORT).cells["val"]
    for (t, p), n in cells.items():
        if n:
            assert f'id="g-val-{t}-{p}" hidden' in text
            assert re.search(rf'id="g-val-{t}-{p}" hidden><h4>.*?: {n} image', text)


def test_eval_and_report_data_score_new_data_into_a_page(run, data, tmp_path, capsys):
    assert main(["-q", "eval", str(run), str(data)]) == 0
    page = run / rundir.EVAL_REPORT
    metrics = json.loads((run / "eval.json").read_text())
    assert _matrix(_parse(page).cells["eval"], 3) == metrics["confusion_matrix"]
    assert "data.csv" in page.read_text(encoding="utf-8")
    out = tmp_path / "mine.html"
    assert main(["-q", "report", str(run), "--data", str(data), "--split", "val", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    val = json.loads((run / "val.json").read_text())
    assert _matrix(_parse(out).cells["eval"], 3) == val["confusion_matrix"]  # the same images, the same model
    assert "Skipped files (1)" in text and "broken.png" in text
    assert '<section id="calibration">' in text and "eval: calibrated" not in text  # the plot is a PNG
    assert main(["-q", "eval", str(run), str(data), "--no-report", "--split", "val"]) == 0


def test_review_budget_and_a_missing_image_show_up(run, data, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    choose_thresholds(copy, data, "cat", 0.9)
    preds = copy / rundir.predictions_file("val")
    with preds.open(newline="") as handle:
        rows = list(csv.reader(handle))
    # the most confident mistake is always shown: its image moved away since training
    worst = max((r for r in rows[1:] if r[1] != r[2]), key=lambda r: float(r[3]))
    gone = str(tmp_path / "moved_away.png")
    worst[0] = gone
    with preds.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    assert main(["-q", "report", str(copy)]) == 0
    text = (copy / rundir.REPORT).read_text(encoding="utf-8")
    assert '<section id="budget">' in text and "review budget of cat" in text
    assert f'title="{gone}"><div class="th missing">not readable now</div>' in text


def test_a_report_failure_is_a_warning(run, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ValueError("a plot went wrong")

    monkeypatch.setattr(html_report, "_calibration_section", broken)
    with caplog.at_level(logging.WARNING, logger="imgcls"):
        assert html_report.write_run_report(run, tmp_path / "r.html") is None
    assert "report not written" in caplog.text and "a plot went wrong" in caplog.text
    assert not (tmp_path / "r.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_the_page_in_a_real_browser(run):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    cells = _parse(run / rundir.REPORT).cells["val"]
    mistake = max((tp for tp in cells if tp[0] != tp[1]), key=lambda tp: cells[tp])
    assert cells[mistake] > 0
    with open_page(sync_api, {"width": 1200, "height": 900}) as page:
        page.goto((run / rundir.REPORT).resolve().as_uri())
        sync_api.expect(page.locator("h1")).to_contain_text("imgcls report")
        galleries = page.locator("#confusion-val .cellgal")
        assert galleries.count() == sum(1 for n in cells.values() if n)
        sync_api.expect(page.locator("#confusion-val .cellgal:visible")).to_have_count(0)
        t, p = mistake
        page.locator(f'#confusion-val td[data-true="{t}"][data-pred="{p}"]').click()
        shown = page.locator(f"#g-val-{t}-{p}")
        sync_api.expect(shown).to_be_visible()
        sync_api.expect(page.locator("#confusion-val .cellgal:visible")).to_have_count(1)
        tiles = shown.locator(".tile")
        assert 0 < tiles.count() <= cells[mistake]
        labels = json.loads((run / rundir.LABELS).read_text())
        sync_api.expect(shown.locator("h4")).to_contain_text(f"true {labels[t]}, predicted {labels[p]}")
        for tile in tiles.all():  # each thumbnail is this cell's: predicted p, truly t
            caption = tile.locator("figcaption").inner_text()
            assert caption.startswith(labels[p]) and f"true {labels[t]}" in caption
        box = tiles.first.locator(".th").bounding_box()
        assert box["width"] >= 90 and box["height"] >= 90  # the thumbnail is drawn, not an empty box
        page.locator(f'#confusion-val td[data-true="{t}"][data-pred="{t}"]').click()  # another cell
        sync_api.expect(shown).to_be_hidden()
        sync_api.expect(page.locator(f"#g-val-{t}-{t}")).to_be_visible()
        page.locator(f'#confusion-val td[data-true="{t}"][data-pred="{p}"]').click()
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 20_000
    assert page.problems == []


def test_many_classes_keep_the_page_small(tmp_path):
    """60 classes, 600 images, a predictions file only: the matrix shows the 30 most confused classes and
    the page stays under the cap."""
    import numpy as np

    from imgcls.data.records import Record

    k, per = 60, 10
    labels = [f"species {i:02d}" for i in range(k)]
    written = make_class_tree(tmp_path / "img", {name: per for name in labels}, size=(48, 40), seed=2)
    run = tmp_path / "run"
    run.mkdir()
    rundir.write_json(run / rundir.LABELS, labels)
    rng = np.random.default_rng(0)
    records = [Record(path, name) for name, paths in written.items() for path in paths]
    truth = np.array([labels.index(r.label) for r in records])
    logits = rng.normal(0, 1, (len(records), k))
    logits[np.arange(len(records)), truth] += 2.5  # mostly right, mistakes all over
    html_report.write_predictions(run / rundir.predictions_file("val"), records, logits, labels, 1.0)
    page = html_report.write_report(run)
    text = page.read_text(encoding="utf-8")
    assert page.stat().st_size < SIZE_CAP
    assert _thumbs(text) == html_report.MAX_THUMBS
    cells = _parse(page).cells["val"]
    assert len({t for t, _ in cells}) == html_report.MAX_MATRIX == len({p for _, p in cells})
    assert f"The {html_report.MAX_MATRIX} classes with the most confusions of {k}." in text
    pred = logits.argmax(1)
    for (t, p), n in cells.items():
        assert n == int(((truth == t) & (pred == p)).sum())
