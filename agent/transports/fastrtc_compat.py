"""Every use of fastrtc's, aiortc's and gradio's internals (and two of uvicorn's), in this one
module: when one of them is upgraded, this is the file to check. Nothing else under agent/ reaches
into them (an architecture test holds that); the rest of the code uses their public API only.

Read from fastrtc 0.0.34, aiortc 1.16.0, gradio 5.50.0 and uvicorn 0.55.0 (`pip show fastrtc aiortc
gradio uvicorn`). Each use below says what it relies on. The tests that exercise them:
test_server.py and test_ws_smoke.py (the WebSocket path), test_webrtc.py and test_webrtc_reconnect.py
(WebRTC, dropped connections), test_reliability.py (the per-client cap through the page's offers),
test_share.py (the tunnel), test_flood.py (slow requests at uvicorn's door), test_websocket_page.py
(gradio's login cookie on the page's WebSocket call).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import av
import gradio as gr
import numpy as np
from aiortc import MediaStreamError, RTCPeerConnection
from aiortc.codecs import get_decoder
from aiortc.contrib.media import RelayStreamTrack
from fastapi import Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from fastrtc import AdditionalOutputs, AsyncStreamHandler, CloseStream, Stream, WebRTC, webrtc_connection_mixin
from fastrtc.stream import Body
from fastrtc.tracks import AudioCallback, StreamHandlerBase
from fastrtc.utils import Context, create_message, current_context, split_output
from fastrtc.webrtc_connection_mixin import WebRTCConnectionMixin
from gradio import networking, tunneling
from gradio.routes import App as GradioApp
from starlette.routing import Mount
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import ClientDisconnected

from agent.ops.unfinished import UnfinishedRequests

log = logging.getLogger(__name__)

VERSIONS_READ = {"fastrtc": "0.0.34", "aiortc": "1.16.0", "gradio": "5.50.0", "uvicorn": "0.55.0"}
# StreamHandlerBase (fastrtc.tracks, not exported): what every fastrtc handler is
Handler = TypeVar("Handler", bound=StreamHandlerBase)

# What sending on a WebSocket raises once it closed meanwhile: Starlette's errors, and uvicorn's
# ClientDisconnected (uvicorn.protocols.utils, not exported) when the client vanished mid-send.
SEND_AFTER_CLOSE_ERRORS = (RuntimeError, WebSocketDisconnect, ClientDisconnected)

# -- the connection a handler serves ------------------------------------------------------------


def connection() -> tuple[str | None, WebSocket | None]:
    """The connection fastrtc serves on this task: its id and, on the WebSocket path, the socket.
    Relies on `fastrtc.utils.current_context` (not exported): a ContextVar of Context(webrtc_id,
    websocket) that fastrtc sets before it calls a handler's receive/emit (`enter_connection` sets it
    for the WebSocket calls we serve)."""
    ctx = current_context.get()
    if ctx is None:
        return None, None
    return ctx.webrtc_id or None, ctx.websocket


# The first item of the page's inputs when fastrtc got no WebRTCData for the call component.
WEBRTC_MARKER = "__webrtc_value__"


def handler_inputs(handler: StreamHandlerBase, names: Sequence[str]) -> dict[str, Any]:
    """The call's inputs by name: a WebSocket client's URL query, or the page's inputs. Relies on
    `StreamHandlerBase.set_args` storing the page's inputs as `latest_args` = [WebRTCData, *inputs]
    or [WEBRTC_MARKER, webrtc id, *inputs] (fastrtc/tracks.py)."""
    _, websocket = connection()
    if websocket is not None:
        return {name: websocket.query_params.get(name) for name in names}
    args = handler.latest_args if isinstance(handler.latest_args, list) else []
    values = args[2:] if args[:1] == [WEBRTC_MARKER] else args[1:]
    return dict(zip(names, values))


# -- the page's WebRTC component ----------------------------------------------------------------


def hold_dropped_calls(connections: WebRTCConnectionMixin, handler_type: type[Handler],
                       dropped: Callable[[Handler], None]) -> None:
    """Call `dropped(handler)` when a WebRTC connection breaks (instead of fastrtc's `shutdown()`),
    for the handlers of `handler_type`: their calls wait for the caller to resume them.

    fastrtc ends a call the same way whether the caller hung up or the connection broke: on the
    peer connection's "failed" or "closed" state it closes it and calls the handler's `shutdown()`
    (and when ICE fails first, it forgets the connection without even that). With aiortc a broken
    network (ICE consent expired, RFC 7675) mostly shows as "closed" too: DTLS notices first and
    closes the connection. What tells them apart is the ICE transport (`ice_failed`): a broken one
    has gone "failed"; a hang-up (`pc.close()`) closes DTLS and stops ICE without failing it. So each
    new peer connection gets a plain (not async) listener, which aiortc runs the moment the state
    changes, before fastrtc's own listener (a coroutine) runs: on a broken connection it calls
    `dropped`, then cleans the connection up as fastrtc does for a closed one (whose `shutdown()`
    then finds no call to end).

    Relies on: `WebRTCConnectionMixin.handle_offer(body, set_outputs)` (which the component's offer
    and Stream's /webrtc/offer both call), its `pcs` and `handlers` maps by webrtc id filled by then,
    and `clean_up(webrtc_id)` returning the connection's tracks; aiortc's `pc.on(...)` running plain
    listeners synchronously."""
    handle_offer = connections.handle_offer

    async def handle_offer_watching_drops(body: dict[str, Any], set_outputs):
        answer = await handle_offer(body, set_outputs)
        call_id = body.get("webrtc_id") if body.get("sdp") else None  # ICE candidates come this way too
        pc, handler = connections.pcs.get(call_id), connections.handlers.get(call_id)
        if pc is not None and isinstance(handler, handler_type):
            def on_state_change() -> None:
                if pc.connectionState in ("failed", "closed") and ice_failed(pc):
                    log.info("call %s: the WebRTC connection broke", call_id)
                    dropped(handler)
                    for track in connections.clean_up(call_id):
                        track.stop()
            pc.on("connectionstatechange", on_state_change)
        return answer

    connections.handle_offer = handle_offer_watching_drops  # type: ignore[method-assign]


def ice_failed(pc: RTCPeerConnection) -> bool:
    """Whether the connection's ICE transport broke (consent expired, or its socket was lost).
    Relies on aiortc's receiver -> RTCDtlsTransport -> RTCIceTransport chain and its `state`."""
    return pc.connectionState == "failed" or any(
        t.receiver.transport.transport.state == "failed" for t in pc.getTransceivers())


def full_answer(**meta: Any) -> dict[str, Any]:
    """fastrtc's answer to a call it has no room for (webrtc_connection_mixin.py, stream.py), with
    these extra `meta` fields: with that error its page component tells the visitor "Too many
    concurrent connections"."""
    return {"status": "failed", "meta": {"error": "concurrency_limit_reached", **meta}}


def offer_refused(refusal: str) -> dict[str, Any]:
    """An offer's answer when it is refused: fastrtc's own when it is full, with the reason."""
    return full_answer(message=refusal)


def note_page_offers(component: WebRTC, note: Callable[[str, str | None], str | None]) -> None:
    """Call `note(webrtc_id, client address)` for each offer the page's WebRTC component gets (the
    media path never sees the address); an offer it answers with a refusal is refused before any
    peer connection is made. Relies on gradio calling a component's server function (`offer`,
    marked by `@server`, i.e. `_is_server_fn`) by name, with the request when its signature asks
    for a `gr.Request`."""
    offer = component.offer

    async def offer_noting_client(body, request: gr.Request):
        if isinstance(body, dict) and body.get("sdp"):
            refusal = note(str(body.get("webrtc_id")), request.client.host if request.client else None)
            if refusal is not None:
                return offer_refused(refusal)
        return await offer(body)

    offer_noting_client._is_server_fn = True  # type: ignore[attr-defined]
    component.offer = offer_noting_client  # type: ignore[method-assign]


# -- a WebRTC call's audio track: fewer hops and conversions per packet ---------------------------

# libopus's own input rates: anything else is resampled to 48 kHz first
OPUS_RATES = (8_000, 12_000, 16_000, 24_000, 48_000)
OPUS_PACKET_S = 0.02  # libopus's default frame, as aiortc's own encoder sends
# The agent's speech is 24 kHz mono: 48 kbit/s carries it well (aiortc's encoder spends 96 on stereo).
WEBRTC_OPUS_BITRATE = 48_000


@dataclass
class EncodedAudio:
    """One Opus packet as aiortc's sender takes a pre-encoded one (`RTCRtpSender._next_encoded_frame`:
    anything that is not an `av.Frame` goes to the encoder's `pack()`, which reads `bytes(packet)`,
    `pts` and `time_base`), with the `time` fastrtc's `AudioCallback.recv` paces playback by."""

    payload: bytes
    pts: int
    time_base: fractions.Fraction

    @property
    def time(self) -> float:
        return float(self.pts * self.time_base)

    def __bytes__(self) -> bytes:
        return self.payload


class OpusPackets:
    """A call's outgoing audio (sample rate, int16 or float samples) -> 20 ms Opus packets, encoded
    once per chunk at the chunk's own rate and layout: no resampling to 48 kHz stereo and no thread
    hop per packet, which is what aiortc's encoder does with the frames fastrtc hands it."""

    def __init__(self, bitrate: int = WEBRTC_OPUS_BITRATE):
        self.bitrate = bitrate
        self._encoder: Any = None
        self._format: tuple[int, str] | None = None
        self._resampler: Any = None
        self._samples = 0  # at the encoder's rate: the next packet's pts

    def encode(self, rate: int, samples: np.ndarray, layout: str = "mono") -> list[EncodedAudio]:
        array = np.asarray(samples)
        if array.dtype != np.int16:
            array = (np.clip(array.astype(np.float32), -1.0, 1.0) * 32767.0).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array).reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = rate
        frames = [frame]
        if rate not in OPUS_RATES:
            if self._resampler is None:
                self._resampler = av.AudioResampler(format="s16", layout=layout, rate=48_000)
            frames, rate = self._resampler.resample(frame), 48_000
        self._open(rate, layout)
        out = []
        for f in frames:
            f.pts, f.time_base = self._samples, fractions.Fraction(1, rate)
            for packet in self._encoder.encode(f):
                out.append(EncodedAudio(bytes(packet), self._samples, fractions.Fraction(1, rate)))
                self._samples += packet.duration or int(rate * OPUS_PACKET_S)
        return out

    def _open(self, rate: int, layout: str) -> None:
        if self._format == (rate, layout):
            return
        if self._format is not None:  # a new rate: the pts goes on at the new rate
            self._samples = self._samples * rate // self._format[0]
        encoder = av.CodecContext.create("libopus", "w")
        encoder.sample_rate, encoder.layout, encoder.format = rate, layout, "s16"
        encoder.bit_rate = self.bitrate
        encoder.time_base = fractions.Fraction(1, rate)
        encoder.options = {"application": "voip"}
        self._encoder, self._format = encoder, (rate, layout)


class PacketAudioCallback(AudioCallback):
    """fastrtc's `AudioCallback` (the track between a WebRTC call's remote audio and its handler, and
    the track aiortc sends back) made cheaper per call for async handlers; others get fastrtc's own.

    In: reads the remote track itself, not the `MediaRelay` proxy fastrtc puts before it (one
    asyncio queue and task hop per packet; the relay starts only on its proxy's first `recv`), and,
    where the handler says how many samples its next frame lacks (`input_samples_wanted()`), hands
    them over in one `receive()` once they are all there instead of one per resampled chunk. The
    samples are fastrtc's own resampler's, bit for bit.
    Out: encodes what `emit()` returns to Opus itself (OpusPackets) and queues the packets, which
    aiortc sends as they are: no float conversion, resampling to 48 kHz stereo or executor hop per
    20 ms packet.

    Relies on `AudioCallback`'s `track`, `event_handler`, `queue`, `thread_quit`, `channel`,
    `set_additional_outputs`, `has_started`, the `*_task` attributes its `stop`/clean-up read, and
    its `recv` pacing by each item's `.time`; on `StreamHandlerBase.resample`; on aiortc's
    `RelayStreamTrack._source`; and on `webrtc_connection_mixin` building its audio tracks by the
    module's global name `AudioCallback` (install_packet_audio)."""

    def __init__(self, track, *args, **kwargs) -> None:
        source = track._source if isinstance(track, RelayStreamTrack) else None
        super().__init__(source or track, *args, **kwargs)
        self.packets = OpusPackets()

    def lean(self) -> bool:
        return isinstance(self.event_handler, AsyncStreamHandler)

    async def start(self) -> None:
        if not self.lean():
            return await super().start()
        if self.has_started:
            return
        self.has_started = True
        await self.wait_for_channel()
        self.process_input_task = asyncio.create_task(self.process_input_frames())
        self.start_up_task = asyncio.create_task(self.event_handler.start_up())
        self.decode_task = asyncio.create_task(self.emit_packets())

    async def process_input_frames(self) -> None:
        if not self.lean():
            return await super().process_input_frames()
        handler = self.event_handler
        wanted = getattr(handler, "input_samples_wanted", None)
        chunks: list[np.ndarray] = []
        gathered, rate = 0, handler.input_sample_rate
        while not self.thread_quit.is_set():
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                frame = None
            for resampled in handler.resample(frame) if frame is not None else ():
                chunks.append(resampled.to_ndarray())
                gathered += resampled.samples
                rate = resampled.sample_rate
            if chunks and (frame is None or wanted is None or gathered >= wanted()):
                samples = chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=1)
                chunks, gathered = [], 0
                await handler.receive((rate, samples))
            if frame is None:  # the track ended: what was gathered went to the handler above
                break

    async def emit_packets(self) -> None:
        """fastrtc's `player_worker_decode` for this track: what `emit()` returns, queued as Opus packets."""
        while not self.thread_quit.is_set():
            try:
                frame, outputs = split_output(await asyncio.wait_for(self.event_handler.emit(), 60))
                if isinstance(outputs, AdditionalOutputs) and self.set_additional_outputs and self.channel:
                    self.set_additional_outputs(outputs)
                    self.channel.send(create_message("fetch_output", []))
                if frame is not None:
                    rate, samples, *layout = frame
                    for packet in self.packets.encode(rate, samples, *layout):
                        await self.queue.put(packet)
                if isinstance(outputs, CloseStream):
                    await self.queue.put(outputs)
            except TimeoutError:
                continue
            except Exception:  # as fastrtc's worker: one bad chunk must not end the call's audio
                log.exception("could not send a chunk of the call's audio")


