"""Debian's headless Chromium for the page tests (tests/test_browser.py, tests/test_webrtc_reconnect.py):
no browser is downloaded, Playwright launches /usr/bin/chromium with a fake microphone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
# window.__peers: every peer connection the page makes, for a test to read its stats (an init script,
# added before the page's own scripts run)
KEEP_PEERS_JS = """(() => {
  const Native = window.RTCPeerConnection;
  window.__peers = [];
  window.RTCPeerConnection = class extends Native {
    constructor(...args) { super(...args); window.__peers.push(this); }
  };
})();"""
AUDIO_STATE_JS = """() => Array.from(document.querySelectorAll('audio, video')).filter(a => a.srcObject)
  .map(a => ({paused: a.paused, time: a.currentTime,
              live: a.srcObject.getAudioTracks().filter(t => t.readyState === 'live').length}))"""


def chromium_args(mic_wav: Path) -> list[str]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    return ["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic_wav}", "--autoplay-policy=no-user-gesture-required"]


def launch_chromium(playwright, mic_wav: Path):
    """Debian's headless Chromium whose fake microphone plays `mic_wav`."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=chromium_args(mic_wav))


def launch_chromium_without_udp(playwright, mic_wav: Path, profile: Path, **context):
    """Like `launch_chromium`, as a browser context whose WebRTC has no path: the profile's
    `webrtc.ip_handling_policy` is "disable_non_proxied_udp" and there is no proxy, so Chromium gathers no
    ICE candidate at all (a network with no UDP path and no TURN relay). Debian's Chromium ignores the
    command-line form of that setting (--force-webrtc-ip-handling-policy); the preference it honours."""
    (profile / "Default").mkdir(parents=True, exist_ok=True)
    (profile / "Default" / "Preferences").write_text(json.dumps({"webrtc": {"ip_handling_policy":
                                                                            "disable_non_proxied_udp"}}))
    return playwright.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM,
                                                         args=chromium_args(mic_wav), **context)
