"""Take the README's screenshot of the app (docs/app.png) on real runs, in headless Chromium.

    python -m diffexp.train                                   # the default run, into outputs/
    python scripts/app_screenshot.py outputs docs/app.png     # select the newest run, sample, screenshot

Needs Debian's chromium (apt-get install chromium) and playwright (pip install -e '.[test]').
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from diffexp.records.catalog import run_dirs

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # Chromium's own connections fail on a closed network


def main(runs: str, out: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "diffexp.app", f"app.runs={runs}", f"app.port={port}"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                tempfile.mkdtemp(prefix="diffexp-chromium-"), executable_path=shutil.which("chromium"),
                headless=True, args=FLAGS, viewport={"width": 1400, "height": 900})
            page = context.new_page()
            page.set_default_timeout(120_000)
            page.goto(url)
            newest = max(r.path for r in run_dirs(runs)).relative_to(Path(runs).resolve()).as_posix()  # the table's key
            page.locator("#runs-table").get_by_text(newest, exact=True).filter(visible=True).first.click()
            page.locator("#run-status").get_by_text("finished").wait_for()
            page.get_by_role("tab", name="Sample").click()
            page.locator("#sample-button").click()
            page.locator("#sampled img").wait_for()
            page.wait_for_timeout(1000)
            page.screenshot(path=out, full_page=True)
            context.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"screenshot of {newest} -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
