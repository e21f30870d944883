import asyncio

import pytest

from agent.tools.wsclient import talk


@pytest.mark.slow
def test_websocket_call_roundtrip(live_server, telugu_speech):
    _, audio = telugu_speech
    result = asyncio.run(talk(live_server.ws_url, audio, tail_seconds=1.0))
    assert result.errors == []
    # 24 kHz audio came back for (nearly) every 80 ms frame sent
    assert result.received_seconds >= 0.9 * result.sent_seconds
