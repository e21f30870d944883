"""The fastrtc handler: one per connection (WebRTC from the page, or fastrtc's WebSocket protocol).

It turns transport calls into session calls and nothing more. It is an `AsyncStreamHandler`: both
`receive` and `emit` are coroutines on the event loop, so a call holds no thread. `receive` only
resamples and queues frames (the Moshi step runs on the engine's own thread); `emit` awaits the
session's next frame, woken by the engine when it is produced (`Session.wait_output`). Opening and
ending a call run on the hub's few call-setup threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import replace
from typing import Any

import gradio as gr
import numpy as np
from aiortc import RTCPeerConnection
from fastrtc import AsyncStreamHandler, WebRTC
from fastrtc.utils import CloseStream, current_context
from fastrtc.webrtc_connection_mixin import WebRTCConnectionMixin

from agent import SAMPLE_RATE
from agent.audio.stream import to_int16
from agent.calls.session import CallHub, Session
from agent.engine.sampling import sampling_request
from agent.errors import (
    AudioFormatError,
    CallRefused,
    CatalogueError,
    ConditionError,
    EngineStoppedError,
    ResumeFailed,
    SamplingError,
)
from agent.voices import CallSettings

log = logging.getLogger(__name__)

# The longest emit() waits before returning None. fastrtc's WebSocket path queues whatever emit()
# returns, None included, and sends one item per 20 ms at most: returning None more often than
# that would make the agent's audio fall behind; returning at once would spin a core.
EMIT_WAIT_S = 0.1
# With no call (refused, or the engine freed the seat), emit() waits this long for the next chunk.
IDLE_WAIT_S = 1.0
# The page's inputs after the call component, in order (ui.build_demo); other clients may send fewer.
# "resume": the token of a dropped call this connection resumes (`?resume=` on the WebSocket URL).
INPUT_NAMES = ("voice", "emotion", "text_temperature", "text_topk", "audio_temperature", "audio_topk",
               "text_prompt", "voice_prompt", "resume")
# How long a page call waits for the page's inputs (its settings, a resume token) before it opens with
# the defaults: fastrtc asks the page for them over the data channel when the call starts.
INPUTS_WAIT_S = 2.0
WEBRTC_MARKER = "__webrtc_value__"


class MoshiHandler(AsyncStreamHandler):
    def __init__(self, hub: CallHub, input_sample_rate: int = SAMPLE_RATE, await_inputs: bool = False):
        """`await_inputs`: open each call once its client sent its inputs (the page does, when fastrtc
        asks; a resumed call's token is one of them)."""
        super().__init__(expected_layout="mono", output_sample_rate=SAMPLE_RATE,
                         input_sample_rate=input_sample_rate)
        self.hub = hub
        self.await_inputs = await_inputs
        self.session: Session | None = None
        self._connection = 0  # the session's connection number this handler carries (Session.connection)
        self._refused: str | None = None
        self._closing_sent = False
        self._shut = False
        self._warned: set[str] = set()
        self._activity: asyncio.Event | None = None  # set by receive(): emit() waits on it between calls

    def copy(self) -> MoshiHandler:
        return MoshiHandler(self.hub, self.input_sample_rate, self.await_inputs)

    def note_offer(self, call_id: str, client: str | None) -> None:
        """A WebRTC offer for `call_id` came from `client` (see CallHub.note_offer)."""
        self.hub.note_offer(call_id, client)

    # -- connection identity and UI inputs -------------------------------------------------------

    def _call_id(self) -> str:
        ctx = current_context.get()
        return ctx.webrtc_id if ctx is not None and ctx.webrtc_id else f"call-{uuid.uuid4().hex[:12]}"

    def _client(self) -> str | None:
        """The caller's address on the WebSocket path; a WebRTC call's comes from its offer."""
        ctx = current_context.get()
        client = getattr(ctx.websocket, "client", None) if ctx is not None and ctx.websocket is not None else None
        return client.host if client is not None else None

    def _resume_token(self) -> str | None:
        """The token of a dropped call this connection resumes (`?resume=` on the WebSocket URL, the
        page's "resume" input)."""
        token = self._inputs().get("resume")
        return token if isinstance(token, str) and token else None

    async def _await_inputs(self) -> None:
        """With `await_inputs`, wait (briefly) until the client sent its inputs: fastrtc asks for them."""
        if not self.await_inputs or self.args_set.is_set():
            return
        try:
            await asyncio.wait_for(self.wait_for_args(), INPUTS_WAIT_S)
        except TimeoutError:
            log.warning("no inputs from the client within %.0f s: the call opens with the defaults", INPUTS_WAIT_S)

    def _inputs(self) -> dict[str, Any]:
        """The call's choices by name (INPUT_NAMES). A fastrtc WebSocket client gives them in its URL's
        query (`/websocket/offer?voice=ravi&audio_temperature=0.6`, the names of /api/chat); the page
        as its inputs, which fastrtc stores as [WebRTCData, *inputs] or [marker, webrtc id, *inputs]
        (tracks.StreamHandler.set_args)."""
        ctx = current_context.get()
        if ctx is not None and ctx.websocket is not None:
            return {name: ctx.websocket.query_params.get(name) for name in INPUT_NAMES}
        args = self.latest_args if isinstance(self.latest_args, list) else []
        values = args[2:] if args[:1] == [WEBRTC_MARKER] else args[1:]
        return dict(zip(INPUT_NAMES, values))

    def _requested_settings(self) -> CallSettings:
        """Voice, emotion and sampling from the page's inputs (CatalogueError/SamplingError if bad)."""
        inputs = self._inputs()
        voice, emotion, text_prompt, voice_prompt = (inputs.get(k) if isinstance(inputs.get(k), str) else None
                                                     for k in ("voice", "emotion", "text_prompt", "voice_prompt"))
        return self.hub.catalogue.settings(voice, emotion, sampling_request(inputs), voice_prompt, text_prompt)

    # -- messages to the client -----------------------------------------------------------------

    def _notify(self, kind: str, message: str) -> None:
        """Send {"type": kind, "message": ...} over the data channel (WebRTC) or the WebSocket."""
        self._send({"type": kind, "message": message})

    def _send(self, message: dict[str, Any]) -> None:
        channel = self.channel
        if channel is None:
            return
        try:
            channel.send(json.dumps(message))
        except Exception:  # the client may already be gone
            log.debug("could not notify client", exc_info=True)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)
            self._notify("warning", message)

    def _wake(self) -> asyncio.Event:
        if self._activity is None:
            self._activity = asyncio.Event()
        return self._activity

    # -- session lifecycle ----------------------------------------------------------------------

    def _current(self) -> Session | None:
        """This connection's call; None once the call moved to a newer connection (resumed there)."""
        session = self.session
        if session is not None and session.connection != self._connection:
            self.session, self._refused = None, "This call continued on another connection."
            return None
        return session

    async def _ensure_session(self) -> Session | None:
        if self._current() is not None and not self.session.closed:
            return self.session
        if self._refused is not None or self._shut:
            return None
        if self.session is not None:
            # the engine freed the seat (no audio for a while, or a prompted call reached the
            # context): end that call properly first, tell the caller, start over below
            ended, self.session = self.session, None
            reason = ended.seat.closed_reason
            await self.hub.close_async(ended, "its seat was freed by the engine")
            self._notify("warning", f"The call starts over: {reason}")
        await self._await_inputs()
        try:
            try:
                settings = self._requested_settings()
            except (CatalogueError, SamplingError) as exc:
                raise CallRefused(str(exc)) from exc
            session = await self._open(settings)
        except CallRefused as exc:
            self._refused = str(exc)
            log.warning("call refused: %s", exc)
            self._notify("error", self._refused)
            self._wake().set()
            return None
        if self._shut:  # the client left while its call was opening
            await self.hub.close_async(session, "client left")
            return None
        self.session, self._connection = session, session.connection
        return session

    async def _open(self, settings: CallSettings) -> Session:
        """A new call, or the dropped call this connection's resume token names. The client is told
        which, with the token to resume this call if its connection drops."""
        token, resumed = self._resume_token(), False
        if token:
            try:
                session, resumed = await self.hub.open_async(self._call_id(), settings, resume_token=token), True
            except ResumeFailed as exc:
                self._notify("warning", f"{exc} Starting a new call.")
        if not resumed:
            session = await self.hub.open_async(self._call_id(), settings, self._client())
        self._send({"type": "call", "call_id": session.call_id, "resume_token": session.resume_token,
                    "resumed": resumed, "message": "call resumed" if resumed else "call started"})
        return session

    async def receive(self, frame: tuple[int, np.ndarray]) -> None:
        self._wake().set()
        session = await self._ensure_session()
        if session is None:  # refused: the client was told once, emit() closes the stream
            return
        try:
            rate, samples = frame
        except (TypeError, ValueError):
            self._warn_once("shape", "Ignored a malformed audio message (expected (rate, samples)).")
            return
        if session.over_time:
            self._end_call(f"This call reached its time limit of {session.max_seconds / 60:.0f} minutes.")
            return
        try:
            session.receive(rate, samples)
        except (AudioFormatError, ValueError) as exc:
            self._warn_once(f"bad:{type(exc).__name__}", f"Ignored audio the server cannot read: {exc}")
        except EngineStoppedError:
            pass  # seat freed (idle timeout or shutdown); the next chunk opens a new one
        self._apply_settings(session)

    def _apply_settings(self, session: Session) -> None:
        try:
            wanted = self._requested_settings()
        except (CatalogueError, SamplingError) as exc:
            self._warn_once(f"settings:{exc}", str(exc))
            return
        if wanted != session.settings:
            wanted = self._keep_prompt(session, wanted)
        if wanted != session.settings:
            if self.hub.route(wanted) is not session.engine:
                self._warn_once(f"model:{wanted.voice}", f"The voice {wanted.voice!r} runs on another model: "
                                "hang up and call again to switch to it.")
                return
            try:
                session.change_settings(wanted)
            except (ConditionError, SamplingError) as exc:
                self._warn_once(f"settings:{wanted}", str(exc))
                return
            log.info("call %s: settings -> %s", session.call_id, wanted)

    def _keep_prompt(self, session: Session, wanted: CallSettings) -> CallSettings:
        """On a model that takes prompts the voice, persona and emotion (carried by the persona) are
        the call's start: a change applies from the next call (the caller is told once); the rest
        applies now."""
        if session.engine.prompt_presets() is None:
            return wanted
        now = session.settings
        kept = replace(wanted, voice=now.voice, emotion=now.emotion, voice_prompt=now.voice_prompt,
                       text_prompt=now.text_prompt)
        if kept != wanted:
            self._warn_once(f"prompt:{wanted.voice}:{wanted.voice_prompt}:{wanted.text_prompt}",
                            "A new voice or persona applies from your next call (it is how the call starts).")
        return kept

    async def emit(self):
        session = self._current()
        if session is None or session.closed:
            if self._refused is not None and not self._closing_sent:
                self._closing_sent = True
                return CloseStream()
            wake = self._wake()  # nothing to send until the client speaks again: sleep until it does
            wake.clear()
            if self.session is not session:  # a call opened meanwhile
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), IDLE_WAIT_S)
            return None
        out = await session.wait_output(EMIT_WAIT_S)
        for notice in session.take_notices():
            self._notify("warning", notice)
        if out is None:
            return None
        return (SAMPLE_RATE, to_int16(out.pcm).reshape(1, -1))

    def _end_call(self, message: str) -> None:
        """End the call from the server side: tell the client, free the seat, close the stream."""
        self._refused = message
        self._notify("warning", message)
        self.shutdown()

    def shutdown(self) -> None:
        """The caller hung up (or the server ended the call): free the seat."""
        self._leave(dropped=False)

    def connection_dropped(self) -> None:
        """The connection broke without a hang-up: hold the call for the caller to resume (CallHub.drop).
        Call from the event loop."""
        self._leave(dropped=True)

    def _leave(self, dropped: bool) -> None:
        self._shut = True
        session, self.session = self._current(), None
        if session is not None:
            if dropped and not session.closed:
                self.hub.drop(session)
            else:
                self.hub.close_soon(session, "client left")
        if self._activity is not None:
            self._activity.set()


