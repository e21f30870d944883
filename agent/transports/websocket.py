"""fastrtc's WebSocket audio protocol at `/websocket/offer` (and its `/webrtc/offer`), as the server
serves them: each client message is checked (a malformed one is answered and skipped, not the end of
the call), the call's id is the server's, and a hang-up is told apart from a dropped connection.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.websockets import WebSocketState

from agent.calls.hub import CallHub
from agent.transports.connection import WEBSOCKET_HANG_UP_CODES
from agent.transports.fastrtc_compat import SEND_AFTER_CLOSE_ERRORS, HookedStream
from agent.transports.fastrtc_handler import MoshiHandler

log = logging.getLogger(__name__)

MAX_MEDIA_BYTES = 48_000  # one media message: 2 s of 24 kHz μ-law; clients send 20 ms
EVENTS = {"start", "media", "stop", "ping"}


class MessageError(ValueError):
    pass


def check_message(text: str) -> dict[str, Any]:
    """Parse one client message of fastrtc's WebSocket protocol, or say what is wrong with it."""
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
    if message["event"] == "media":
        payload = (message.get("media") or {}).get("payload") if isinstance(message.get("media"), dict) else None
        if not isinstance(payload, str):
            raise MessageError("'media' needs media.payload: base64 μ-law audio")
        try:
            audio = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MessageError("media.payload is not valid base64") from None
        if len(audio) > MAX_MEDIA_BYTES:
            raise MessageError(f"media chunk of {len(audio)} bytes is over {MAX_MEDIA_BYTES}; send 20 ms chunks")
    return message


class CheckedWebSocket:
    """The client's WebSocket as fastrtc sees it, except that a malformed message is answered with
    {"type": "error", "message": ...} and skipped instead of ending the call, and the call's id is
    the server's: fastrtc keys its connections by the client's `websocket_id`, so a reused one would
    end or take over another live call. The client's id is kept in the server's for the logs.
    It also tells a hang-up (a `stop` event, or a normal close) from a dropped connection."""

    def __init__(self, websocket: WebSocket):
        self._ws = websocket
        self.hung_up = False

    def __getattr__(self, name: str):
        return getattr(self._ws, name)

    @property
    def _open(self) -> bool:
        return self._ws.application_state == WebSocketState.CONNECTED

    async def send_json(self, data: Any, mode: str = "text") -> None:
        """Send unless the socket is closing (fastrtc sends from tasks that outlive the close)."""
        if self._open:
            try:
                await self._ws.send_json(data, mode)
            except SEND_AFTER_CLOSE_ERRORS:
                log.debug("websocket: not sent, the connection closed meanwhile")

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close once: fastrtc closes again in its clean-up after the server ended a call."""
        if self._open:
            await self._ws.close(code, reason)

    async def receive_json(self) -> dict[str, Any]:
        while True:
            received = await self._ws.receive()
            if received["type"] == "websocket.disconnect":
                code = received.get("code", 1000)
                self.hung_up = code in WEBSOCKET_HANG_UP_CODES
                raise WebSocketDisconnect(code)
            try:
                if received.get("text") is None:
                    raise MessageError("binary messages are not part of this protocol; send JSON text")
                message = check_message(received["text"])
            except MessageError as exc:
                log.info("websocket: rejected a message: %s", exc)
                await self.send_json({"type": "error", "message": f"bad message: {exc}"})
                continue
            if message["event"] == "start":
                message["websocket_id"] = server_call_id(message["websocket_id"])
            elif message["event"] == "stop":
                self.hung_up = True
            return message


def server_call_id(client_id: str) -> str:
    """A call id no client can choose: the client's own (shortened, for the logs) plus a random part."""
    readable = "".join(c for c in client_id[:24] if c.isalnum() or c in "-_")
    return f"ws-{readable}-{uuid.uuid4().hex[:16]}" if readable else f"ws-{uuid.uuid4().hex[:16]}"


class AgentStream(HookedStream):
    """fastrtc's Stream, plus: malformed WebSocket messages get an error answer instead of ending
    the call, a WebSocket client that hangs up frees its seat at once (fastrtc calls `shutdown()`
    only for WebRTC connections), one whose connection drops keeps its call for a while, and each
    /webrtc/offer notes who offered the call (the per-client limits)."""

    def __init__(self, hub: CallHub, handler: MoshiHandler, **kwargs: Any):
        super().__init__(handler, **kwargs)
        self.hub = hub

    def wrap_websocket(self, websocket: WebSocket) -> CheckedWebSocket:
        return CheckedWebSocket(websocket)

    def websocket_ended(self, handler: Any, websocket: Any) -> None:
        if isinstance(handler, MoshiHandler) and isinstance(websocket, CheckedWebSocket) and not websocket.hung_up:
            handler.connection_dropped()
        else:
            handler.shutdown()

    def offered(self, call_id: str, client: str | None) -> str | None:
        return self.hub.note_offer(call_id, client)
