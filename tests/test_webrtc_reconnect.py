"""Dropped WebRTC calls: the server holds a call whose peer connection fails (and ends one that hangs
up), and the page reconnects by itself, resuming the same call.

Drops are real: the WebRTC media runs through a UDP relay on 127.0.0.1 (the server's answer names the
relay as the server's only ICE candidate), and `cut()` makes the relay drop every packet both ways (or
only the client's), as a failing network does. Neither side closes anything: each finds out the way it
would in the field, by its ICE consent checks going unanswered (RFC 7675)."""

from __future__ import annotations

import asyncio
import json
import re
import selectors
import socket
import threading
import time
import uuid
from contextlib import contextmanager

import aiohttp
import aioice.ice
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from agent.calls.session import Session
from agent.config import ServerConfig
from browser_helpers import AUDIO_STATE_JS, KEEP_PEERS_JS, launch_chromium
from call_helpers import speech_track
from conftest import LiveServer, live_server_fixture, wait_until

RESUME_S = 10.0
# Audio bytes the newest peer connection received from the server
BYTES_IN_JS = """async () => {
  const peers = window.__peers;
  let bytes = 0;
  (await peers[peers.length - 1].getStats()).forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "audio") bytes += r.bytesReceived;
  });
  return [peers.length, bytes];
}"""
CANDIDATE = re.compile(r"^a=candidate:(\S+) (\d) udp (\d+) (\d+\.\d+\.\d+\.\d+) (\d+) typ host", re.M)


server = live_server_fixture(max_sessions=3, server_config=ServerConfig(resume_seconds=RESUME_S))


class CuttableUdpRelay:
    """Carries one WebRTC connection's UDP between a client and the server; `cut()` drops every
    packet from then on, both ways (or only the client's)."""

    def __init__(self, server_addr: tuple[str, int]):
        self.server_addr = server_addr
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the client sends here
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the server sees this address
        self.back.bind(("0.0.0.0", 0))
        self.port = self.front.getsockname()[1]
        self.client_addr: tuple[str, int] | None = None
        self.carried = 0  # packets carried (either way)
        self._cut_to_server = threading.Event()
        self._cut_to_client = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="udp-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.front, selectors.EVENT_READ)
        selector.register(self.back, selectors.EVENT_READ)
        while not self._closed.is_set():
            for key, _ in selector.select(0.1):
                data, addr = key.fileobj.recvfrom(65536)
                if key.fileobj is self.front and not self._cut_to_server.is_set():
                    self.client_addr = addr
                    self.back.sendto(data, self.server_addr)
                elif key.fileobj is self.back and self.client_addr is not None and not self._cut_to_client.is_set():
                    self.front.sendto(data, self.client_addr)
                else:
                    continue
                self.carried += 1
        selector.close()

    def cut(self, both_ways: bool = True) -> None:
        self._cut_to_server.set()
        if both_ways:
            self._cut_to_client.set()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self.front.close()
        self.back.close()


def through_relay(sdp: str) -> tuple[str, CuttableUdpRelay]:
    """The answer with its first host UDP IPv4 candidate moved onto a new relay, and no other candidate."""
    first = CANDIDATE.search(sdp)
    assert first is not None, sdp
    relay = CuttableUdpRelay((first.group(4), int(first.group(5))))
    lines = []
    for line in sdp.split("\r\n"):
        found = CANDIDATE.match(line)
        if found and found.group(4, 5) == first.group(4, 5):
            line = line.replace(f" {first.group(4)} {first.group(5)} ", f" 127.0.0.1 {relay.port} ")
        elif line.startswith("a=candidate:"):
            continue
        lines.append(line)
    return "\r\n".join(lines), relay


def without_candidates(sdp: str) -> str:
    """An offer without its ICE candidates: the server learns the caller's address from the relay's
    packets only, so the relay is the one path (with them ICE may also find the direct one, and a
    cut relay would miss the media). Nor does it say end-of-candidates: aioice would then gather
    none of its own for a call with no remote candidate."""
    return "\r\n".join(line for line in sdp.split("\r\n")
                       if not line.startswith(("a=candidate:", "a=end-of-candidates")))


