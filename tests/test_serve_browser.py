"""The `imgcls serve` page in a real headless Chromium (the system's browser, driven by Playwright).

Install the browser with `apt-get install chromium` (Debian/Ubuntu; `.ci/run` does it); Playwright's own
browser download is never used.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST
from imagezoo import write_image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")

import imgcls  # noqa: E402
from browser import CHROMIUM, NO_CHROMIUM, open_page  # noqa: E402
from serving import cli_server  # noqa: E402

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
SCREENSHOT = Path("/tmp/serve_page.png")


@pytest.fixture(scope="module")
def served(tiny_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_browser")
    run = imgcls.train(tiny_tree, root / "run", epochs=1, progress=False, **{**FAST, "export_onnx": True}).run_dir
    (Path(run) / "thresholds.json").write_text(json.dumps({"thresholds": {c: 0.4 for c in ("cat", "dog", "fox")}}))
    with cli_server(run, root / "server.log") as url:
        yield url


@pytest.fixture
def page(served):
    with open_page(sync_api, {"width": 1100, "height": 760}) as page:
        yield page


def test_upload_through_the_page_shows_labels(page, served, tiny_tree, tmp_path):
    page.goto(served + "/")
    sync_api.expect(page.locator("#summary")).to_contain_text("3 classes")
    images = [sorted((tiny_tree / c).glob("*.png"))[0] for c in ("cat", "dog", "fox")]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    large = write_image(tmp_path / "wide.jpg", size=(320, 200), pattern="gradient", color=(90, 160, 60))
    page.set_input_files("#files", [*map(str, images), str(large), str(broken)])

    cards = page.locator("#results .card")
    sync_api.expect(cards).to_have_count(5)
    sync_api.expect(page.locator("#results .card.done")).to_have_count(4, timeout=30_000)
    labels = page.locator("#results .card.done .label").evaluate_all("els => els.map(e => e.dataset.label)")
    assert sorted(set(labels)) <= ["cat", "dog", "fox"] and len(labels) == 4
    names = page.locator("#results .card .name").all_inner_texts()
    assert names == [*(p.name for p in images), "wide.jpg", "broken.jpg"]  # in the order chosen
    for card in page.locator("#results .card.done").all():
        sync_api.expect(card.locator(".bars li")).to_have_count(3)  # top 5 of three classes
        top = float(card.locator(".bars li").first.inner_text().split()[-2])
        if abs(top - 40) > 0.1:  # the page rounds to 0.1 %
            assert card.locator(".decision").inner_text() == ("sure" if top > 40 else "uncertain")
    failed = page.locator("#results .card.failed .label")
    sync_api.expect(failed).to_contain_text("not an image")
    sync_api.expect(page.locator("#status")).to_contain_text("4 image(s) classified, 1 could not be read")

    for path in (tmp_path / "page.png", SCREENSHOT):
        page.screenshot(path=str(path), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert page.problems == []


def test_docs_page_renders_offline(page, served):
    page.goto(served + "/docs")
    sync_api.expect(page.locator(".swagger-ui .title").first).to_contain_text("imgcls serve", timeout=30_000)
    sync_api.expect(page.locator("text=/predict").first).to_be_visible()
    assert page.problems == []
