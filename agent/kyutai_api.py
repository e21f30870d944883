"""Kyutai's own WebSocket protocol at `/api/chat`, so clients made for Moshi talk to us unchanged
(`python -m moshi.client`, Kyutai's web client).

Binary messages, first byte = kind:
  0x00  server -> client once, the handshake, before anything else
  0x01  audio both ways: Ogg Opus pages of 24 kHz mono (sphn's OpusStreamWriter/Reader)
  0x02  server -> client: UTF-8 text pieces of the agent's inner monologue
  0x05  server -> client: UTF-8 error message (e.g. all seats are in use), then the socket closes

Each connection is one call on the same engine as every other transport. Query parameters:
`voice`, `emotion` (catalogue ids) and the sampling names of Kyutai's web client (`text_temperature`,
`text_topk`, `audio_temperature`, `audio_topk`); bad values get a 0x05 error and the socket closes.
PersonaPlex's names work too: `voice_prompt` (a preset such as `NATF2.pt`, or a catalogue voice id),
`text_prompt` (the persona) and `seed` (their server) / `text_seed`, `audio_seed` (their web client):
integers, accepted, but in a shared batch one call's sampling cannot be seeded on its own (greedy
sampling is the reproducible choice). Their client's other knobs (`pad_mult`, `repetition_penalty`,
`repetition_penalty_context`) are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import sphn
from anyio.to_thread import run_sync
from fastapi import WebSocket, WebSocketDisconnect

from agent import SAMPLE_RATE
from agent.audio import AudioFormatError
from agent.sampling import sampling_request
from agent.session import CallHub, CallRefused, Session

log = logging.getLogger(__name__)

HANDSHAKE, AUDIO, TEXT, ERROR = b"\x00", b"\x01", b"\x02", b"\x05"
MAX_MESSAGE_BYTES = 64 * 1024  # an Opus page of 80 ms is a few hundred bytes
OUTPUT_WAIT_S = 0.05


async def _send_agent(ws: WebSocket, session: Session, stop: asyncio.Event) -> None:
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    while not stop.is_set() and not session.closed:
        frame = await run_sync(session.next_output, OUTPUT_WAIT_S)
        if frame is None:
            continue
        pages = writer.append_pcm(frame.pcm)
        if len(pages):
            await ws.send_bytes(AUDIO + pages)
        if frame.text:
            await ws.send_bytes(TEXT + frame.text.encode())
    if session.closed and not stop.is_set():  # the server ended the call (e.g. its prompt outgrew the context)
        await ws.send_bytes(ERROR + f"The call ended: {session.seat.closed_reason}".encode())
        await ws.close(code=1000)


async def _receive_user(ws: WebSocket, session: Session) -> None:
    reader = sphn.OpusStreamReader(SAMPLE_RATE)
    warned = False
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if not data or data[:1] != AUDIO or len(data) > MAX_MESSAGE_BYTES:
            if not warned:  # tell the client once; keep the call going
                warned = True
                await ws.send_bytes(ERROR + b"ignored a message that is not 0x01 + Ogg Opus audio")
            continue
        try:
            pcm = reader.append_bytes(data[1:])
        except Exception:  # corrupt Opus: skip it, as moshi's own server would not crash either
            log.info("/api/chat: undecodable Opus data skipped")
            continue
        if pcm.size:
            try:
                await run_sync(session.receive, SAMPLE_RATE, pcm)
            except AudioFormatError as exc:
                log.info("/api/chat: %s", exc)


SEED_NAMES = ("seed", "text_seed", "audio_seed")  # PersonaPlex's server, and its web client


def check_seeds(params) -> None:
    """PersonaPlex's seeds: integers or absent (ValueError otherwise)."""
    for name in SEED_NAMES:
        raw = params.get(name)
        if raw in (None, ""):
            continue
        try:
            int(raw)
        except ValueError:
            raise ValueError(f"{name} must be a whole number, got {raw!r}") from None


async def chat(ws: WebSocket, hub: CallHub) -> None:
    await ws.accept()
    call_id = f"kyutai-{uuid.uuid4().hex[:12]}"
    try:
        params = ws.query_params
        check_seeds(params)
        settings = hub.catalogue.settings(params.get("voice"), params.get("emotion"), sampling_request(params),
                                          params.get("voice_prompt"), params.get("text_prompt"))
        session = await run_sync(hub.open, call_id, settings)  # a new voice prompt is encoded: off the loop
    except (CallRefused, ValueError) as exc:
        await ws.send_bytes(ERROR + str(exc).encode())
        await ws.close(code=1013)  # try again later
        return
    stop = asyncio.Event()
    try:
        await ws.send_bytes(HANDSHAKE)
        sender = asyncio.create_task(_send_agent(ws, session, stop))
        try:
            await _receive_user(ws, session)
        finally:
            stop.set()
            await asyncio.gather(sender, return_exceptions=True)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away mid-send
    finally:
        hub.close(session, "client left")
