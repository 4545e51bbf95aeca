"""The rating page in a real headless Chromium (Debian's, driven by Playwright through the DevTools protocol):
both videos load and play in sync, seek together, and votes cast with the keyboard land in the study's log."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dataformat.preference import read_study, read_vote_log
from evaluation.preference.request import StudyCreateRequest, StudyServeRequest
from evaluation.preference.server import StudyServer
from evaluation.preference.study import create_study
from tests.preference_helpers import write_system

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make setup installs it)")


@pytest.fixture
def served_study(tmp_path):
    for index, name in enumerate("AB"):
        write_system(tmp_path / name, index, 2)
    request = StudyCreateRequest.build(output_dir=str(tmp_path / "study"), axes="quality,motion",
                                       systems=[f"{name}={tmp_path / name}" for name in "AB"])
    create_study(request)
    server = StudyServer(StudyServeRequest.build(output_dir=request.output_dir, port=0, token="k" * 24)).start()
    yield request.layout, server
    server.stop()


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # the test's own probes are evaluated strings, which the page's Content-Security-Policy forbids
            yield browser.new_context(bypass_csp=True).new_page()
        finally:
            browser.close()


def times(page) -> tuple[float, float]:
    return tuple(page.evaluate("[document.getElementById('left').currentTime, "
                               "document.getElementById('right').currentTime]"))


def test_page_plays_both_videos_in_sync_and_votes_with_the_keyboard(served_study, page):
    layout, server = served_study
    page.goto(f"{server.url}&rater=ann")
    page.wait_for_function("document.getElementById('left').readyState >= 3 && "
                           "document.getElementById('right').readyState >= 3", timeout=15_000)
    assert page.evaluate("document.getElementById('left').canPlayType('video/webm; codecs=\"vp9\"')") == "probably"
    assert page.locator("#progress").inner_text() == "Pairs done: 0 / 2"
    first_label = page.locator("#label").inner_text()
    assert first_label in ("prompt 0", "prompt 1")

    page.wait_for_function("!document.getElementById('left').paused", timeout=10_000)  # it starts playing
    page.keyboard.press("Space")  # pause: both stop, at the same frame
    page.wait_for_function("document.getElementById('left').paused && document.getElementById('right').paused")
    left, right = times(page)
    assert abs(left - right) < 0.1
    page.keyboard.press("Space")  # play: both move, together
    page.wait_for_function("document.getElementById('left').currentTime > 0.5 && "
                           "!document.getElementById('right').paused", timeout=10_000)
    left, right = times(page)
    assert left > 0.5 and abs(left - right) < 0.25
    page.keyboard.press("Space")
    page.wait_for_function("document.getElementById('right').paused")
    page.locator("#scrub").fill("500")  # scrub to the middle: both seek there
    page.wait_for_function("Math.abs(document.getElementById('right').currentTime - 1.0) < 0.1 && "
                           "Math.abs(document.getElementById('left').currentTime - 1.0) < 0.1")
    page.keyboard.press("l")  # loop off on both
    assert page.evaluate("[document.getElementById('left').loop, document.getElementById('right').loop]") == [
        False, False]

    page.keyboard.press("ArrowLeft")  # quality: left; then motion: no preference -> next pair
    page.wait_for_function("document.querySelector('.axis.current').dataset.axis === 'motion'")
    page.keyboard.press("s")
    page.wait_for_function(f"document.getElementById('label').textContent !== {first_label!r}")
    assert page.locator("#progress").inner_text() == "Pairs done: 1 / 2"
    page.keyboard.press("d")
    page.wait_for_function("document.querySelector('.axis.current').dataset.axis === 'motion'")
    page.keyboard.press("ArrowUp")  # back to quality: change the mind, then motion
    page.keyboard.press("a")
    page.keyboard.press("ArrowRight")
    page.wait_for_selector("#done", state="visible")

    votes = read_vote_log(layout.votes)[0]
    _, pairs = read_study(layout)
    order = [vote["pair"] for vote in votes]
    labels = {pair.id: pair.label for pair in pairs}
    assert labels[order[0]] == first_label and len(set(order)) == 2
    assert [(vote["axis"], vote["choice"], vote["rater"]) for vote in votes] == [
        ("quality", "left", "ann"), ("motion", "none", "ann"), ("quality", "right", "ann"),
        ("quality", "left", "ann"), ("motion", "right", "ann")]

    page.goto(server.url)  # no ?rater=: this browser remembers ann (done); a new rater types an id
    page.wait_for_selector("#done", state="visible")
    page.locator("#rater").fill("bob smith")
    page.keyboard.press("Enter")
    assert "enter a rater id" in page.locator("#message").inner_text()
    page.locator("#rater").fill("bob")
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('progress').textContent === 'Pairs done: 0 / 2'")
