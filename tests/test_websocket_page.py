"""The page's call over a WebSocket (assets/web/ws_call.js, /api/chat with ?codec=opus): headless Chromium
with a fake Telugu microphone opens the page through Debian's nginx as a plain reverse proxy.

- With no UDP path for WebRTC (Chromium may not use non-proxied UDP, and there is no TURN relay) the
  call falls back to the WebSocket: the agent's audio comes back at the stream's pace, the readouts are
  live, the page says "WebSocket", the sidebar's settings reach the call and hanging up frees the seat.
- With UDP open the same page calls over WebRTC.
- A WebSocket call survives its proxy going away (nginx killed and started again): the page resumes it
  within the server's resume window, same seat, same conversation."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from browser_helpers import AUDIO_STATE_JS, launch_chromium, launch_chromium_without_udp
from conftest import free_port, wait_until
from nginx_helpers import need_nginx, nginx_command, plain_proxy_conf

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TRANSPORT_JS = "() => { const t = window.__agentTransport; return {name: t.name, ice: t.ice, fellBack: t.fellBack, " \
               "stats: t.stats}; }"


@dataclass
class Proxy:
    conf: Path
    prefix: Path
    url: str
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        # one process (no master and workers): killing it cuts every connection at once
        self.proc = subprocess.Popen(nginx_command(self.conf, self.prefix, "-g", "daemon off; master_process off;"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def proxy(live_server, tmp_path_factory):
    need_nginx()
    prefix = tmp_path_factory.mktemp("nginx-plain")
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(plain_proxy_conf(prefix, port, live_server.url.removeprefix("http://")))
    proxy = Proxy(conf, prefix, f"http://127.0.0.1:{port}")
    proxy.start()
    yield proxy
    proxy.kill()


@contextmanager
def page_through(proxy: Proxy, mic_wav: Path, no_udp: Path | None = None):
    """The page through the proxy, in Chromium with UDP, or (`no_udp`: a profile folder) without."""
    from playwright.sync_api import sync_playwright

    context = {"permissions": ["microphone"], "viewport": {"width": 1400, "height": 900}}
    with sync_playwright() as p:
        if no_udp is None:
            browser = launch_chromium(p, mic_wav)
            page = browser.new_context(**context).new_page()
        else:
            browser = launch_chromium_without_udp(p, mic_wav, no_udp, **context)
            page = browser.new_page()
        try:
            page.on("console", lambda m: print("console:", m.type, m.text))  # shown when a test fails
            page.on("pageerror", lambda e: print("page error:", e))
            page.goto(proxy.url + "/", wait_until="load")
            page.get_by_text("Click to Access Microphone").click(timeout=30_000)
            yield page
        finally:
            browser.close()


def record(page) -> None:
    page.locator("#call button", has_text="Record").first.click(timeout=30_000)


def frames_in_out(page) -> tuple[int, int]:
    match = re.search(r"Frames in / out\s*\|?\s*(\d+)\s*/\s*(\d+)", page.locator("#readouts").inner_text())
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def transport(page) -> dict:
    return page.evaluate(TRANSPORT_JS)


def received_pace(page, seconds: float) -> float:
    """The agent's audio the page received over `seconds` of wall time, as a share of that time."""
    first, start = transport(page)["stats"]["receivedSeconds"], time.monotonic()
    page.wait_for_timeout(seconds * 1000)
    return (transport(page)["stats"]["receivedSeconds"] - first) / (time.monotonic() - start)


def test_websocket_page_fallback_through_nginx_without_udp(live_server, proxy, mic_wav, tmp_path):
    service = live_server.service
    with page_through(proxy, mic_wav, no_udp=tmp_path / "profile") as page:
        record(page)
        page.wait_for_function("() => /WebSocket/.test(document.querySelector('#call-transport').innerText)",
                               timeout=30_000)
        state = transport(page)
        assert state["fellBack"] and not {"connected", "completed"} & set(state["ice"]), state  # ICE never connected
        assert wait_until(lambda: service.registry.live(), 15), "the page's call never reached the engine"
        session = service.registry.live()[0]
        assert session.call_id.startswith("kyutai-"), session.call_id  # it came over /api/chat
        page.get_by_text("In call").wait_for(timeout=15_000)
        assert transport(page)["stats"]["codec"] == "opus"  # this Chromium has WebCodecs

        # the agent's audio at the stream's pace, and it plays
        pace = received_pace(page, 6)
        assert pace >= 0.9, f"the page received {pace:.0%} of real time"
        stats = transport(page)["stats"]
        assert stats["playedSeconds"] > 3, stats
        audio = page.evaluate(AUDIO_STATE_JS)
        assert any(a["live"] and not a["paused"] for a in audio), audio
        played = max(a["time"] for a in audio)

        # the readouts are live: frames in and out move, the voice-to-voice row is there
        first = frames_in_out(page)
        page.wait_for_timeout(1500)
        second = frames_in_out(page)
        assert second[0] > first[0] and second[1] > first[1], (first, second)
        assert max(a["time"] for a in page.evaluate(AUDIO_STATE_JS)) > played
        assert "Voice-to-voice" in page.locator("#readouts").inner_text()

        # the sidebar's settings reach the call over the socket
        page.locator("#voice input").click()
        page.get_by_role("option", name=re.compile("^Ravi")).click()
        assert wait_until(lambda: session.settings.voice == "ravi", 15), session.settings

        page.locator("#ws-hang-up").click()
        assert wait_until(lambda: service.engine.seats_in_use() == 0, 15), "hanging up did not free the seat"
        page.get_by_text("The call ended").wait_for(timeout=15_000)


