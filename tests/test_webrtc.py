"""A real WebRTC client (aiortc) calls the served app through fastrtc's /webrtc/offer endpoint."""

from __future__ import annotations

import asyncio
import time

import pytest

from call_helpers import webrtc_call


@pytest.mark.slow
def test_webrtc_client_talks_and_hears_back(live_server, telugu_speech):
    _, audio = telugu_speech
    received, sent, messages = asyncio.run(webrtc_call(live_server.url, audio, seconds=6.0))
    # aiortc's jitter buffer and ICE set-up eat the first few hundred ms; the rest flows at real time
    assert sent > 5.0
    assert received >= sent - 1.5, (received, sent)
    assert not [m for m in messages if '"error"' in m], messages
    engine = live_server.service.engine
    deadline = time.monotonic() + 10
    while engine.seats_in_use() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.seats_in_use() == 0, "the WebRTC call's seat was not freed after hang-up"