async def relayed_call(base_url: str, audio, page_component: int) -> tuple[RTCPeerConnection, CuttableUdpRelay]:
    """An aiortc call made the way the page makes it, its media through a relay."""
    pc = RTCPeerConnection()
    pc.createDataChannel("text")  # fastrtc expects a data channel before the offer
    pc.addTrack(speech_track(audio))
    await pc.setLocalDescription(await pc.createOffer())
    webrtc_id = uuid.uuid4().hex
    offer = {"sdp": without_candidates(pc.localDescription.sdp), "type": pc.localDescription.type,
             "webrtc_id": webrtc_id}
    body = {"data": offer, "component_id": page_component, "fn_name": "offer", "session_hash": webrtc_id}
    async with aiohttp.ClientSession() as http, http.post(f"{base_url}/gradio_api/component_server",
                                                          json=body) as resp:
        answer = await resp.json()
    sdp, relay = through_relay(answer["sdp"])
    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=answer["type"]))
    return pc, relay


class RelayedPageCalls:
    """Sends the page's calls through relays. The page's offers and ICE candidates are Gradio server
    function calls: a relayed call's answer names only its relay, and the page's own candidates are
    kept from the server (which learns the page's address from the relay's packets), so the relay is
    the one path between the two. The first call is relayed; later ones go straight to the server, or
    are refused while `refusing` (the server cannot be reached). Routes run only inside Playwright
    calls: wait with `wait`."""

    OFFERS = re.compile(r"/gradio_api/component_server/?$")

    def __init__(self, page):
        self.page = page
        self.relays: list[CuttableUdpRelay] = []
        self.refusing = False
        self._relayed: list[str] = []
        page.route(self.OFFERS, self._route)

    def _route(self, route) -> None:
        body = route.request.post_data_json or {}
        data = body.get("data") if isinstance(body.get("data"), dict) else {}
        if data.get("sdp") and self.refusing:
            route.fulfill(json={"status": "failed", "meta": {"error": "connection_closed"}})
        elif data.get("sdp") and not self._relayed:
            self._relayed.append(data.get("webrtc_id"))
            data["sdp"] = without_candidates(data["sdp"])
            response = route.fetch(post_data=json.dumps(body))
            answer = response.json()
            answer["sdp"], relay = through_relay(answer["sdp"])
            self.relays.append(relay)
            route.fulfill(response=response, json=answer)
        elif data.get("type") == "ice-candidate" and data.get("webrtc_id") in self._relayed:
            route.fulfill(json={"status": "success"})
        else:
            route.continue_()

    def wait(self, condition, timeout: float) -> bool:
        """wait_until, inside Playwright calls."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            self.page.wait_for_timeout(100)
        return True

    def first_call(self, service) -> Session:
        """Press Record; the call runs through the relay, with its readouts (and resume token) on the page."""
        self.page.get_by_text("Click to Access Microphone").click(timeout=30_000)
        self.page.locator("#call button", has_text="Record").first.click(timeout=30_000)
        assert self.wait(lambda: service.registry.live(), 30), "the page's call never reached the engine"
        session = service.registry.live()[0]
        assert self.wait(lambda: session.seat.counters.frames_out > 20, 30), session.seat.counters
        self.page.get_by_text("In call").wait_for(timeout=15_000)
        assert self.relays and self.relays[0].carried > 0, "the call's media did not go through the relay"
        return session

    def stop(self) -> None:
        """Later calls go straight to the server, without waiting on this test's routes."""
        self.page.unroute(self.OFFERS, self._route)

    def close(self) -> None:
        for relay in self.relays:
            relay.close()


def page_component(live: LiveServer) -> int:
    return next(b for b in live.demo.blocks.values() if getattr(b, "elem_id", None) == "call")._id


def quick_consent_checks(monkeypatch) -> None:
    """The server's ICE consent checks every 0.3 s, given up after 3 misses (aioice: 5 s and 6), so a cut
    is noticed by the server within about a second."""
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.3)
    monkeypatch.setattr(aioice.ice, "CONSENT_FAILURES", 3)


