"""Test helper: the system's Chromium (never a Playwright download) and a page that records its errors.

Other tests import it (``from browser import CHROMIUM, open_page``; pytest puts the tests folder on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

CHROMIUM = next((p for p in (os.environ.get("IMGCLS_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and Path(p).exists()), None)
NO_CHROMIUM = "no Chromium found: install it with `apt-get install -y chromium` (or set IMGCLS_CHROMIUM to its path)"


@contextlib.contextmanager
def open_page(sync_api, viewport: dict):
    """A headless page of the system's Chromium; ``page.problems`` collects console errors, page errors and
    failed requests."""
    problems = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=viewport)
            page.on("console", lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"))
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
            page.problems = problems
            yield page
        finally:
            browser.close()
