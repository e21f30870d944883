"""Callers behind proxies: the client's address from X-Forwarded-For / Forwarded, believed only from a
trusted proxy (agent.ops.forwarded), so the per-client call cap holds per caller and a forged header
from anyone else lifts nothing."""

from __future__ import annotations

import asyncio

import pytest
import websockets

from agent import SAMPLE_RATE
from agent.config import ServerConfig
from agent.ops.forwarded import TrustedProxies, client_address, parse_address
from agent.tools.wsclient import talk
from call_helpers import refused_status
from conftest import live_server_fixture

PROXIES = TrustedProxies.parse("10.0.0.0/8, 127.0.0.1, ::1, fd00::/8")


def test_forwarded_rule_takes_the_right_most_untrusted_address():
    xff = {"x-forwarded-for": "198.51.100.9, 203.0.113.7, 10.1.2.3"}  # forged, client, an inner proxy
    assert client_address("127.0.0.1", xff, PROXIES) == "203.0.113.7"
    assert client_address("127.0.0.1", {"x-forwarded-for": "10.0.0.5, 10.0.0.6"}, PROXIES) == "10.0.0.5"  # all trusted
    assert client_address("127.0.0.1", {}, PROXIES) == "127.0.0.1"  # a trusted peer without headers


def test_forwarded_headers_from_an_untrusted_peer_change_nothing():
    headers = {"x-forwarded-for": "203.0.113.7", "forwarded": "for=198.51.100.2"}
    assert client_address("192.0.2.1", headers, PROXIES) == "192.0.2.1"
    assert client_address("127.0.0.1", headers, TrustedProxies.parse("none")) == "127.0.0.1"
    assert client_address(None, headers, PROXIES) is None


def test_forwarded_header_rfc7239_and_ipv6():
    assert client_address("::1", {"forwarded": 'for="[2001:db8::1]:4711"'}, PROXIES) == "2001:db8::1"
    assert client_address("127.0.0.1", {"forwarded": "for=192.0.2.60;proto=http;by=203.0.113.43, "
                                                     "For=10.9.9.9"}, PROXIES) == "192.0.2.60"
    assert client_address("::ffff:127.0.0.1", {"x-forwarded-for": "2001:DB8::A"}, PROXIES) == "2001:db8::a"
    assert client_address("127.0.0.1", {"x-forwarded-for": "[2001:db8::2]:80, fd00::1"}, PROXIES) == "2001:db8::2"
    assert parse_address("203.0.113.7:8080") == parse_address("::ffff:203.0.113.7") == parse_address("203.0.113.7")


def test_forwarded_malformed_entries_stop_at_the_trusted_hop():
    for bad in ("unknown", "_hidden", "not an ip", "", "1.2.3.4:port", "[2001:db8::1", "[::1]x", "999.1.1.1"):
        assert client_address("127.0.0.1", {"x-forwarded-for": bad}, PROXIES) == "127.0.0.1", bad
        assert client_address("127.0.0.1", {"x-forwarded-for": f"203.0.113.7, {bad}"}, PROXIES) == "127.0.0.1", bad
    assert client_address("127.0.0.1", {"x-forwarded-for": "unknown, 10.0.0.7"}, PROXIES) == "10.0.0.7"
    assert client_address("127.0.0.1", {"forwarded": "proto=https"}, PROXIES) == "127.0.0.1"  # no for=
    with pytest.raises(ValueError, match="not an address"):
        TrustedProxies.parse("10.0.0.0/8, nginx")
    assert not TrustedProxies.parse("") and not TrustedProxies.parse("none")


behind_proxy = live_server_fixture(max_sessions=3, server_config=ServerConfig(
    max_calls_per_client=1, trusted_proxies="127.0.0.1", resume_seconds=0))
untrusted = live_server_fixture(max_sessions=3, server_config=ServerConfig(
    max_calls_per_client=1, trusted_proxies="none", resume_seconds=0))


async def _status(url: str, headers: dict) -> int:
    try:
        async with websockets.connect(url, additional_headers=headers):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


def test_forwarded_callers_behind_a_trusted_proxy_each_get_their_cap(behind_proxy, telugu_speech):
    _, audio = telugu_speech
    # as nginx sends them (X-Forwarded-For), and as an RFC 7239 proxy does (Forwarded)
    callers = [{"X-Forwarded-For": "198.51.100.9, 203.0.113.7"}, {"Forwarded": "for=198.51.100.2"},
               {"Forwarded": 'for="[2001:db8::1]:4711"'}]
    api_chat = behind_proxy.ws_url.replace("/websocket/offer", "/api/chat")

    async def go():
        calls = [asyncio.create_task(talk(behind_proxy.ws_url, audio[:2 * SAMPLE_RATE], headers=h, tail_seconds=0.3))
                 for h in callers]
        await asyncio.sleep(0.8)
        again = [await _status(behind_proxy.ws_url, {"X-Forwarded-For": "203.0.113.7"}),
                 await _status(api_chat, {"Forwarded": 'for="[2001:db8::1]"'})]
        return await asyncio.gather(*calls), again

    results, again = asyncio.run(go())
    assert again == [429, 429]  # one caller beyond its cap, on either endpoint
    for result in results:
        assert result.errors == [] and result.received_seconds >= 0.9 * result.sent_seconds


def test_forwarded_header_forged_by_an_untrusted_peer_lifts_no_cap(untrusted, telugu_speech):
    _, audio = telugu_speech

    async def go():
        first = asyncio.create_task(talk(untrusted.ws_url, audio[:2 * SAMPLE_RATE], tail_seconds=0.3,
                                         headers={"X-Forwarded-For": "203.0.113.7"}))
        await asyncio.sleep(0.8)
        second = await _status(untrusted.ws_url, {"X-Forwarded-For": "198.51.100.9"})
        third = await _status(untrusted.ws_url, {"Forwarded": "for=198.51.100.10"})
        return await first, second, third

    first, second, third = asyncio.run(go())
    assert (second, third) == (429, 429)
    assert first.errors == [] and first.received_seconds >= 0.9 * first.sent_seconds
    assert refused_status(untrusted.ws_url, {"X-Forwarded-For": "192.0.2.1"}) == 101  # the cap frees again