class InlineDecoding:
    """Stands in for an aiortc receiver's decoder queue (`RTCRtpReceiver.__decoder_queue`, which its
    `decoder_worker` thread reads): each Opus packet the jitter buffer releases is decoded at once on
    the event loop (libopus: some 30 µs a packet) and its frames queued on the remote track. aiortc's
    way costs, per 20 ms packet, a `queue.Queue` hand-off to the call's decoder thread, a GIL
    hand-over and a `run_coroutine_threadsafe` back to the loop. The thread aiortc still starts
    waits in `get()` until the receiver stops it (`put(None)`), then ends as it always did.

    Relies on the queue's items being `(codec, JitterFrame)` or None, `aiortc.codecs.get_decoder`,
    and the remote track's `_queue` (an asyncio.Queue; None ends the track)."""

    def __init__(self, track) -> None:
        self.frames: asyncio.Queue = track._queue
        self.decoder: Any = None
        self.codec: str | None = None
        self.stopped = threading.Event()

    def put(self, task) -> None:
        if task is None:
            self.stopped.set()  # the worker thread's get() returns None: it ends the track and exits
            return
        codec, encoded = task
        if codec.name != self.codec:
            self.decoder, self.codec = get_decoder(codec), codec.name
        try:
            frames = self.decoder.decode(encoded)
        except av.FFmpegError as exc:  # as aiortc: keep the decoder's state, drop the packet
            log.warning("could not decode a %s packet: %s", codec.name, exc)
            return
        for frame in frames:
            self.frames.put_nowait(frame)

    def get(self):
        self.stopped.wait()
        return None


