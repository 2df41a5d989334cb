"""Rewrites docs/web.png: the web page of `selfbudgeter serve` answering a question with a trained model.

    .venv/bin/python docs/web_screenshot.py --model runs/demo/models/selfbudgeter

Starts the server on a free loopback port, asks one question of the embedded test split in headless Chromium
(Playwright driving the system's `chromium`), waits for the answer and saves the page.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from selfbudgeter.core.grading import BOXED, EXTRACTION_HELP, EXTRACTIONS

OUT = Path(__file__).resolve().parent / "web.png"
# The fourth question of the embedded task's test split (answer 2).
QUESTION = "Sam has 8 tiles. 1) gains 1 2) eats 4 3) gains 3 4) loses 6. What is the number of tiles now?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder, e.g. runs/demo/models/selfbudgeter")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--answer-extraction", default=BOXED, choices=EXTRACTIONS,
                        help=f"passed to serve: {EXTRACTION_HELP}")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "selfbudgeter.cli", "serve", "--model", args.model, "--port", str(port),
               "--answer-extraction", args.answer_extraction]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            sys.exit("the server did not start")
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(url + "/")
            page.fill("#question", args.question)
            page.click("#ask")
            page.wait_for_function("() => document.getElementById('answer').textContent !== '–'", timeout=60_000)
            page.wait_for_function("() => document.getElementById('ask').disabled === false", timeout=60_000)
            page.wait_for_timeout(1500)  # the progress bar's CSS transition
            page.screenshot(path=str(args.out), full_page=True)
            print(f"{args.out}: {page.text_content('#status')}")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
