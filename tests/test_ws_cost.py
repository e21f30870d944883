"""What a fastrtc-protocol WebSocket call (/websocket/offer) costs the server's event loop beyond its
audio: tasks per call, decodes per message, μ-law per frame (docs/benchmarks.md has the CPU figures)."""

from __future__ import annotations

import asyncio
import audioop
import base64
import threading
from collections import Counter

import numpy as np

from agent import SAMPLE_RATE
from agent.tools.wsclient import talk


def loop_tasks(live_server) -> Counter[str]:
    """The server's event-loop tasks right now, by their coroutine's name (read on that loop)."""
    loop = live_server.server.server.servers[0].get_loop()

    async def names() -> Counter[str]:
        return Counter(t.get_coro().__qualname__ for t in asyncio.all_tasks())

    return asyncio.run_coroutine_threadsafe(names(), loop).result(timeout=10)


def test_ws_call_cost_two_tasks_and_no_polling_task(live_server, telugu_speech):
    """fastrtc's WebSocketHandler ran 3 tasks per call beside its receive loop, two of them waking on
    timers (a 20 ms sleep after each frame, a clean-up poll every 0.1 s): each wake-up is loop time."""
    _, audio = telugu_speech
    before = loop_tasks(live_server)
    during: list[Counter[str]] = []

    async def call_and_look() -> None:
        call = asyncio.create_task(talk(live_server.ws_url, audio[:2 * SAMPLE_RATE], tail_seconds=0.3))
        await asyncio.sleep(1.0)  # the call is on, the agent's frames flowing
        during.append(await asyncio.to_thread(loop_tasks, live_server))
        result = await call
        assert result.errors == [] and result.received_seconds > 1.0

    asyncio.run(call_and_look())
    per_call = during[0] - before
    assert sum(per_call.values()) <= 2, f"tasks for one call: {dict(per_call)}"
    assert not any("cleanup" in name or "emit_loop" in name for name in per_call), per_call


def test_ws_call_cost_each_payload_decoded_once(live_server, telugu_speech, monkeypatch):
    """Each media message's base64 is decoded once on the server (it was twice: checked, then fastrtc's)."""
    _, audio = telugu_speech
    decodes = Counter()
    b64decode = base64.b64decode

    def counting(*args, **kwargs):
        decodes[threading.current_thread().name] += 1
        return b64decode(*args, **kwargs)

    monkeypatch.setattr(base64, "b64decode", counting)

    def decodes_for(seconds: float) -> int:
        decodes.clear()
        result = asyncio.run(talk(live_server.ws_url, audio[:int(seconds * SAMPLE_RATE)], tail_seconds=0.2))
        assert result.errors == []
        return decodes["uvicorn"]  # the server's loop thread (the handshake's key is one more)

    # a call 1 s longer sends 50 more media messages (20 ms each): 50 more decodes, not 100
    assert decodes_for(1.5) - decodes_for(0.5) == 50


def test_ulaw_cost_encoding_is_one_table_lookup_bit_exact_with_audioop():
    """A frame's μ-law is one lookup in a 64 Ki table (fastrtc converted each frame to float and back)."""
    from agent.audio.stream import ULAW_ENCODE_TABLE, ulaw_encode

    every = np.arange(1 << 16, dtype=np.uint16)  # the table's index: a sample's 16 bits, unsigned
    assert ULAW_ENCODE_TABLE.dtype == np.uint8 and ULAW_ENCODE_TABLE.size == 1 << 16
    assert ULAW_ENCODE_TABLE.tobytes() == audioop.lin2ulaw(every.view(np.int16).tobytes(), 2)
    frame = (np.sin(np.arange(1920) / 7) * 20000).astype(np.int16).reshape(1, -1)  # as the handler emits it
    assert ulaw_encode(frame) == audioop.lin2ulaw(frame.tobytes(), 2)