class InlineDecodingPeerConnection(RTCPeerConnection):
    """The server's peer connections (fastrtc's, through `webrtc_connection_mixin.RTCPeerConnection`):
    their audio receivers decode on the event loop (InlineDecoding). Set once the remote description
    made the receivers, before `receive()` starts their decoder threads (after DTLS connects)."""

    async def setRemoteDescription(self, sessionDescription) -> None:  # noqa: N802 - aiortc's name
        await super().setRemoteDescription(sessionDescription)
        for transceiver in self.getTransceivers():
            receiver = transceiver.receiver
            if (transceiver.kind == "audio" and receiver is not None
                    and not isinstance(receiver._RTCRtpReceiver__decoder_queue, InlineDecoding)
                    and receiver._RTCRtpReceiver__decoder_thread is None):
                receiver._RTCRtpReceiver__decoder_queue = InlineDecoding(receiver.track)


def install_packet_audio() -> None:
    """Make fastrtc build every WebRTC audio track as a PacketAudioCallback and every peer connection as
    an InlineDecodingPeerConnection (in this process; aiortc's own clients are left as they are): relies
    on `fastrtc.webrtc_connection_mixin` calling `AudioCallback(...)` and `RTCPeerConnection(...)` by
    their module-global names."""
    webrtc_connection_mixin.AudioCallback = PacketAudioCallback  # type: ignore[misc]
    webrtc_connection_mixin.RTCPeerConnection = InlineDecodingPeerConnection  # type: ignore[misc]