@contextmanager
def page_with_relayed_calls(live: LiveServer, mic_wav, keep_peers: bool = False):
    """The page open in headless Chromium (fake microphone), its calls through relays: (page, calls)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p, mic_wav)
        page = browser.new_context(permissions=["microphone"]).new_page()
        if keep_peers:
            page.add_init_script(KEEP_PEERS_JS)
        calls = RelayedPageCalls(page)
        try:
            page.goto(live.url + "/", wait_until="load")
            yield page, calls
        finally:
            browser.close()
            calls.close()


def wait_for_status(page, pattern: str, timeout_ms: float) -> None:
    """Until the page's reconnection notice (#reconnect-status) matches the JS regular expression."""
    page.wait_for_function(f"() => /{pattern}/.test(document.querySelector('#reconnect-status').innerText)",
                           timeout=timeout_ms)


@pytest.mark.slow
def test_reconnect_window_held_for_a_failed_webrtc_connection_not_for_a_hang_up(server, telugu_speech, monkeypatch):
    """The server's side of a page call: a peer connection that fails (its network cut: the server's
    ICE consent checks go unanswered) holds the call, its seat frozen, for the resume window and then
    frees it; one that hangs up (`pc.close()`: DTLS closes) frees its seat at once, nothing held.
    aioice checks consent every 5 s and gives up after 6 misses (30 s); here every 0.3 s, 3 misses."""
    quick_consent_checks(monkeypatch)
    _, audio = telugu_speech
    service = server.service

    async def call_then(end: str) -> tuple:
        pc, relay = await relayed_call(server.url, audio, page_component(server))
        try:
            # the page's inputs never come from this client: the call opens after INPUTS_WAIT_S
            deadline = time.monotonic() + 30
            while not service.registry.live() or service.registry.live()[0].seat.counters.frames_out < 10:
                assert time.monotonic() < deadline, "the call never ran"
                await asyncio.sleep(0.1)
            session = service.registry.live()[0]
            assert relay.carried > 0
            if end == "cut":
                relay.cut()
            else:
                await pc.close()
            ended_at = time.monotonic()
            while not (session.dropped or session.closed):
                assert time.monotonic() - ended_at < 15, "the server never saw the connection end"
                await asyncio.sleep(0.05)
            noticed = (session.dropped, session.closed, session.seat.closed_reason)
            return session, noticed, ended_at
        finally:
            await pc.close()
            relay.close()

    session, noticed, cut_at = asyncio.run(call_then("cut"))
    assert noticed[:2] == (True, False), noticed  # held, not ended
    assert service.seats_in_use() == 1 and service.registry.live() == [session]
    frames = session.seat.counters.frames_out
    time.sleep(1.0)
    assert session.seat.counters.frames_out == frames, "a held seat is not stepped"
    wait_until(lambda: session.closed, RESUME_S + 10, "the held seat was not freed after the window")
    assert time.monotonic() - cut_at >= RESUME_S - 0.5
    assert "not resumed" in session.seat.closed_reason
    wait_until(lambda: service.seats_in_use() == 0, 5)

    session, noticed, _ = asyncio.run(call_then("hang up"))
    assert noticed == (False, True, "client left"), noticed
    wait_until(lambda: service.seats_in_use() == 0, 5, "a hang-up did not free its seat")


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["both ways", "page to server"])
def test_page_reconnects_by_itself_and_resumes_the_same_call(server, mic_wav, cut, monkeypatch):
    """The page in headless Chromium: its call's network is cut (the relay drops packets; neither side
    closes anything). The page says it is reconnecting, calls again with the call's resume token, and
    the server gives it back the same call: the same session on the same seat, no second call opened,
    audio flowing both ways again. Then the caller presses Stop: the call ends, nothing reconnects.
    - "both ways": Chromium's ICE notices within seconds; the server is left to aioice's own consent
      timing (30 s), so the page comes back first and its new connection takes the call over.
    - "page to server": only the page's packets are lost. The server's consent checks (every 0.3 s
      here) go unanswered and it holds the call while Chromium still hears it; once the server has
      let go of the connection Chromium hears nothing either, and the page resumes the held call."""
    if cut == "page to server":
        quick_consent_checks(monkeypatch)

    service = server.service
    with page_with_relayed_calls(server, mic_wav, keep_peers=True) as (page, calls):
        session = calls.first_call(service)
        calls.stop()
        started = service.metric_values()["calls_started"]
        seat = session.seat

        calls.relays[0].cut(both_ways=cut == "both ways")
        if cut == "page to server":
            assert wait_until(lambda: session.dropped, 15), "the server did not hold the call"
            assert service.seats_in_use() == 1 and not session.closed
            page.get_by_text("the call waits").wait_for(timeout=10_000)  # the readouts say so too
        status = page.locator("#reconnect-status")
        wait_for_status(page, "reconnecting", 30_000)
        assert "Connection lost" in status.inner_text()
        wait_for_status(page, "Reconnected: the call goes on", 45_000)

        # the same call: the same session on the same seat, resumed once, no other call opened
        assert service.registry.live() == [session] and session.seat is seat and not session.closed
        assert session.connection == 1 and not session.dropped
        assert service.metric_values()["calls_started"] == started
        # ... and it goes on over the new connection: the page's microphone reaches the call, the agent's
        # audio reaches the page and plays
        frames_in = session.seat.counters.frames_in
        assert wait_until(lambda: session.seat.counters.frames_in > frames_in + 20, 30), session.seat.counters
        peers, received = page.evaluate(BYTES_IN_JS)
        assert peers >= 2  # the first call, then the reconnection(s)
        assert wait_until(lambda: page.evaluate(BYTES_IN_JS)[1] > received + 10_000, 15), received
        assert wait_until(lambda: any(a["live"] and not a["paused"] for a in page.evaluate(AUDIO_STATE_JS)), 15)
        page.get_by_text("In call").wait_for(timeout=15_000)  # the readouts follow the new connection

        # the caller hangs up: the call ends, nothing reconnects
        page.locator("#call button", has_text="Stop").first.click()
        assert wait_until(lambda: session.closed, 15), "hanging up did not end the call"
        assert session.seat.closed_reason == "client left" and not session.dropped
        page.wait_for_timeout(4000)  # longer than the page's first reconnection backoff and its connecting
        assert not service.registry.live(), "the page called again after Stop"
        assert service.metric_values()["calls_started"] == started
        assert "reconnecting" not in status.inner_text()


