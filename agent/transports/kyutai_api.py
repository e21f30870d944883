"""Kyutai's own WebSocket protocol at `/api/chat`, so clients made for Moshi talk to us unchanged
(`python -m moshi.client`, Kyutai's web client).

Binary messages, first byte = kind:
  0x00  server -> client once, the handshake, before anything else
  0x01  audio both ways, in the connection's `?codec=` (agent.audio.codecs): `ogg` (the default,
        Kyutai's: Ogg Opus pages of 24 kHz mono), `opus` (one raw Opus packet a message, as WebCodecs
        makes them: the page) or `pcm` (16-bit little-endian 24 kHz mono: the page without WebCodecs)
  0x02  server -> client: UTF-8 text pieces of the agent's inner monologue
  0x04  server -> client, after the handshake, only if asked (`?resumable=1` or `?resume=`): JSON
        {"type": "call", "call_id", "resume_token", "resumed"}; client -> server (an extension the
        page uses): JSON of the call's settings by the query's names, applied mid-call as the page's
        WebRTC call applies them (CallConnection.apply)
  0x05  server -> client: UTF-8 error message (e.g. all seats are in use, the call's time limit),
        then the socket closes; or a notice the call goes on after (the engine reset it)

Each connection is one call on the same engine as every other transport. Query parameters, parsed
as for every transport (agent.transports.settings): `voice`, `emotion` (catalogue ids) and the
sampling names of Kyutai's web client (`text_temperature`, `text_topk`, `audio_temperature`,
`audio_topk`); bad values get a 0x05 error and the socket closes.
PersonaPlex's names work too: `voice_prompt` (a preset such as `NATF2.pt`, or a catalogue voice id),
`text_prompt` (the persona) and `seed` (their server) / `text_seed`, `audio_seed` (their web client):
integers, accepted, but in a shared batch one call's sampling cannot be seeded on its own (greedy
sampling is the reproducible choice). Their client's other knobs (`pad_mult`, `repetition_penalty`,
`repetition_penalty_context`) are ignored.
A connection that drops without a close keeps its call for `--resume-seconds`; reconnecting with
`?resume=<resume_token>` continues it (same seat, same conversation).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from fastapi import WebSocket, WebSocketDisconnect

from agent.audio.codecs import Reader, Writer, codec_pair
from agent.calls.hub import CallHub
from agent.calls.session import Session
from agent.errors import AudioFormatError, CallRefused, ResumeFailed
from agent.transports.connection import WEBSOCKET_HANG_UP_CODES, CallConnection
from agent.transports.settings import SettingsCache, parse_call_settings, resume_token

log = logging.getLogger(__name__)

HANDSHAKE, AUDIO, TEXT, METADATA, ERROR = b"\x00", b"\x01", b"\x02", b"\x04", b"\x05"
MAX_MESSAGE_BYTES = 64 * 1024  # an Opus page of 80 ms is a few hundred bytes
OUTPUT_WAIT_S = 0.05


async def _send_agent(ws: WebSocket, session: Session, stop: asyncio.Event, writer: Writer) -> None:
    """The agent's frames as they come (awaited on the event loop: no thread per call); ends the
    call when it reaches its time limit."""
    connection = session.connection
    while not stop.is_set() and not session.closed and session.connection == connection:
        if session.over_time:
            await ws.send_bytes(ERROR + f"This call reached its time limit of {session.max_seconds / 60:g} "
                                "minutes.".encode())
            await ws.close(code=1000)
            return
        frame = await session.wait_output(OUTPUT_WAIT_S)
        for notice in session.take_notices():
            await ws.send_bytes(ERROR + notice.encode())
        if frame is None:
            continue
        for message in writer.write(frame.pcm):
            await ws.send_bytes(AUDIO + message)
        if frame.text:
            await ws.send_bytes(TEXT + frame.text.encode())
    if session.closed and not stop.is_set():  # the server ended the call (e.g. its prompt outgrew the context)
        await ws.send_bytes(ERROR + f"The call ended: {session.seat.closed_reason}".encode())
        await ws.close(code=1000)


async def _receive_user(ws: WebSocket, hub: CallHub, session: Session, reader: Reader) -> bool:
    """The caller's audio (and settings) into the call until the connection ends: True for a hang-up,
    False for a drop."""
    outbox: list[dict] = []  # what applying settings tells the client
    link, settings = CallConnection(hub, outbox.append), SettingsCache(hub.catalogue)
    warned = False
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return message.get("code", 1000) in WEBSOCKET_HANG_UP_CODES
        data = message.get("bytes")
        if data and data[:1] == METADATA and len(data) <= MAX_MESSAGE_BYTES:
            await _apply_settings(ws, link, session, settings, data[1:], outbox)
            continue
        if not data or data[:1] != AUDIO or len(data) > MAX_MESSAGE_BYTES:
            if not warned:  # tell the client once; keep the call going
                warned = True
                await ws.send_bytes(ERROR + b"ignored a message that is not 0x01 + audio or 0x04 + JSON settings")
            continue
        try:
            rate, pcm = reader.read(data[1:])
            if pcm.size:
                session.receive(rate, pcm)  # resample and queue: short, like fastrtc's handler
        except AudioFormatError as exc:  # corrupt audio: skip it, as moshi's own server would not crash either
            log.info("/api/chat: %s", exc)


async def _apply_settings(ws: WebSocket, link: CallConnection, session: Session, settings: SettingsCache,
                          data: bytes, outbox: list[dict]) -> None:
    """The caller changed its settings mid-call (JSON by the query's names): as on the page's WebRTC call."""
    try:
        values = json.loads(data)
    except ValueError:
        values = None
    if not isinstance(values, dict):
        await ws.send_bytes(ERROR + b"ignored a 0x04 message that is not a JSON object of settings")
        return
    wanted = settings.get(values)
    if wanted.error is not None:
        link.warn_once(f"settings:{wanted.error}", wanted.error)
    else:
        link.apply(session, wanted.settings)
    for message in outbox:
        await ws.send_bytes(ERROR + message["message"].encode())
    outbox.clear()


async def chat(ws: WebSocket, hub: CallHub) -> None:
    await ws.accept()
    call_id = f"kyutai-{uuid.uuid4().hex[:12]}"
    params = ws.query_params
    resumed = False
    try:
        reader, writer = codec_pair(params.get("codec") or "ogg")
        settings = parse_call_settings(hub.catalogue, params)
        if token := resume_token(params):
            try:
                session, resumed = await hub.open_async(call_id, settings, resume_token=token), True
            except ResumeFailed as exc:
                log.info("/api/chat: %s; a new call starts", exc)
        if not resumed:  # off the event loop: a new voice prompt is encoded there
            session = await hub.open_async(call_id, settings, ws.client.host if ws.client else None)
    except (CallRefused, ValueError) as exc:
        try:
            await ws.send_bytes(ERROR + str(exc).encode())
            await ws.close(code=1013)  # try again later
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client left before it heard why
        return
    connection = session.connection
    stop = asyncio.Event()
    receiver = asyncio.create_task(_receive_user(ws, hub, session, reader))
    try:
        await ws.send_bytes(HANDSHAKE)
        if params.get("resumable") or params.get("resume"):
            told = {"type": "call", "call_id": session.call_id, "resume_token": session.resume_token,
                    "resumed": resumed}
            await ws.send_bytes(METADATA + json.dumps(told).encode())
        # the call ends when either side does: the client leaves, or the server ends it (time limit)
        tasks = {asyncio.create_task(_send_agent(ws, session, stop, writer)), receiver}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away mid-send
    finally:
        hung_up = receiver.done() and not receiver.cancelled() and receiver.exception() is None and receiver.result()
        if session.connection != connection:
            pass  # the caller resumed this call on a newer connection, which owns it now
        elif hung_up or session.closed or session.over_time:
            await hub.close_async(session, "client left")
        else:
            hub.drop(session)
