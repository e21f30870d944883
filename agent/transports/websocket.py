"""fastrtc's WebSocket audio protocol at `/websocket/offer` (and its `/webrtc/offer`), as the server
serves them: each client message is checked (a malformed one is answered and skipped, not the end of
the call), the call's id is the server's, and a hang-up is told apart from a dropped connection.

The protocol's messages are fastrtc's (agent/tools/wsclient.py lists them), but a connection is served
here, not by fastrtc's `WebSocketHandler`: that one runs three tasks per call beside the receive loop
(a queue filler, a sender that sleeps 20 ms after each frame, a clean-up poller waking every 0.1 s),
decodes each payload a second time, and converts each frame to float and back on the way out. Here
each connection is its receive loop plus one sender woken by the engine for each agent frame (no
timers, no queue), each message is parsed and decoded once, and μ-law is a table lookup: on a small
host the event loop's wake-ups are most of a WebSocket call's cost (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import uuid
from typing import Any

import numpy as np
from fastapi import WebSocket
from fastapi.websockets import WebSocketState
from fastrtc import CloseStream

from agent.audio.stream import ulaw_decode, ulaw_encode
from agent.calls.hub import CallHub
from agent.transports import fastrtc_compat
from agent.transports.connection import WEBSOCKET_HANG_UP_CODES
from agent.transports.fastrtc_compat import SEND_AFTER_CLOSE_ERRORS, HookedStream
from agent.transports.fastrtc_handler import MoshiHandler

log = logging.getLogger(__name__)

MAX_MEDIA_BYTES = 48_000  # one media message: 2 s of 24 kHz μ-law; clients send 20 ms
EVENTS = {"start", "media", "stop", "ping"}


class MessageError(ValueError):
    pass


def check_message(text: str) -> tuple[dict[str, Any], bytes | None]:
    """Parse one client message of fastrtc's WebSocket protocol, or say what is wrong with it: the
    message and, for a media one, its μ-law bytes (decoded here, once)."""
    if len(text) > 2 * MAX_MEDIA_BYTES:
        raise MessageError(f"message of {len(text)} bytes is over the {2 * MAX_MEDIA_BYTES} byte limit")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MessageError(f"not JSON: {exc.msg}") from None
    if not isinstance(message, dict) or message.get("event") not in EVENTS:
        raise MessageError(f"expected an object with 'event' in {sorted(EVENTS)}")
    if message["event"] == "start" and not isinstance(message.get("websocket_id"), str):
        raise MessageError("'start' needs a string 'websocket_id'")
    if message["event"] != "media":
        return message, None
    payload = (message.get("media") or {}).get("payload") if isinstance(message.get("media"), dict) else None
    if not isinstance(payload, str):
        raise MessageError("'media' needs media.payload: base64 μ-law audio")
    try:
        audio = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError("media.payload is not valid base64") from None
    if len(audio) > MAX_MEDIA_BYTES:
        raise MessageError(f"media chunk of {len(audio)} bytes is over {MAX_MEDIA_BYTES}; send 20 ms chunks")
    return message, audio


def media_message(pcm: np.ndarray) -> str:
    """int16 samples -> the protocol's media message (base64 needs no JSON escaping)."""
    return '{"event":"media","media":{"payload":"' + base64.b64encode(ulaw_encode(pcm)).decode() + '"}}'


def server_call_id(client_id: str) -> str:
    """A call id no client can choose: the client's own (shortened, for the logs) plus a random part."""
    readable = "".join(c for c in client_id[:24] if c.isalnum() or c in "-_")
    return f"ws-{readable}-{uuid.uuid4().hex[:16]}" if readable else f"ws-{uuid.uuid4().hex[:16]}"


