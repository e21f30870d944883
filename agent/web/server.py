"""The HTTP server: the page at `/`, the transports' endpoints for other clients, and health checks.

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

import logging
import os
import threading
import time

import gradio as gr
import uvicorn
from fastapi import FastAPI, Response, WebSocket

from agent.ops.access import AccessMiddleware, Credentials, DrainGate, rtc_configuration_from_env
from agent.ops.forwarded import ForwardedMiddleware, TrustedProxies
from agent.ops.unfinished import UnfinishedRequests
from agent.service import AgentService
from agent.transports import kyutai_api
from agent.transports.fastrtc_compat import gradio_login_user, install_packet_audio, unfinished_requests_protocol
from agent.transports.fastrtc_handler import MoshiHandler
from agent.transports.websocket import AgentStream

log = logging.getLogger(__name__)


def build_stream(service: AgentService) -> AgentStream:
    rtc = rtc_configuration_from_env()
    return AgentStream(service.hub, MoshiHandler(service.hub), modality="audio", mode="send-receive",
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
    # the WebRTC calls it serves (the page's and /webrtc/offer's): cheaper audio tracks per call
    install_packet_audio()
    add_routes(app, service, stream)
    app.add_middleware(DrainGate, draining=lambda: service.hub.draining)
    # the page's WebSocket call under --auth: its login cookie, as gradio checks it (app: mounted below)
    app.add_middleware(AccessMiddleware, credentials=credentials, cap=service.hub.cap,
                       logged_in=lambda cookies: gradio_login_user(app, cookies) is not None)
    # outermost: every gate and transport (and the page's WebRTC offer) reads the caller's address
    trusted = TrustedProxies.parse(config.trusted_proxies)
    app.add_middleware(ForwardedMiddleware, trusted=trusted)
    # read by server_config: uvicorn's HTTP protocol asks it about requests still arriving (slowloris)
    app.state.unfinished_requests = UnfinishedRequests(config.max_unfinished_requests_per_client,
                                                       config.request_header_seconds, trusted.trusts)
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
    # proxy headers: agent.ops.forwarded (--trusted-proxies), not uvicorn's own. HTTP: h11, with a deadline
    # and a per-client limit for requests whose headers are still arriving (agent.ops.unfinished)
    door = getattr(app.state, "unfinished_requests", None)
    http = unfinished_requests_protocol(door) if door is not None else "auto"
    # no permessage-deflate: every WebSocket message here is audio; deflate cannot shrink Opus and wins
    # back only base64's overhead on μ-law (640 -> ~440 bytes per 20 ms, 10 kB/s a call), while
    # compressing and inflating each message on the event loop is CPU every call pays (docs/benchmarks.md)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ws_max_size=1 << 20, proxy_headers=False,
                          http=http, ws_per_message_deflate=False)


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

