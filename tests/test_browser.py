"""The page in a real browser: Debian's headless Chromium, driven by Playwright, with a fake
microphone playing Telugu speech. No browser is downloaded: Playwright launches /usr/bin/chromium."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from browser_helpers import AUDIO_STATE_JS, launch_chromium
from conftest import wait_until

pytestmark = pytest.mark.browser

def frames_in_out(readouts: str) -> tuple[int, int]:
    match = re.search(r"Frames in / out\s*\|?\s*(\d+)\s*/\s*(\d+)", readouts)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


@pytest.mark.slow
def test_page_call_in_chromium(live_server, mic_wav, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p, mic_wav)
        try:
            context = browser.new_context(permissions=["microphone"], viewport={"width": 1400, "height": 900})
            page = context.new_page()
            page.goto(live_server.url + "/", wait_until="load")
            page.get_by_text("Demo mode: random-weight model").wait_for(timeout=30_000)

            page.get_by_text("Click to Access Microphone").click(timeout=30_000)
            page.locator("#call button", has_text="Record").first.click(timeout=30_000)

            service = live_server.service
            assert wait_until(lambda: service.registry.live(), 30), "the browser's call never reached the engine"
            session = service.registry.live()[0]

            page.get_by_text("In call").wait_for(timeout=15_000)
            # the readouts change while the call runs
            page.wait_for_function(
                "() => /Frames in \\/ out/.test(document.querySelector('#readouts').innerText)", timeout=30_000)
            first = frames_in_out(page.locator("#readouts").inner_text())
            page.wait_for_timeout(2500)
            second = frames_in_out(page.locator("#readouts").inner_text())
            assert second[0] > first[0] and second[1] > first[1], (first, second)

            # audio comes back: the server sent frames and the agent's stream plays in the page
            # (Chromium and the server share 2 cores here, so allow for a slow start)
            assert wait_until(lambda: session.seat.counters.frames_out > 20, 30), session.seat.counters
            state = page.evaluate(AUDIO_STATE_JS)
            assert any(a["live"] and not a["paused"] for a in state), state
            played = max(a["time"] for a in state)
            page.wait_for_timeout(1000)
            assert max(a["time"] for a in page.evaluate(AUDIO_STATE_JS)) > played

            # the sidebar's selectors reach the call's session
            page.locator("#voice input").click()
            page.get_by_role("option", name=re.compile("^Ravi")).click()
            assert wait_until(lambda: session.settings.voice == "ravi", 15), session.settings
            # ... and the LM: the seat's condition row is the new voice from the next frame on
            assert wait_until(lambda: session.seat.conditions.get("speaker") == "ravi", 5), session.seat.conditions

            page.wait_for_function("() => /ravi/.test(document.querySelector('#readouts').innerText)", timeout=15_000)
            shot = tmp_path / "screenshot.png"
            page.screenshot(path=str(shot))
            if os.environ.get("AGENT_SCREENSHOT"):
                shutil.copy(shot, os.environ["AGENT_SCREENSHOT"])

            # the sampling sliders reach the seat's sampler: greedy text for this call from here on
            page.locator("#sampling").get_by_text("Sampling").first.click()
            box = page.locator("#text-temp input[type=number]")
            box.fill("0")
            box.press("Enter")
            assert wait_until(lambda: session.seat.sampling is not None and session.seat.sampling.temp_text == 0, 15), \
                session.seat.sampling
            page.wait_for_function("() => /T 0, top-25/.test(document.querySelector('#readouts').innerText)",
                                   timeout=15_000)
            page.locator("#call button", has_text="Stop").first.click()
            assert wait_until(lambda: service.engine.seats_in_use() == 0, 15), "hanging up did not free the seat"
            page.get_by_text("The call ended").wait_for(timeout=15_000)  # the page tells the caller
        finally:
            browser.close()


# Whether the element that `selector` finds is inside the viewport and the topmost thing at its centre
# (not under the sidebar, a banner or another panel).
UNCOVERED_JS = """(el) => {
  const r = el.getBoundingClientRect();
  if (r.width === 0 || r.height === 0) return "has no size";
  if (r.top < 0 || r.left < 0 || r.bottom > window.innerHeight || r.right > window.innerWidth)
    return `outside the ${window.innerWidth}x${window.innerHeight} viewport: ${JSON.stringify(r)}`;
  const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  return top && (el === top || el.contains(top)) ? "ok" : `covered by ${top ? top.outerHTML.slice(0, 120) : "nothing"}`;
}"""


@pytest.mark.slow
def test_phone_page_opens_on_the_call_and_settings_are_one_tap_away(live_server, mic_wav, tmp_path):
    """At 390 x 844 with touch, as a phone opens a shared link: the control that starts a call is on screen and
    not covered; a call runs; voice and figures are one tap away and back."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p, mic_wav)
        try:
            context = browser.new_context(permissions=["microphone"], viewport={"width": 390, "height": 844},
                                          device_scale_factor=2, is_mobile=True, has_touch=True)
            page = context.new_page()
            page.goto(live_server.url + "/", wait_until="load")
            page.get_by_text("Demo mode: random-weight model").wait_for(timeout=30_000)
            page.wait_for_timeout(1000)  # the page's load events have run: the sidebar stays closed on a phone
            access = page.get_by_text("Click to Access Microphone")
            access.wait_for(timeout=30_000)
            assert access.evaluate(UNCOVERED_JS) == "ok"
            access.tap()
            record = page.locator("#call button", has_text="Record").first
            record.wait_for(timeout=30_000)
            assert record.evaluate(UNCOVERED_JS) == "ok"
            page.screenshot(path=str(tmp_path / "phone-before-call.png"))
            record.tap()

            service = live_server.service
            assert wait_until(lambda: service.registry.live(), 30), "the phone's call never reached the engine"
            session = service.registry.live()[0]
            page.get_by_text("In call").wait_for(timeout=15_000)

            # one tap: voice, emotion and the live figures
            settings = page.locator("#open-settings")
            assert settings.evaluate(UNCOVERED_JS) == "ok"
            settings.tap()
            page.wait_for_function("() => document.querySelector('#settings').classList.contains('open')",
                                   timeout=10_000)
            page.wait_for_timeout(500)  # the slide-in
            voice = page.locator("#voice input")
            assert voice.evaluate(UNCOVERED_JS) == "ok"
            voice.tap()
            page.get_by_role("option", name=re.compile("^Ravi")).tap()
            assert wait_until(lambda: session.settings.voice == "ravi", 15), session.settings
            page.wait_for_function("() => /Frames in \\/ out/.test(document.querySelector('#readouts').innerText)",
                                   timeout=30_000)
            page.locator("#readouts").scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "phone-settings.png"))

            # one tap back to the call, whose controls are uncovered again
            page.locator("#settings .toggle-button").tap()
            page.wait_for_function("() => !document.querySelector('#settings').classList.contains('open')",
                                   timeout=10_000)
            page.wait_for_timeout(500)
            stop = page.locator("#call button", has_text="Stop").first
            assert stop.evaluate(UNCOVERED_JS) == "ok"
            page.screenshot(path=str(tmp_path / "phone-in-call.png"))
            if os.environ.get("AGENT_PHONE_SCREENSHOTS"):  # a folder for docs/screenshot-phone.png and a look
                for shot in ("phone-before-call.png", "phone-settings.png", "phone-in-call.png"):
                    shutil.copy(tmp_path / shot, Path(os.environ["AGENT_PHONE_SCREENSHOTS"]) / shot)
            stop.tap()
            assert wait_until(lambda: service.engine.seats_in_use() == 0, 15), "hanging up did not free the seat"
        finally:
            browser.close()
