"""The web page in a real browser: headless Chromium (the system's, never a downloaded one) driven by
Playwright against a real uvicorn server (``python -m cbir.serve``) on a free loopback port.

Skipped, with the reason, only when no chromium binary is installed (``make test`` installs the Debian
package ``chromium`` when it runs as root). The screenshot lands in ``tmp_path`` and in
``tests/artifacts/`` (git-ignored)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers.paths import ARTIFACTS, ROOT
from helpers.serve import build_tiny_search

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    explicit = os.environ.get("CBIR_CHROMIUM")
    if explicit and Path(explicit).is_file():
        return explicit
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (install the Debian package `chromium`; "
                                                "`make test` does so when run as root)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server process on the tiny bundle; yields (base URL, collection folder)."""
    root = tmp_path_factory.mktemp("browser")
    searcher, collection = build_tiny_search(root)
    port = free_port()
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "cbir.serve", f"bundle={searcher.bundle.path}", f"port={port}", "k=5",
         "log_level=warning"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited ({process.returncode}): {(root / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not start in 180 s: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url, collection
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    assert "Traceback" not in (root / "server.log").read_text()  # no 5xx / crash while the page was used


def test_page_uploads_an_image_and_shows_the_result_grid(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, collection = server
    query = sorted(collection.rglob("*.png"))[6]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-sized window
            problems = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(url + "/")
            expect(page.locator("#status")).to_contain_text("24 indexed images", timeout=30_000)
            default_k = httpx.get(f"{url}/health").json()["default_k"]
            expect(page.locator("#k-input")).to_have_value(str(default_k))  # the server's k, not the page's own
            assert page.evaluate("fetch('/favicon.ico').then(r => r.status)") == 200
            page.fill("#k-input", "6")
            page.set_input_files("#file-input", str(query))  # choosing a file starts the search
            tiles = page.locator("#results figure.result")
            expect(tiles).to_have_count(6, timeout=60_000)
            first = tiles.first
            expect(first.locator(".score")).to_contain_text("#1 · score 1.000")
            expect(first.locator(".score")).to_have_text(re.compile(r"#1 · score 1\.000 · match \d+%"))  # calibrated
            expect(first.locator(".label")).to_have_text(query.parent.name)
            expect(page.locator("#predicted")).to_contain_text("predicted class: ")
            expect(first.locator(".path")).to_have_text(query.relative_to(collection).as_posix())
            page.wait_for_function("() => [...document.querySelectorAll('#results img')]"
                                   ".every(img => img.complete && img.naturalWidth > 0)", timeout=30_000)
            assert page.locator("#preview").is_visible()
            assert not page.locator("#error").is_visible()
            assert problems == []

            shot = tmp_path / "search_page.png"
            page.screenshot(path=str(shot), full_page=True)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "search_page.png")
            assert shot.stat().st_size > 5_000

            # a file that is not an image: the page shows the service's message, not a blank grid
            bad = tmp_path / "notes.png"
            bad.write_text("not an image at all")
            page.set_input_files("#file-input", str(bad))
            expect(page.locator("#error")).to_contain_text("not an image", timeout=30_000)
            expect(page.locator("#error")).to_contain_text("HTTP 422")
            expect(tiles).to_have_count(0)
            page.screenshot(path=str(ARTIFACTS / "search_page_error.png"), full_page=True)

            # the label filter (the index holds labels): only that class comes back
            other = sorted(p.name for p in collection.iterdir() if p.is_dir() and p.name != query.parent.name)[0]
            expect(page.locator("#filter-input")).to_be_visible()
            page.fill("#filter-input", other)
            page.set_input_files("#file-input", str(query))
            expect(tiles).to_have_count(4, timeout=60_000)  # the class holds 4 images: fewer than k=6
            assert set(page.locator("#results .label").all_inner_texts()) == {other}
            assert not page.locator("#error").is_visible()
        finally:
            browser.close()


def test_real_server_refuses_an_oversized_upload_early(server):
    """Through uvicorn (not the test client): a 12 MB body is answered 413 JSON, declared or streamed."""
    url, _ = server
    big = bytes(12 * 2**20)
    response = httpx.post(f"{url}/search", files={"image": ("big.png", big)}, timeout=60)
    assert response.status_code == 413 and "limit" in response.json()["error"]

    def chunks():  # a well-formed multipart start, then an endless file part: only the limit stops it
        yield (b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(12 * 16):
            yield bytes(64 * 1024)

    streamed = httpx.post(f"{url}/search", content=chunks(), timeout=60,
                          headers={"content-type": "multipart/form-data; boundary=x"})
    assert streamed.status_code == 413 and "limit" in streamed.json()["error"]
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