@pytest.mark.slow
def test_page_reconnect_gives_up_after_the_window_then_a_stale_token_starts_a_new_call(server, mic_wav,
                                                                                         monkeypatch):
    """The call's network is cut both ways and the server cannot be reached for longer than the resume
    window (its answers to the page's new offers say the connection failed). The server holds the call
    (its consent checks every 0.3 s here), then frees it; the page tries again with backoff, then says
    the call is lost. When the caller presses Record later, the page still has the old call's token: the
    server says that call can no longer be resumed and starts a new one."""
    quick_consent_checks(monkeypatch)
    service = server.service
    with page_with_relayed_calls(server, mic_wav) as (page, calls):
        session = calls.first_call(service)
        calls.refusing = True
        calls.relays[0].cut()
        cut_at = time.monotonic()
        assert calls.wait(lambda: session.dropped, 15), "the server did not hold the call"
        wait_for_status(page, "reconnecting", 30_000)
        wait_for_status(page, "Call lost", 1000 * (RESUME_S + 30))
        assert time.monotonic() - cut_at > RESUME_S, "the page gave up before the resume window had passed"
        assert calls.wait(lambda: session.closed, 15), "the server did not free the held call"
        assert "not resumed" in session.seat.closed_reason
        assert not service.registry.live(), [s.call_id for s in service.registry.live()]  # no second call

        calls.stop()  # the server can be reached again
        page.locator("#call button", has_text="Record").first.click(timeout=30_000)
        assert wait_until(lambda: service.registry.live(), 30), "the new call never reached the engine"
        assert service.registry.live()[0] is not session
        page.get_by_text("can no longer be resumed").first.wait_for(timeout=15_000)
        page.locator("#call button", has_text="Stop").first.click(timeout=30_000)
        assert wait_until(lambda: not service.registry.live(), 15)