# -- fastrtc's Stream: /websocket/offer and /webrtc/offer -----------------------------------------


class HookedStream(Stream):
    """fastrtc's Stream with two hooks a subclass fills in: `serve_websocket` (one /websocket/offer
    connection, served by the subclass instead of fastrtc's `WebSocketHandler`) and `offered` (who
    sent a /webrtc/offer, and whether it is refused); and the concurrency accounting a WebSocket call
    served that way takes part in (`count_call`, `uncount_call`, `open_connections`)."""

    async def serve_websocket(self, websocket: WebSocket) -> None:
        await super().websocket_offer(websocket)

    def offered(self, call_id: str, client: str | None) -> str | None:
        """A /webrtc/offer from `client`: the refusal to answer it with (429), or None to go on."""
        return None

    async def websocket_offer(self, websocket: WebSocket):
        """Relies on `Stream.mount` routing the WebSocket route /websocket/offer to the bound `websocket_offer`."""
        await self.serve_websocket(websocket)

    def websocket_handler(self) -> StreamHandlerBase:
        """A handler for one WebSocket call, as fastrtc's `websocket_offer` makes it: a copy of the
        Stream's `event_handler`, out of phone mode (Twilio's 8 kHz path)."""
        handler = self.event_handler.copy()  # type: ignore[union-attr]
        handler.phone_mode = False
        return handler

    def open_connections(self) -> int:
        """The calls fastrtc counts against its concurrency limit: relies on
        `WebRTCConnectionMixin.connections` (one entry per WebRTC or WebSocket call until `clean_up`)."""
        return len(self.connections)

    def count_call(self, call_id: str, connection: Any) -> dict[str, Any] | None:
        """Count a WebSocket call against the concurrency limit, as fastrtc's own WebSocket path does
        (`connections[id] = [connection]`; fastrtc's `set_input` may call `connection.set_args`):
        None, or fastrtc's answer when the limit is reached (the call is not counted)."""
        if len(self.connections) >= self.concurrency_limit:  # type: ignore[operator]
            return full_answer(limit=self.concurrency_limit)
        self.connections[call_id] = [connection]
        return None

    def uncount_call(self, call_id: str) -> None:
        """The call counted by `count_call` ended: relies on `WebRTCConnectionMixin.clean_up(id)`
        forgetting it (and whatever else fastrtc keyed by that id)."""
        self.clean_up(call_id)

    async def offer(self, body: Body, request: Request):
        """Relies on `Stream.mount` routing POST /webrtc/offer to the bound `offer` (FastAPI injects
        `request` by its annotation) and on `fastrtc.stream.Body` (not exported)."""
        if body.sdp:
            refusal = self.offered(body.webrtc_id, request.client.host if request.client else None)
            if refusal is not None:
                return JSONResponse(offer_refused(refusal), status_code=429)
        return await super().offer(body)