def test_websocket_page_not_needed_with_udp_open_no_fallback(live_server, proxy, mic_wav):
    service = live_server.service
    with page_through(proxy, mic_wav) as page:
        record(page)
        page.wait_for_function("() => /WebRTC/.test(document.querySelector('#call-transport').innerText)",
                               timeout=30_000)
        assert wait_until(lambda: service.registry.live(), 15), "the page's call never reached the engine"
        session = service.registry.live()[0]
        assert not session.call_id.startswith("kyutai-"), session.call_id
        page.get_by_text("In call").wait_for(timeout=15_000)
        page.wait_for_timeout(5000)  # past the fallback's deadline (4 s): still WebRTC
        assert transport(page)["name"] == "WebRTC" and not transport(page)["fellBack"], transport(page)
        page.locator("#call button", has_text="Stop").first.click()
        assert wait_until(lambda: service.engine.seats_in_use() == 0, 15), "hanging up did not free the seat"


def test_websocket_page_call_resumes_after_the_proxy_drops(live_server, proxy, mic_wav):
    """WebSocket chosen on the page; nginx is killed mid-call (no close frame either way) and started
    again: the page reconnects with the call's resume token within the server's resume window (3 s here)
    and the same call goes on."""
    service = live_server.service
    with page_through(proxy, mic_wav) as page:
        page.locator("#transport-choice").get_by_text("WebSocket").click()
        record(page)
        assert wait_until(lambda: service.registry.live(), 15), "the page's call never reached the engine"
        session = service.registry.live()[0]
        page.get_by_text("In call").wait_for(timeout=15_000)
        assert transport(page)["name"] == "WebSocket" and not transport(page)["ice"], transport(page)  # no WebRTC try
        page.wait_for_timeout(1000)

        proxy.kill()
        proxy.start()
        page.wait_for_function("() => /Reconnected: the call goes on/.test("
                               "document.querySelector('#reconnect-status').innerText)", timeout=15_000)
        assert service.registry.live() == [session] and not session.closed
        assert session.connection >= 1, "the call was not resumed on a new connection"  # 0: its first
        pace = received_pace(page, 3)
        assert pace >= 0.8, f"after resuming, the page received {pace:.0%} of real time"
        frames = session.seat.counters.frames_in
        assert wait_until(lambda: session.seat.counters.frames_in > frames + 10, 10), "no more microphone"
        page.locator("#ws-hang-up").click()
        assert wait_until(lambda: service.engine.seats_in_use() == 0, 15), "hanging up did not free the seat"


# -- under --auth, with a per-client cap and a call time limit: one server and one browser ------------

USER, PASSWORD = "ana", "s3cret"
TIME_LIMIT_S = 8.0
NO_WEBCODECS_JS = "delete window.AudioEncoder; delete window.AudioDecoder; delete window.AudioData;"
RAW_SOCKET_JS = """async (path) => await new Promise((done) => {
  const ws = new WebSocket(new URL(path, location.href.replace(/^http/, "ws")));
  ws.binaryType = "arraybuffer"; const said = [];
  ws.onmessage = (e) => said.push(new TextDecoder().decode(new Uint8Array(e.data)));
  ws.onclose = (e) => done({code: e.code, said});
  setTimeout(() => done({code: -1, said}), 10000);
})"""


