"""Kyutai's /api/chat protocol, spoken by the `moshi` package's own client code.

`moshi.client.Connection` opens sound-card streams in its constructor, which a headless machine does
not have; everything else (its Opus writer/reader, `_ws_send`, `_recv_loop`, `_decode`) is used as is."""

from __future__ import annotations

import asyncio
import queue
import time

import aiohttp
import numpy as np
import pytest
import sphn
from moshi.client import Connection
from moshi.client_utils import RawPrinter

from agent import FRAME_SIZE, SAMPLE_RATE


class CollectingPrinter(RawPrinter):
    def __init__(self):
        super().__init__()
        self.tokens: list[str] = []
        self.logs: list[tuple[str, str]] = []

    def print_token(self, token: str, color=None):
        self.tokens.append(token)

    def log(self, level: str, msg: str):
        self.logs.append((level, msg))

    def print_pending(self):
        pass


def headless_connection(ws, printer) -> Connection:
    """moshi's client Connection without its sounddevice streams."""
    conn = Connection.__new__(Connection)
    conn.printer, conn.websocket, conn.sample_rate, conn.frame_size, conn.channels = (
        printer, ws, SAMPLE_RATE, FRAME_SIZE, 1)
    conn._done = False
    conn._opus_writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    conn._opus_reader = sphn.OpusStreamReader(SAMPLE_RATE)
    conn._output_queue = queue.Queue()
    conn._all_pcm_data = None
    conn._event_loop = asyncio.get_running_loop()
    return conn


async def moshi_client_call(url: str, audio: np.ndarray) -> tuple[bytes, Connection, CollectingPrinter]:
    printer = CollectingPrinter()
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        first = await ws.receive_bytes(timeout=10)
        if first != b"\x00":
            return first, None, printer
        conn = headless_connection(ws, printer)
        recv = asyncio.create_task(conn._recv_loop())
        t0 = asyncio.get_running_loop().time()
        for k in range(audio.size // FRAME_SIZE):
            # what the client's microphone callback does with each 1920-sample block
            opus = conn._opus_writer.append_pcm(audio[k * FRAME_SIZE:(k + 1) * FRAME_SIZE])
            await conn._ws_send(opus)
            await asyncio.sleep(max(0, t0 + (k + 1) * FRAME_SIZE / SAMPLE_RATE - asyncio.get_running_loop().time()))
        await asyncio.sleep(0.5)
        await ws.close()
        await asyncio.wait_for(recv, 5)
        return first, conn, printer


@pytest.mark.slow
def test_moshi_client_talks_to_api_chat(live_server, telugu_speech):
    _, speech = telugu_speech
    audio = np.concatenate([speech[:3 * SAMPLE_RATE], np.zeros(SAMPLE_RATE // 2, np.float32)])
    url = f"ws://127.0.0.1:{live_server.port}/api/chat"
    handshake, conn, printer = asyncio.run(moshi_client_call(url, audio))
    assert handshake == b"\x00"
    frames = conn._output_queue.qsize()
    sent_frames = audio.size // FRAME_SIZE
    # the client's own decode loop received 1920-sample frames of agent audio, about one per frame sent
    assert frames >= sent_frames - 12, (frames, sent_frames)
    assert printer.tokens, "no text pieces (0x02) arrived"
    assert not [m for level, m in printer.logs if level in ("error", "warning")], printer.logs
    engine = live_server.service.engine
    deadline = time.monotonic() + 5
    while engine.seats_in_use() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.seats_in_use() == 0, "the /api/chat call's seat was not freed when the client left"


def test_api_chat_full_house_gets_an_error_message(live_server):
    engine = live_server.service.engine
    held = [engine.acquire(f"x{i}") for i in range(engine.num_seats)]
    try:
        async def go():
            async with (aiohttp.ClientSession() as http,
                        http.ws_connect(f"ws://127.0.0.1:{live_server.port}/api/chat") as ws):
                return await ws.receive_bytes(timeout=5)
        first = asyncio.run(go())
    finally:
        for seat in held:
            seat.release()
    assert first[:1] == b"\x05" and b"seats are in use" in first
