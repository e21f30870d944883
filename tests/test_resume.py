"""Resuming a dropped call: a connection that breaks without a hang-up keeps its call (the seat
frozen, its LM context kept) for --resume-seconds; the caller comes back with the call's resume
token and goes on in the same conversation; after the window the seat is freed.

Drops are real: the client talks through a TCP proxy on 127.0.0.1 that cuts every connection at
once (both sides reset, no close handshake), as a network failure does."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import websockets

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.config import ServerConfig
from agent.tools.wsclient import encode_media, talk, talk_with_reconnect
from call_helpers import opus_pages
from conftest import live_server_fixture

RESUME_S = 4.0


server = live_server_fixture(max_sessions=3, server_config=ServerConfig(resume_seconds=RESUME_S))


class CuttableProxy:
    """A TCP proxy to the server whose `cut()` breaks every connection through it at once."""

    def __init__(self, port: int):
        self.upstream_port = port
        self._transports: list[asyncio.Transport] = []
        self.cuts = 0

    async def start(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._transports += [client_w.transport, server_w.transport]

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.transport.abort()

        await asyncio.gather(pump(client_r, server_w), pump(server_r, client_w))

    def cut(self) -> None:
        self.cuts += 1
        for transport in self._transports:
            transport.abort()
        self._transports.clear()

    async def close(self) -> None:
        self.cut()
        self._server.close()


def zero_frames(audio: np.ndarray) -> list[int]:
    """Indices of the 80 ms frames that are exact silence: what a seat gives before Moshi's acoustic
    delay has passed, i.e. at the start of a call or after its LM was reset."""
    frames = audio[:audio.size // FRAME_SIZE * FRAME_SIZE].reshape(-1, FRAME_SIZE)
    return [int(i) for i in np.flatnonzero(~frames.any(axis=1))]


@pytest.mark.slow
def test_resume_and_reconnect_after_a_dropped_websocket_call(server, telugu_speech):
    """agent.tools.wsclient's reconnect resumes the same call: same seat, LM never reset, no new call."""
    _, audio = telugu_speech
    engine, registry = server.service.engine, server.service.registry
    started = engine.stats.calls_started

    async def go():
        proxy = await CuttableProxy(server.port).start()
        try:
            call = asyncio.create_task(talk_with_reconnect(f"ws://127.0.0.1:{proxy.port}/websocket/offer",
                                                           audio[:4 * SAMPLE_RATE], tail_seconds=0.5))
            await asyncio.sleep(1.8)
            [session] = registry.live()
            seat = session.seat
            proxy.cut()
            await asyncio.sleep(0.3)
            held = (engine.seats_in_use(), session.dropped, seat.closed)
            return await call, session, seat, held
        finally:
            await proxy.close()

    result, session, seat, held = asyncio.run(go())
    assert held == (1, True, False), "the dropped call's seat was not held"
    assert result.reconnects == 1 and not result.errors, result.messages
    calls = [m for m in result.messages if m.get("type") == "call"]
    assert [m["resumed"] for m in calls] == [False, True] and calls[0]["call_id"] == calls[1]["call_id"]
    assert engine.stats.calls_started - started == 1, "the reconnection opened a new call"
    assert session.seat is seat and seat.counters.frames_in >= int(4.3 / 0.08) - 3  # all the audio reached one seat
    # the LM went on from its context: silence only at the very start, never again after the resume
    zeros = zero_frames(result.audio)
    assert zeros == list(range(len(zeros))) and len(zeros) < 6, zeros
    assert result.sent_seconds >= 4.4 and result.received_seconds >= result.sent_seconds - 1.2
    deadline = time.monotonic() + 5
    while engine.seats_in_use() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.seats_in_use() == 0, "the call's seat was not freed after it hung up"


async def _drop_after(url: str, audio: np.ndarray, seconds: float) -> dict:
    """Talk for `seconds`, then lose the network (no stop, no close); the server's "call" message."""
    ws = await websockets.connect(url)
    await ws.send(json.dumps({"event": "start", "websocket_id": uuid.uuid4().hex}))
    call: dict = {}
    t0 = time.monotonic()
    for i in range(0, int(seconds * SAMPLE_RATE), 480):
        await ws.send(json.dumps(encode_media(audio[i:i + 480])))
        while not call:
            try:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 0.001))
            except TimeoutError:
                break
            if msg.get("type") == "call":
                call = msg
        await asyncio.sleep(max(0.0, t0 + (i + 480) / SAMPLE_RATE - time.monotonic()))
    ws.transport.abort()
    return call