class WebSocketCall:
    """One /websocket/offer connection: its receive loop (this coroutine) and, from the "start" event
    on, one sender task awaiting the agent's frames. The call's id is the server's (fastrtc keyed its
    calls by the client's `websocket_id`, so a reused one would end or take over another live call);
    the client's is kept in it for the logs. A `stop` event or a normal close is a hang-up (the call
    ends); any other end is a dropped connection (the call waits for the caller to resume it)."""

    def __init__(self, stream: AgentStream, websocket: WebSocket):
        self.stream = stream
        self.ws = websocket
        self.handler: MoshiHandler = stream.websocket_handler()  # type: ignore[assignment]
        self.call_id: str | None = None
        self.hung_up = False
        self._sender: asyncio.Task | None = None
        self._played_until = 0.0  # loop time when the audio sent so far has played at the client
        self.channel_sends: set[asyncio.Task] = set()  # the handler's messages not sent yet (ClientChannel)

    async def serve(self) -> None:
        await self.ws.accept()
        loop = asyncio.get_running_loop()
        self.handler.set_channel(ClientChannel(self, loop))
        try:
            await self._receive()
        finally:
            if self._sender is not None:
                self._sender.cancel()
                await asyncio.gather(self._sender, return_exceptions=True)
            if self.call_id is not None:
                self.stream.uncount_call(self.call_id)
                if self.hung_up:
                    self.handler.shutdown()
                else:
                    self.handler.connection_dropped()
            await self.close()

    async def _receive(self) -> None:
        """The client's messages until it hangs up, its connection ends, or the server ends the call."""
        while True:
            received = await self.ws.receive()
            if received["type"] == "websocket.disconnect":
                self.hung_up = received.get("code", 1000) in WEBSOCKET_HANG_UP_CODES
                return
            try:
                if received.get("text") is None:
                    raise MessageError("binary messages are not part of this protocol; send JSON text")
                message, audio = check_message(received["text"])
                if message["event"] == "media" and self.call_id is None:
                    raise MessageError("send a 'start' event before any media")
            except MessageError as exc:
                log.info("websocket: rejected a message: %s", exc)
                await self.send_json({"type": "error", "message": f"bad message: {exc}"})
                continue
            event = message["event"]
            if event == "media" and audio is not None:
                await self._hear(audio)
            elif event == "start" and self.call_id is None:
                if not await self._start(message["websocket_id"]):
                    return
            elif event == "stop":
                self.hung_up = True
                return
            elif event == "ping":
                await self.send_json({"event": "pong"})

    async def _start(self, client_id: str) -> bool:
        call_id = server_call_id(client_id)
        refusal = self.stream.count_call(call_id, self)
        if refusal is not None:
            await self.send_json(refusal)
            return False
        self.call_id = call_id
        fastrtc_compat.enter_connection(call_id, self.ws)  # the sender, created next, inherits it
        self._sender = asyncio.create_task(self._send_agent())
        return True

    async def _hear(self, audio: bytes) -> None:
        try:
            await self.handler.receive((self.handler.input_sample_rate, ulaw_decode(audio)))
        except Exception:  # a bug in one call's handling must not end the connection (as fastrtc)
            log.exception("websocket call %s: could not take a media message", self.call_id)

    async def _send_agent(self) -> None:
        """Each agent frame as the engine makes it (MoshiHandler.emit waits for it: no timer)."""
        loop = asyncio.get_running_loop()
        while True:
            out = await self.handler.emit()
            if isinstance(out, CloseStream):  # the server ended the call: let the audio sent play out
                await asyncio.sleep(max(0.0, self._played_until - loop.time()))
                await self.close()
                return
            if isinstance(out, tuple):
                rate, pcm = out
                await self.send_text(media_message(pcm))
                self._played_until = max(loop.time(), self._played_until) + pcm.shape[-1] / rate

    def set_args(self, args: list[Any]) -> None:
        """fastrtc's `set_input` hands a counted call's inputs this way (the page's, never ours)."""
        self.handler.set_args(args)

    @property
    def _open(self) -> bool:
        return WebSocketState.CONNECTED == self.ws.application_state == self.ws.client_state

    async def send_json(self, data: Any) -> None:
        await self.send_text(json.dumps(data))

    async def send_text(self, text: str) -> None:
        """Send unless the socket is closing (notices may come after the call ended)."""
        if self._open:
            try:
                await self.ws.send_text(text)
            except SEND_AFTER_CLOSE_ERRORS:
                log.debug("websocket: not sent, the connection closed meanwhile")

    async def close(self, code: int = 1000) -> None:
        """Close once (the sender may close it before the receive loop ends), after the handler's
        messages already on their way (a refusal must reach the client before the close does)."""
        if self.channel_sends:
            await asyncio.gather(*self.channel_sends, return_exceptions=True)
        if self._open:
            try:
                await self.ws.close(code)
            except SEND_AFTER_CLOSE_ERRORS:
                log.debug("websocket: already closed")


class ClientChannel:
    """The handler's messages to the client (fastrtc's DataChannel: `send(str)`, from any thread),
    sent in order on the call's loop; the call's close waits for those already queued."""

    def __init__(self, call: WebSocketCall, loop: asyncio.AbstractEventLoop):
        self.call, self.loop = call, loop

    def send(self, message: str) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._queue(message)
        else:
            self.loop.call_soon_threadsafe(self._queue, message)

    def _queue(self, message: str) -> None:
        task = self.loop.create_task(self.call.send_text(message))
        self.call.channel_sends.add(task)
        task.add_done_callback(self.call.channel_sends.discard)


class AgentStream(HookedStream):
    """fastrtc's Stream whose /websocket/offer connections are `WebSocketCall`s, and whose each
    /webrtc/offer notes who offered the call (the per-client limits)."""

    def __init__(self, hub: CallHub, handler: MoshiHandler, **kwargs: Any):
        super().__init__(handler, **kwargs)
        self.hub = hub

    async def serve_websocket(self, websocket: WebSocket) -> None:
        await WebSocketCall(self, websocket).serve()

    def offered(self, call_id: str, client: str | None) -> str | None:
        return self.hub.note_offer(call_id, client)