def hold_dropped_calls(connections: WebRTCConnectionMixin) -> None:
    """Make a WebRTC call whose connection breaks wait for its caller to resume it (CallHub.drop)
    instead of ending. For the page's WebRTC component, whose script reconnects with the call's
    resume token (ui.RECONNECT_JS); `/webrtc/offer` clients send no token, so their calls end.

    fastrtc ends a call the same way whether the caller hung up or the connection broke: on the
    peer connection's "failed" or "closed" state it closes it and calls the handler's `shutdown()`
    (and when ICE fails first, it forgets the connection without even that). With aiortc a broken
    network (ICE consent expired, RFC 7675) mostly shows as "closed" too: DTLS notices first and
    closes the connection. What tells them apart is the ICE transport: a broken one has gone
    "failed"; a hang-up (the page's Stop, `pc.close()`) closes DTLS and stops ICE without failing
    it. So each new peer connection gets a plain (not async) listener, which aiortc runs the moment
    the state changes, before fastrtc's own listener (a coroutine) runs: on a broken connection it
    holds the call, then cleans the connection up as fastrtc does for a closed one (whose
    `shutdown()` then finds no call to end)."""
    handle_offer = connections.handle_offer

    async def handle_offer_watching_drops(body: dict[str, Any], set_outputs):
        answer = await handle_offer(body, set_outputs)
        call_id = body.get("webrtc_id") if body.get("sdp") else None  # ICE candidates come this way too
        pc, handler = connections.pcs.get(call_id), connections.handlers.get(call_id)
        if pc is not None and isinstance(handler, MoshiHandler):
            def on_state_change() -> None:
                if pc.connectionState in ("failed", "closed") and ice_failed(pc):
                    log.info("call %s: the WebRTC connection broke", call_id)
                    handler.connection_dropped()
                    for track in connections.clean_up(call_id):
                        track.stop()
            pc.on("connectionstatechange", on_state_change)
        return answer

    connections.handle_offer = handle_offer_watching_drops  # type: ignore[method-assign]


def ice_failed(pc: RTCPeerConnection) -> bool:
    """Whether the connection's ICE transport broke (aiortc: consent expired, or its socket was lost)."""
    return pc.connectionState == "failed" or any(
        t.receiver.transport.transport.state == "failed" for t in pc.getTransceivers())


def note_offers(component: WebRTC, hub: CallHub) -> None:
    """Make the page's WebRTC component note which address offered each call (CallHub.note_offer),
    so the per-client call cap counts the page's calls too: the media path never sees the address.
    Gradio calls a component's server function by name, with the request when it asks for one."""
    offer = component.offer

    async def offer_noting_client(body, request: gr.Request):
        if isinstance(body, dict) and body.get("sdp"):
            hub.note_offer(str(body.get("webrtc_id")), request.client.host if request.client else None)
        return await offer(body)

    offer_noting_client._is_server_fn = True  # type: ignore[attr-defined]  # gradio's @server mark
    component.offer = offer_noting_client  # type: ignore[method-assign]