def enter_connection(call_id: str, websocket: WebSocket) -> None:
    """Make `connection()` name this WebSocket call on this task and the tasks it creates from now
    on, as fastrtc does on a "start" event: sets `fastrtc.utils.current_context` (not exported)."""
    current_context.set(Context(webrtc_id=call_id, websocket=websocket))


# -- gradio's share tunnel ----------------------------------------------------------------------


@dataclass(frozen=True)
class TunnelFacts:
    """Where gradio's tunnel comes from, for the log when it cannot open."""

    api_server: str  # gradio's share server
    binary_url: str  # the frpc binary gradio downloads on first use
    binary_path: str  # where it goes


def tunnel_facts() -> TunnelFacts:
    """Relies on `gradio.networking.GRADIO_API_SERVER` and `gradio.tunneling.BINARY_URL`/`BINARY_PATH`."""
    return TunnelFacts(networking.GRADIO_API_SERVER, tunneling.BINARY_URL, tunneling.BINARY_PATH)


def open_tunnel(local_host: str, port: int) -> tuple[str, bool]:
    """Open gradio's tunnel to local_host:port: (its public address, whether the share server is a
    self-hosted one). Raises whatever the tunnel raises. Relies on `gradio.networking.setup_tunnel(host,
    port, token, server, certificate)`, as `Blocks.launch(share=True)` calls it, and on
    `GRADIO_SHARE_SERVER_ADDRESS` (from the environment variable of that name) naming a custom server."""
    custom_server = bool(networking.GRADIO_SHARE_SERVER_ADDRESS)
    return networking.setup_tunnel(local_host, port, secrets.token_urlsafe(32), None, None), custom_server


