"""The playground page in a real headless browser: type a prompt, click Generate, streamed text appears.

Driven by Playwright with the system's Chromium (Debian: `apt-get install chromium`; Playwright's own browser
download is not needed). Skipped with the reason when either is missing; a screenshot of the page is saved
under the test's tmp folder when it fails.
"""

from __future__ import annotations

import shutil

import pytest
from serve_helpers import MODEL_NAME, live_server

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")


def test_playground_streams_text_into_the_page(base_run, tmp_path):
    with live_server(base_run, api_key="page-key") as server, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        try:
            page.goto(server.url + "/", timeout=30_000)
            assert MODEL_NAME in page.title() + page.inner_text("h1")
            page.fill("#prompt", "def add(a, b):")
            page.fill("#max-tokens", "24")
            page.fill("#temperature", "0")
            page.fill("#api-key", "page-key")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
            shown = page.inner_text("#completion")
            expected = (
                server.client(api_key="page-key")
                .completions.create(model=MODEL_NAME, prompt="def add(a, b):", max_tokens=24, temperature=0)
                .choices[0]
                .text
            )
            assert shown == expected and shown
            page.fill("#api-key", "wrong")  # errors are shown, not swallowed
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').classList.contains('error')", timeout=30_000)
            assert "incorrect API key" in page.inner_text("#status")
        except Exception:
            page.screenshot(path=str(tmp_path / "playground-failure.png"))
            raise
        finally:
            browser.close()
