"""The web page at `/`, in headless Chromium (Playwright driving Debian's `chromium`) against a live server.

The model is the tiny random Llama with EOS suppressed and each decode step slowed to ~10 ms, so a
generation lasts seconds and the page can be watched (and stopped) mid-way.
Needs `apt-get install chromium` and `pip install playwright` (no `playwright install`: the system browser is used).
`SELFBUDGETER_UPDATE_SCREENSHOT=1 pytest tests/test_web.py` rewrites docs/web.png.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from selfbudgeter.serving.server import ServerConfig, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The README's screenshot; rewritten only on request so that test runs leave the work tree clean.
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "web.png"
UPDATE_SCREENSHOT = os.environ.get("SELFBUDGETER_UPDATE_SCREENSHOT") == "1"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

CONSOLE: list[str] = []  # the browser console: a Content-Security-Policy violation would be reported here

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    from test_server import LiveServer

    from selfbudgeter.serving.generator import BudgetGenerator
    from selfbudgeter.core.models import load_model

    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    forward = model.forward

    # ~30 ms a token: a request runs for ~15 s unless stopped, so even a slow browser on a loaded machine sees
    # the budget before the answer; the tests stop or answer early after a few tokens.
    def slow_forward(*args, **kwargs):
        time.sleep(0.03)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    generator = BudgetGenerator(model, tokenizer, max_batch_size=2)
    server = LiveServer(create_app(generator, ServerConfig(served_model_name="tiny", max_concurrent=4)))
    yield server
    server.stop()
    generator.close()


@pytest.fixture(scope="module")
def page(live):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # Generous timeouts: on a busy 2-core CI machine Chromium alone can take tens of seconds to start.
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=120_000)
        page = browser.new_page(viewport={"width": 900, "height": 640})
        page.set_default_timeout(60_000)
        page.on("console", lambda message: CONSOLE.append(message.text))
        page.goto(live.url + "/")
        yield page
        browser.close()


def ask(page, question: str, budget: str) -> None:
    page.fill("#question", question)
    page.fill("#budget", budget)
    page.click("#ask")


def test_budget_appears_before_the_answer_and_stop_stops(page, live):
    ask(page, "What is 12 + 30 - 7?", "300")
    page.wait_for_function("() => document.getElementById('budget-value').textContent === '300'")
    # The budget is known while the answer is not.
    assert page.text_content("#answer") == "–"
    assert page.is_enabled("#stop") and page.is_enabled("#answer-now")
    page.wait_for_function("() => document.getElementById('solution').textContent.length > 0")
    page.wait_for_function("() => parseFloat(document.getElementById('progress').style.width) > 0")
    assert page.text_content("#eta").endswith(" s")
    page.click("#stop")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Stopped')")
    assert page.is_enabled("#ask") and not page.is_enabled("#stop")
    shown = page.text_content("#solution")
    time.sleep(0.3)
    assert page.text_content("#solution") == shown  # nothing arrives after Stop
    stats = httpx.get(f"{live.url}/metrics", timeout=10).json()
    assert stats["cancelled"] == 1 and stats["active"] == 0
    assert int(page.text_content("#used")) < 300


def test_answer_now_answers(page, live, tmp_path):
    ask(page, "What is 9 * 4 + 2?", "300")
    page.wait_for_function("() => document.getElementById('budget-value').textContent === '300'")
    page.wait_for_function("() => parseInt(document.getElementById('used').textContent) >= 20")
    page.click("#answer-now")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Answered early')")
    assert "So the answer is" in page.text_content("#solution")
    assert page.text_content("#answer") != "–"
    assert httpx.get(f"{live.url}/metrics", timeout=10).json()["answered_early"] == 1
    assert page.text_content("#eta-label") == "in total"
    shot = SCREENSHOT if UPDATE_SCREENSHOT else tmp_path / "web.png"
    shot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_the_page_runs_under_its_content_security_policy(page, live):
    # The two tests above drove the page's script: it ran under the policy, and nothing was refused.
    assert "script-src 'sha256-" in httpx.get(f"{live.url}/", timeout=10).headers["content-security-policy"]
    assert page.text_content("#answer") != "–"
    assert not [line for line in CONSOLE if "Content Security Policy" in line or "Refused to" in line]


def test_an_answer_on_budget_leaves_the_bar_unmarked(page, embedded_tokenizer):
    # The bar turned red for a solution on budget by the training metric: the count it showed held the solution
    # tags. The server now reports format.token_length of the solution, the length training rewards.
    from test_generator import CONTENT, scripted_model
    from test_server import LiveServer

    from selfbudgeter.core import format as fmt
    from selfbudgeter.serving.generator import BudgetGenerator

    length = fmt.token_length(embedded_tokenizer, CONTENT)
    model = scripted_model(embedded_tokenizer, budget=length, delay=0.01)
    generator = BudgetGenerator(model, embedded_tokenizer, warmup=False)
    server = LiveServer(create_app(generator, ServerConfig(served_model_name="scripted")))
    try:
        page.goto(server.url + "/")
        page.wait_for_function("() => document.getElementById('model').dataset.name === 'scripted'")
        ask(page, "What is 2+3?", "")  # the model states its own budget: its solution's exact length
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done')")
        assert page.text_content("#budget-value") == str(length)
        assert page.text_content("#used") == str(length)
        assert "over" not in page.get_attribute("#bar", "class").split()
    finally:
        server.stop()
        generator.close()