@pytest.mark.slow
def test_resume_window_holds_the_seat_frozen_then_frees_it(server, telugu_speech):
    _, audio = telugu_speech
    engine, registry = server.service.engine, server.service.registry

    async def go():
        call = await _drop_after(server.ws_url, audio, 1.0)
        await asyncio.sleep(0.3)
        [session] = [s for s in registry.live() if s.call_id == call["call_id"]]
        frames_out = session.seat.counters.frames_out
        # another call keeps the engine ticking meanwhile: the held seat must not be stepped
        other = await talk(server.ws_url, audio[:SAMPLE_RATE], tail_seconds=0.2)
        return call, session, frames_out, other

    call, session, frames_out, other = asyncio.run(go())
    assert call.get("resume_token") and not other.errors and other.received_seconds > 0.5
    assert not session.closed and session.dropped
    assert session.seat.counters.frames_out == frames_out, "a held seat was stepped"
    deadline = time.monotonic() + RESUME_S + 5
    while not session.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session.closed and "not resumed" in session.seat.closed_reason
    assert time.monotonic() - session.dropped_at >= RESUME_S - 0.1  # not before the window ended
    assert engine.seats_in_use() == 0

    # the token of a call that is gone starts a new call, and says so
    late = asyncio.run(talk(server.ws_url + "?resume=" + call["resume_token"], audio[:SAMPLE_RATE // 2],
                            tail_seconds=0.2))
    assert any("can no longer be resumed" in m.get("message", "") for m in late.messages), late.messages
    assert [m["resumed"] for m in late.messages if m.get("type") == "call"] == [False]
    assert late.call_id != call["call_id"] and late.received_seconds > 0.2


def test_resume_token_is_needed_to_take_a_held_call(server, telugu_speech):
    """A wrong token does not reach the held call; it starts a call of its own."""
    _, audio = telugu_speech
    call = asyncio.run(_drop_after(server.ws_url, audio, 0.6))
    other = asyncio.run(talk(server.ws_url + "?resume=not-the-token", audio[:SAMPLE_RATE // 2], tail_seconds=0.2))
    assert other.call_id != call["call_id"]
    held = server.service.registry.get(call["call_id"])
    assert held is not None and held.dropped and not held.closed


@pytest.mark.slow
def test_resume_an_api_chat_call(server, telugu_speech):
    """Kyutai's protocol: `?resumable=1` gets the token (0x04 metadata), a drop holds the call,
    `?resume=` continues it."""
    _, audio = telugu_speech
    pages = opus_pages(audio[:2 * SAMPLE_RATE])
    url = f"ws://127.0.0.1:{server.port}/api/chat"

    async def go():
        proxy = await CuttableProxy(server.port).start()
        try:
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(f"ws://127.0.0.1:{proxy.port}/api/chat?resumable=1")
                assert await ws.receive_bytes(timeout=10) == b"\x00"
                meta = json.loads((await ws.receive_bytes(timeout=10))[1:])
                for page in pages[:10]:
                    await ws.send_bytes(b"\x01" + page)
                    await asyncio.sleep(0.08)
                proxy.cut()
                await asyncio.sleep(0.5)
                held = server.service.registry.get(meta["call_id"])
                assert held is not None and held.dropped
                async with http.ws_connect(f"{url}?resume={meta['resume_token']}") as again:
                    assert await again.receive_bytes(timeout=10) == b"\x00"
                    resumed = json.loads((await again.receive_bytes(timeout=10))[1:])
                    audio_back = 0
                    for page in pages[10:]:
                        await again.send_bytes(b"\x01" + page)
                        await asyncio.sleep(0.08)
                        while True:
                            try:
                                msg = await again.receive(timeout=0.001)
                            except TimeoutError:
                                break
                            audio_back += msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01"
                return meta, resumed, held, audio_back
        finally:
            await proxy.close()

    meta, resumed, held, audio_back = asyncio.run(go())
    assert resumed == {"type": "call", "call_id": meta["call_id"], "resume_token": meta["resume_token"],
                       "resumed": True}
    assert not held.dropped and audio_back > 5
    deadline = time.monotonic() + 5
    while not held.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.closed, "the resumed /api/chat call was not ended when its client closed"


def thread_cpu_seconds(thread: threading.Thread) -> float:
    """User + system CPU time of one thread of this process (Linux /proc)."""
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_resume_held_seat_with_queued_input_neither_steps_nor_spins():
    """A call dropped with a frame still queued: the engine's loop must sleep, not poll that seat."""
    from agent.config import EngineConfig
    from agent.engine import FrameEngine
    from conftest import tiny_model

    engine = FrameEngine(tiny_model(), EngineConfig(max_sessions=2))
    seat = engine.acquire("dropped")
    seat.hold(True)
    seat.push(np.zeros(FRAME_SIZE, np.float32))
    before = {t.native_id for t in threading.enumerate()}
    engine.start()
    # the engine loop's own CPU time (other tests' servers may still run threads in this process)
    loop_thread = next(t for t in threading.enumerate() if t.native_id not in before and t.name == "frame-engine")
    try:
        time.sleep(0.3)
        cpu0, wall0 = thread_cpu_seconds(loop_thread), time.monotonic()
        time.sleep(2.0)
        share = (thread_cpu_seconds(loop_thread) - cpu0) / (time.monotonic() - wall0)
        assert seat.counters.frames_out == 0 and seat.input_backlog == 1, "a held seat was stepped"
        # polling that seat every millisecond cost 3.5 % of a core here; sleeping costs ~0.05 %
        assert share < 0.01, f"the engine loop took {100 * share:.1f} % of a core while a held seat had input"
        seat.hold(False)
        deadline = time.monotonic() + 5
        while seat.counters.frames_out == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seat.counters.frames_out == 1, "the resumed seat's queued frame was not stepped"
    finally:
        engine.stop()