# -- gradio's login: who the page's cookie names ---------------------------------------------------


def gradio_login_user(app: Any, cookies: Mapping[str, str]) -> str | None:
    """The user the page's login cookie names, as gradio's own login check reads it (`login_check` in
    gradio.routes), or None. Relies on the gradio `App` that `gr.mount_gradio_app` mounted on `app`
    (a starlette Mount whose `.app` is a `gradio.routes.App`), its `cookie_id` and its `tokens` (login
    token -> user, filled by /login, in memory: a restart logs every page out), and on the cookies
    `access-token-<cookie_id>` (Secure, for HTTPS) and `access-token-unsecure-<cookie_id>` (plain HTTP)."""
    gradio_app = next((route.app for route in getattr(app, "routes", ())
                       if isinstance(route, Mount) and isinstance(route.app, GradioApp)), None)
    if gradio_app is None:
        return None
    token = (cookies.get(f"access-token-{gradio_app.cookie_id}")
             or cookies.get(f"access-token-unsecure-{gradio_app.cookie_id}"))
    return gradio_app.tokens.get(token) if token else None


# -- uvicorn's HTTP protocol: slow requests at the door -------------------------------------------


def unfinished_requests_protocol(door: UnfinishedRequests) -> type[H11Protocol]:
    """uvicorn's h11 protocol (for `uvicorn.Config(http=...)`) that asks `door` (ops.unfinished) about
    each wait for a request's headers: on a new connection and after each response on a kept-alive one.
    A connection refused is answered 429 and closed before anything is parsed; one whose headers take
    over `door.header_seconds` is answered 408 and closed. Relies on H11Protocol's `connection_made`,
    `handle_events` (which sets `scope` when a request's headers have been parsed, and hands the
    transport over to a WebSocket protocol on an upgrade), `on_response_complete`, `connection_lost`,
    and its `client`, `transport`, `loop` attributes (uvicorn/protocols/http/h11_impl.py)."""

    class UnfinishedRequestsProtocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.address = self.client[0] if self.client else "?"
            self.header_timer: Any = None
            self.scope_seen: Any = None
            self.await_request()

        def await_request(self) -> None:
            if self.transport.is_closing() or self.header_timer is not None:
                return
            if not door.start(self.address):
                self.transport.write(door.refusal)
                self.transport.close()
                return
            self.header_timer = self.loop.call_later(door.header_seconds, self.headers_too_slow)

        def stop_waiting(self) -> bool:
            if self.header_timer is None:
                return False
            self.header_timer.cancel()
            self.header_timer = None
            door.finish(self.address)
            return True

        def headers_too_slow(self) -> None:
            self.header_timer = None
            door.expire(self.address)
            if not self.transport.is_closing():
                self.transport.write(door.timeout)
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.scope is not self.scope_seen:  # a request's headers arrived (a WebSocket's too)
                self.scope_seen = self.scope
                self.stop_waiting()

        def on_response_complete(self) -> None:
            # waits for the next request from here (before the pipelined one super() may parse at once)
            self.await_request()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_waiting()
            super().connection_lost(exc)

    return UnfinishedRequestsProtocol
