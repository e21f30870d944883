"""The HTTP server: the page at `/`, fastrtc's endpoints for other clients, and a health check.

Endpoints (all on one port):
- `/`                   the Gradio page (WebRTC call, sidebar, readouts)
- `/websocket/offer`    fastrtc's WebSocket audio protocol (see README)
- `/webrtc/offer`       fastrtc's WebRTC offer endpoint for non-browser WebRTC clients
- `/api/chat`           Kyutai's own Moshi protocol (agent/transports/kyutai_api.py), for Moshi's clients
- `/healthz`            process alive, with seat counts
- `/readyz`             200 when a new call would get a seat; 503 when full or draining
- `/metrics`            Prometheus text format

On SIGTERM the server drains: it stops taking calls (/readyz 503, new callers are told), lets
live calls finish for up to `drain_seconds`, then exits 0. A second signal exits at once.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

import gradio as gr
import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.websockets import WebSocketState
from fastrtc import Stream
from fastrtc.stream import Body
from fastrtc.websocket import WebSocketHandler
from uvicorn.protocols.utils import ClientDisconnected

from agent.calls.session import WEBSOCKET_HANG_UP_CODES
from agent.ops.access import AccessMiddleware, Credentials, DrainGate, rtc_configuration_from_env
from agent.service import AgentService
from agent.transports import kyutai_api
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
            except (RuntimeError, WebSocketDisconnect, ClientDisconnected):
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


class AgentStream(Stream):
    """fastrtc's Stream, plus: malformed WebSocket messages get an error answer instead of ending
    the call, a WebSocket client that hangs up frees its seat at once (fastrtc calls `shutdown()`
    only for WebRTC connections), and one whose connection drops keeps its call for a while."""

    def clean_up(self, webrtc_id: str):
        connection = super().clean_up(webrtc_id)
        for conn in connection or []:
            if isinstance(conn, WebSocketHandler):
                handler = conn.stream_handler
                if isinstance(conn.websocket, CheckedWebSocket) and not conn.websocket.hung_up:
                    handler.connection_dropped()
                else:
                    handler.shutdown()
        return connection

    async def websocket_offer(self, websocket: WebSocket):
        try:
            return await super().websocket_offer(CheckedWebSocket(websocket))  # type: ignore[arg-type]
        except AttributeError as exc:
            # fastrtc's clean-up reads `start_up_task`, which only a "start" event creates: a client that
            # leaves before "start" had no call, and there is nothing to clean up
            if "start_up_task" not in str(exc):
                raise

    async def offer(self, body: Body, request: Request):
        """fastrtc's /webrtc/offer, noting who offered the call (the per-client cap)."""
        if body.sdp:
            self.event_handler.note_offer(body.webrtc_id, request.client.host if request.client else None)
        return await super().offer(body)


def build_stream(service: AgentService) -> AgentStream:
    rtc = rtc_configuration_from_env()
    return AgentStream(MoshiHandler(service.hub), modality="audio", mode="send-receive",
                       concurrency_limit=service.seats_total(), rtc_configuration=rtc,
                       server_rtc_configuration=rtc, verbose=False)


def add_routes(app: FastAPI, service: AgentService, stream: AgentStream) -> None:
    stream.mount(app)

    @app.websocket("/api/chat")
    async def api_chat(websocket: WebSocket) -> None:
        await kyutai_api.chat(websocket, service.hub)

    # The probes are coroutines: they only read counters, and a hop to a worker thread is what made
    # them slow when many calls keep the interpreter busy (python -m agent.tools.loadtest load).
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "pid": os.getpid(), "models": [e.model.name for e in service.engines],
                "random_weights": service.random_weights, "seats_total": service.seats_total(),
                "seats_in_use": service.seats_in_use()}

    @app.get("/readyz")
    async def readyz(response: Response) -> dict:
        ready, reason = service.readiness()
        response.status_code = 200 if ready else 503
        return {"ready": ready, "reason": reason, "seats_total": service.seats_total(),
                "seats_in_use": service.seats_in_use()}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = service.exporter.render()
        return Response(body, media_type=content_type)


def build_app(service: AgentService, demo: gr.Blocks, stream: AgentStream) -> FastAPI:
    config = service.server_config
    credentials = Credentials.parse(config.auth)
    app = FastAPI(title="Telugu voice agent")
    add_routes(app, service, stream)
    app.add_middleware(DrainGate, draining=lambda: service.hub.draining)
    app.add_middleware(AccessMiddleware, credentials=credentials, max_calls_per_client=config.max_calls_per_client)
    auth = (credentials.user, credentials.password) if credentials else None
    return gr.mount_gradio_app(app, demo, path="/", auth=auth, auth_message="Telugu voice agent")


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on SIGTERM/SIGINT instead of cutting live calls."""

    def __init__(self, config: uvicorn.Config, service: AgentService):
        super().__init__(config)
        self.service = service
        self._draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining is not None:  # a second signal: stop now
            log.warning("second signal: exiting without waiting for calls")
            super().handle_exit(sig, frame)
            return

        def drain_then_exit() -> None:
            self.service.drain(self.service.server_config.drain_seconds)
            self.should_exit = True

        self._draining = threading.Thread(target=drain_then_exit, name="drain", daemon=True)
        self._draining.start()


def server_config(app: FastAPI, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ws_max_size=1 << 20)


class BackgroundServer:
    """uvicorn in a thread (tests, notebooks); `stop()` shuts it down cleanly."""

    def __init__(self, app: FastAPI, host: str, port: int):
        self.server = uvicorn.Server(server_config(app, host, port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.url = f"http://{host}:{port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server did not start on {self.url}")
            time.sleep(0.05)
        host = self.server.config.host
        self.url = f"http://{host}:{listening_port(self.server, self.server.config.port)}"  # port 0: the OS's choice
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def listening_port(server: uvicorn.Server, asked: int) -> int:
    """The port a started server listens on: the one asked for, or the one the OS chose for port 0."""
    for listener in server.servers:
        for sock in listener.sockets:
            return sock.getsockname()[1]
    return asked


def serve_in_background(service: AgentService, host: str = "127.0.0.1") -> BackgroundServer:
    """The whole app (page, stream, API) for this service on a free port of `host`, in a thread
    (benchmarks, notebooks)."""
    from agent.web.ui import build_demo

    return BackgroundServer(build_app(service, build_demo(service), build_stream(service)), host, 0).start()


def serve(app: FastAPI, service: AgentService, host: str, port: int) -> None:
    DrainingServer(server_config(app, host, port), service).run()

