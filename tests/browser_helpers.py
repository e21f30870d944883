"""Debian's headless Chromium for the page tests (tests/test_browser.py, tests/test_webrtc_reconnect.py):
no browser is downloaded, Playwright launches /usr/bin/chromium with a fake microphone."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
AUDIO_STATE_JS = """() => Array.from(document.querySelectorAll('audio, video')).filter(a => a.srcObject)
  .map(a => ({paused: a.paused, time: a.currentTime,
              live: a.srcObject.getAudioTracks().filter(t => t.readyState === 'live').length}))"""


def launch_chromium(playwright, mic_wav: Path):
    """Debian's headless Chromium whose fake microphone plays `mic_wav`."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic_wav}", "--autoplay-policy=no-user-gesture-required"])