@dataclass
class GuardedSite:
    server: object  # conftest.LiveServer
    browser: object
    mic_wav: Path

    def page(self, logged_in: bool = True, init_script: str | None = None):
        """A page of its own browser context (its own cookies), logged in through Gradio's login form
        unless asked not to, with the microphone allowed."""
        context = self.browser.new_context(permissions=["microphone"], viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.on("console", lambda m: print("console:", m.type, m.text))  # shown when a test fails
        if init_script:
            page.add_init_script(init_script)
        page.goto(self.server.url + "/", wait_until="load")
        if logged_in:
            page.get_by_label("username").fill(USER)
            page.get_by_label("password").fill(PASSWORD)
            page.get_by_role("button", name="Login").click()
            page.get_by_text("Click to Access Microphone").click(timeout=30_000)
        return page

    def call_over_websocket(self, page) -> None:
        page.locator("#transport-choice").get_by_text("WebSocket").click()
        record(page)


@pytest.fixture(scope="module")
def guarded_site(mic_wav):
    from playwright.sync_api import sync_playwright

    from agent.config import ServerConfig
    from conftest import LiveServer

    server = LiveServer(max_sessions=3, server_config=ServerConfig(
        auth=f"{USER}:{PASSWORD}", max_calls_per_client=1, max_call_seconds=TIME_LIMIT_S))
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p, mic_wav)
            try:
                yield GuardedSite(server, browser, mic_wav)
            finally:
                browser.close()
    finally:
        server.close()


def notice(page) -> str:
    return page.locator("#reconnect-status").inner_text()


def test_websocket_page_call_under_auth_uses_the_login_cookie(guarded_site):
    """A logged-in page's WebSocket call is let in by Gradio's login cookie (a browser cannot send Basic
    auth on a WebSocket) and the agent's audio comes back; a page that has not logged in is refused, and
    told why in the protocol (close 1008), as the page's WebRTC offer is refused by Gradio's login check."""
    service = guarded_site.server.service
    outsider = guarded_site.page(logged_in=False)
    refused = outsider.evaluate(RAW_SOCKET_JS, "/api/chat?codec=opus")
    assert refused["code"] == 1008 and any("Not logged in" in s for s in refused["said"]), refused
    assert service.engine.seats_in_use() == 0

    page = guarded_site.page()
    guarded_site.call_over_websocket(page)
    assert wait_until(lambda: service.registry.live(), 15), f"the call never reached the engine: {notice(page)!r}"
    assert service.registry.live()[0].call_id.startswith("kyutai-")
    page.wait_for_function("() => window.__agentTransport.stats.receivedSeconds > 1.5", timeout=15_000)
    assert transport(page)["name"] == "WebSocket"
    page.locator("#ws-hang-up").click()
    assert wait_until(lambda: service.engine.seats_in_use() == 0, 15), "hanging up did not free the seat"
    page.context.close()
    outsider.context.close()


def test_websocket_page_cap_refusal_shown_and_time_limit_ends_the_call(guarded_site):
    """Cap 1 per client: a second page's WebSocket call from the same address is refused and the page
    shows the cap's message (not a reconnecting loop); the first call ends at the time limit, and its
    page says so."""
    service = guarded_site.server.service
    first, second = guarded_site.page(), guarded_site.page()
    guarded_site.call_over_websocket(first)
    first.wait_for_function("() => window.__agentTransport.stats.receivedSeconds > 0.5", timeout=15_000)

    guarded_site.call_over_websocket(second)
    second.wait_for_function("() => /At most 1 call/.test(document.querySelector('#reconnect-status').innerText)",
                             timeout=15_000)
    second.wait_for_function("() => window.__agentTransport.name === ''", timeout=5_000)  # the call is over
    second.wait_for_timeout(1000)  # and stays over: no reconnecting
    assert transport(second)["name"] == "" and "At most 1 call" in notice(second), notice(second)
    assert len(service.registry.live()) == 1

    first.wait_for_function("() => /time limit/.test(document.querySelector('#reconnect-status').innerText)",
                            timeout=(TIME_LIMIT_S + 10) * 1000)
    assert transport(first)["name"] == "", transport(first)  # the page's call ended with it
    # not before the limit: the microphone's own clock (its chunks sent) says how long the call lasted
    assert transport(first)["stats"]["sentSeconds"] >= TIME_LIMIT_S - 1, transport(first)
    assert wait_until(lambda: service.engine.seats_in_use() == 0, 15), "the time limit did not free the seat"
    first.context.close()
    second.context.close()


def test_websocket_page_pcm_without_webcodecs(guarded_site):
    """A browser without WebCodecs (no AudioEncoder/AudioDecoder) calls over the socket in 16-bit PCM:
    the server hears the microphone and the agent's audio comes back and plays."""
    service = guarded_site.server.service
    page = guarded_site.page(init_script=NO_WEBCODECS_JS)
    guarded_site.call_over_websocket(page)
    assert wait_until(lambda: service.registry.live(), 15), f"the call never reached the engine: {notice(page)!r}"
    session = service.registry.live()[0]
    page.wait_for_function("() => window.__agentTransport.stats.playedSeconds > 1.5", timeout=15_000)
    assert transport(page)["stats"]["codec"] == "pcm"
    assert wait_until(lambda: session.seat.counters.frames_in > 20, 10), "the server did not hear the microphone"
    page.locator("#ws-hang-up").click()
    assert wait_until(lambda: service.engine.seats_in_use() == 0, 15), "hanging up did not free the seat"
    page.context.close()
