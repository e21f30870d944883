"""Shared-link safety on a live server: credentials on the page and the API, a per-client call cap."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import pytest
import requests
import websockets

from agent import SAMPLE_RATE
from agent.config import ServerConfig
from agent.ops.access import Credentials, rtc_configuration_from_env
from agent.tools.wsclient import talk
from call_helpers import BASIC, refused_status
from conftest import live_server_fixture, wait_until

guarded = live_server_fixture(max_sessions=3, server_config=ServerConfig(auth="ana:s3cret", max_calls_per_client=1))


def test_credentials_parse_and_check():
    creds = Credentials.parse("ana:s3cret")
    assert creds.check_header(BASIC["Authorization"])
    assert not creds.check_header("Basic " + base64.b64encode(b"ana:wrong").decode())
    assert not creds.check_header("Bearer s3cret") and not creds.check_header(None)
    assert not creds.check_header("Basic !!!notbase64")
    assert Credentials.parse(None) is None
    with pytest.raises(ValueError, match="user:password"):
        Credentials.parse("no-colon")


def test_api_endpoints_need_credentials(guarded, telugu_speech):
    assert refused_status(guarded.ws_url) == 401
    assert refused_status(f"ws://127.0.0.1:{guarded.port}/api/chat") == 401
    assert requests.post(guarded.url + "/webrtc/offer", json={}, timeout=5).status_code == 401
    _, audio = telugu_speech
    result = asyncio.run(talk(guarded.ws_url, audio[:SAMPLE_RATE], headers=BASIC, tail_seconds=0.3))
    assert result.errors == [] and result.received_seconds > 0.5
    # health and readiness stay open for probes
    assert requests.get(guarded.url + "/healthz", timeout=5).status_code == 200


def test_page_needs_login(guarded):
    assert requests.get(guarded.url + "/config", timeout=5).status_code == 401
    bad = requests.post(guarded.url + "/login", data={"username": "ana", "password": "nope"}, timeout=5)
    assert bad.status_code >= 400
    session = requests.Session()
    assert session.post(guarded.url + "/login", data={"username": "ana", "password": "s3cret"}, timeout=5).ok
    assert session.get(guarded.url + "/config", timeout=5).status_code == 200


@pytest.mark.slow
def test_one_client_gets_at_most_its_cap(guarded, telugu_speech):
    _, audio = telugu_speech

    async def two_calls():
        first = asyncio.create_task(talk(guarded.ws_url, audio[:2 * SAMPLE_RATE], headers=BASIC, tail_seconds=0.3))
        await asyncio.sleep(0.5)
        try:
            await talk(guarded.ws_url, audio[:SAMPLE_RATE], headers=BASIC)
            second = 101
        except websockets.InvalidStatus as exc:
            second = exc.response.status_code
        return await first, second

    first, second = asyncio.run(two_calls())
    assert second == 429
    assert first.errors == [] and first.received_seconds >= first.sent_seconds - 0.5  # untouched


def test_turn_settings_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("TURN_URLS", raising=False)
    assert rtc_configuration_from_env() is None
    monkeypatch.setenv("TURN_URLS", "turn:turn.example.org:3478?transport=tcp, turns:turn.example.org:5349")
    monkeypatch.setenv("TURN_USERNAME", "agent")
    monkeypatch.setenv("TURN_CREDENTIAL", "pw")
    assert rtc_configuration_from_env() == {"iceServers": [{
        "urls": ["turn:turn.example.org:3478?transport=tcp", "turns:turn.example.org:5349"],
        "username": "agent", "credential": "pw"}]}


def test_turn_relay_policy_from_the_environment(monkeypatch):
    """TURN_POLICY=relay reaches the page's RTCPeerConnection as iceTransportPolicy; a wrong value, or
    relay without a relay, is a clear error at start-up rather than calls that never connect."""
    monkeypatch.setenv("TURN_URLS", "turn:turn.example.org:3478")
    monkeypatch.setenv("TURN_POLICY", "Relay")
    assert rtc_configuration_from_env()["iceTransportPolicy"] == "relay"
    monkeypatch.setenv("TURN_POLICY", "all")
    assert "iceTransportPolicy" not in rtc_configuration_from_env()
    monkeypatch.setenv("TURN_POLICY", "relay-only")
    with pytest.raises(ValueError, match="TURN_POLICY must be one of all, relay"):
        rtc_configuration_from_env()
    monkeypatch.setenv("TURN_POLICY", "relay")
    monkeypatch.delenv("TURN_URLS")
    with pytest.raises(ValueError, match="TURN_POLICY=relay needs a relay"):
        rtc_configuration_from_env()


def test_websocket_page_login_cookie_counts_only_from_the_page_own_site():
    """The page's login cookie lets in an /api/chat handshake whose Origin is the host it was sent to
    (directly or through a proxy's X-Forwarded-Host); another site's script (Gradio's cookie is
    SameSite=None) does not get in with it. No Origin: not a browser."""
    from agent.ops.access import same_site
    assert same_site({"origin": "http://127.0.0.1:7860", "host": "127.0.0.1:7860"})
    assert same_site({"origin": "https://pod-7860.proxy.runpod.net", "host": "127.0.0.1:7860",
                      "x-forwarded-host": "pod-7860.proxy.runpod.net"})
    assert same_site({"origin": "http://[::1]:8080", "host": "[::1]:7860"})  # cookies do not tell ports apart
    assert same_site({"host": "127.0.0.1:7860"})
    assert not same_site({"origin": "https://evil.example", "host": "agent.example"})
    assert not same_site({"origin": "null", "host": "agent.example"})
    assert not same_site({"origin": "http://[bad", "host": "agent.example"})


def test_websocket_page_login_cookie_lets_api_chat_in_from_its_own_site_only(guarded):
    """Gradio's login cookie opens /api/chat when the handshake's Origin is the server's own host; with
    another site's Origin (its script borrowing a visitor's cookie) or no cookie, a browser is told
    in the protocol (0x05, close 1008) and no call starts; without an Origin, no cookie: 401."""
    session = requests.Session()
    assert session.post(guarded.url + "/login", data={"username": "ana", "password": "s3cret"}, timeout=5).ok
    cookie = "; ".join(f"{c.name}={c.value}" for c in session.cookies)
    url = f"ws://127.0.0.1:{guarded.port}/api/chat?codec=pcm"

    async def first_message(headers: dict) -> tuple[bytes, int | None]:
        async with websockets.connect(url, additional_headers=headers) as ws:
            message = await asyncio.wait_for(ws.recv(), 10)
            with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
                await asyncio.wait_for(ws.recv(), 2)
            return message, ws.close_code

    own, _ = asyncio.run(first_message({"Cookie": cookie, "Origin": guarded.url}))
    assert own == b"\x00", own  # Kyutai's handshake: the call started
    borrowed, code = asyncio.run(first_message({"Cookie": cookie, "Origin": "https://evil.example"}))
    assert borrowed.startswith(b"\x05Not logged in") and code == 1008, (borrowed, code)
    none, code = asyncio.run(first_message({"Origin": guarded.url}))
    assert none.startswith(b"\x05Not logged in") and code == 1008, (none, code)
    assert refused_status(url, {"Cookie": "access-token-unsecure-x=forged"}) == 401
    # the module's other tests count calls from this address: the first call is over and counted out
    assert wait_until(lambda: guarded.service.hub.cap.connections("127.0.0.1") == 0, 10)
