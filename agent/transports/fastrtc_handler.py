"""The fastrtc handler: one per connection (WebRTC from the page, or fastrtc's WebSocket protocol).

It turns transport calls into call calls and nothing more: `receive`, `emit`, `copy`, and the
`shutdown` fastrtc calls when the caller hangs up. It is an `AsyncStreamHandler`: both `receive`
and `emit` are coroutines on the event loop, so a call holds no thread. `receive` only resamples and
queues frames (the Moshi step runs on the engine's own thread); `emit` awaits the call's next frame,
woken by the engine when it is produced (`Session.wait_output`). Opening and ending a call run on the
hub's call-setup threads (CallConnection); the call's settings are parsed when the inputs change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from typing import Any

import numpy as np
from fastrtc import AsyncStreamHandler, CloseStream, WebRTC

from agent import SAMPLE_RATE
from agent.audio.stream import to_int16
from agent.calls.hub import CallHub
from agent.calls.session import Session
from agent.errors import AudioFormatError, EngineStoppedError
from agent.transports import fastrtc_compat
from agent.transports.connection import CallConnection
from agent.transports.settings import PAGE_INPUTS, Requested, SettingsCache, resume_token

log = logging.getLogger(__name__)

# The longest emit() waits before returning None. fastrtc's WebSocket path queues whatever emit()
# returns, None included, and sends one item per 20 ms at most: returning None more often than
# that would make the agent's audio fall behind; returning at once would spin a core.
EMIT_WAIT_S = 0.1
# With no call (refused, or the engine freed the seat), emit() waits this long for the next chunk.
IDLE_WAIT_S = 1.0
# How long a page call waits for the page's inputs (its settings, a resume token) before it opens with
# the defaults: fastrtc asks the page for them over the data channel when the call starts.
INPUTS_WAIT_S = 2.0


class MoshiHandler(AsyncStreamHandler):
    def __init__(self, hub: CallHub, input_sample_rate: int = SAMPLE_RATE, await_inputs: bool = False):
        """`await_inputs`: open each call once its client sent its inputs (the page does, when fastrtc
        asks; a resumed call's token is one of them)."""
        super().__init__(expected_layout="mono", output_sample_rate=SAMPLE_RATE,
                         input_sample_rate=input_sample_rate)
        self.hub = hub
        self.await_inputs = await_inputs
        self.link = CallConnection(hub, self._send)
        self._stream_closed = False  # emit() returned CloseStream (once, after a refusal)
        self._activity: asyncio.Event | None = None  # set by receive(): emit() waits on it between calls
        self._requested = SettingsCache(hub.catalogue)
        self._fixed_inputs: dict[str, Any] | None = None  # a WebSocket call's: its URL query, read once

    def copy(self) -> MoshiHandler:
        return MoshiHandler(self.hub, self.input_sample_rate, self.await_inputs)

    @property
    def session(self) -> Session | None:
        return self.link.session

    async def receive(self, frame: tuple[int, np.ndarray]) -> None:
        self._wake().set()
        session = await self._call()
        if session is None:  # refused: the client was told once, emit() closes the stream
            return
        try:
            rate, samples = frame
        except (TypeError, ValueError):
            self.link.warn_once("shape", "Ignored a malformed audio message (expected (rate, samples)).")
            return
        if session.over_time:
            self.link.end(f"This call reached its time limit of {session.max_seconds / 60:.0f} minutes.")
            self.shutdown()
            return
        try:
            session.receive(rate, samples)
        except (AudioFormatError, ValueError) as exc:
            self.link.warn_once(f"bad:{type(exc).__name__}", f"Ignored audio the server cannot read: {exc}")
        except EngineStoppedError:
            pass  # seat freed (idle timeout or shutdown); the next chunk opens a new one
        wanted = self._wanted()
        if wanted.error is not None:
            self.link.warn_once(f"settings:{wanted.error}", wanted.error)
        else:
            self.link.apply(session, wanted.settings)

    def input_samples_wanted(self) -> int:
        """How many input samples (at `input_sample_rate`) to gather before the next `receive()`: what
        the call's next frame lacks, so a WebRTC call hands over one chunk per frame without delaying
        it (fastrtc_compat.PacketAudioCallback); 1 (at once) with no call, whose first chunk opens it."""
        session = self.link.current()
        if session is None or session.closed:
            return 1
        return max(1, math.ceil(session.input_missing() * self.input_sample_rate / SAMPLE_RATE))

    async def emit(self):
        session = self.link.current()
        if session is None or session.closed:
            if self.link.ended is not None and not self._stream_closed:
                self._stream_closed = True
                return CloseStream()
            wake = self._wake()  # nothing to send until the client speaks again: sleep until it does
            wake.clear()
            if self.link.session is not session:  # a call opened meanwhile
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), IDLE_WAIT_S)
            return None
        out = await session.wait_output(EMIT_WAIT_S)
        for notice in session.take_notices():
            self.link.notify("warning", notice)
        if out is None:
            return None
        return (SAMPLE_RATE, to_int16(out.pcm).reshape(1, -1))

    def shutdown(self) -> None:
        """The caller hung up (or the server ended the call): free the seat."""
        self._leave(dropped=False)

    def connection_dropped(self) -> None:
        """The connection broke without a hang-up: hold the call for the caller to resume (CallHub.drop).
        Call from the event loop."""
        self._leave(dropped=True)

    def _leave(self, dropped: bool) -> None:
        self.link.leave(dropped)
        if self._activity is not None:
            self._activity.set()

    async def _call(self) -> Session | None:
        """This connection's live call, opened (or resumed) on its first chunk."""
        link = self.link
        session = link.current()
        if session is not None and not session.closed:
            return session
        if link.ended is not None or link.left:
            return None
        await link.replace_freed()
        if self.await_inputs and not self.args_set.is_set():  # fastrtc asks the page for its inputs
            try:
                await asyncio.wait_for(self.wait_for_args(), INPUTS_WAIT_S)
            except TimeoutError:
                log.warning("no inputs from the client within %.0f s: the call opens with the defaults",
                            INPUTS_WAIT_S)
        wanted = self._wanted()
        call_id, websocket = fastrtc_compat.connection()
        client = websocket.client if websocket is not None else None
        if wanted.error is None:
            session = await link.open(wanted.settings, call_id or f"call-{uuid.uuid4().hex[:12]}",
                                      client.host if client is not None else None, resume_token(self._inputs()))
        else:
            session = None
            link.refuse(wanted.error)
        if link.ended is not None:
            self._wake().set()
        return session

    def _wanted(self) -> Requested:
        """What the client's inputs ask for (a WebSocket client's URL query, or the page's inputs),
        parsed only when they change."""
        return self._requested.get(self._inputs())

    def _inputs(self) -> dict[str, Any]:
        if self._fixed_inputs is not None:
            return self._fixed_inputs
        inputs = fastrtc_compat.handler_inputs(self, PAGE_INPUTS)
        if fastrtc_compat.connection()[1] is not None:  # a WebSocket's URL query does not change
            self._fixed_inputs = inputs
        return inputs

    def _send(self, message: dict[str, Any]) -> None:
        """To the client over the data channel (WebRTC) or the WebSocket."""
        channel = self.channel
        if channel is None:
            return
        try:
            channel.send(json.dumps(message))
        except Exception:  # the client may already be gone
            log.debug("could not notify client", exc_info=True)

    def _wake(self) -> asyncio.Event:
        if self._activity is None:
            self._activity = asyncio.Event()
        return self._activity


def watch_page_calls(component: WebRTC, hub: CallHub) -> None:
    """The page's WebRTC component: each offer notes its caller's address (CallHub.note_offer, so the
    per-client cap counts the page's calls too), and a call whose connection breaks waits for the page
    to resume it (CallHub.drop) instead of ending; `/webrtc/offer` clients send no token, so theirs end."""
    fastrtc_compat.note_page_offers(component, hub.note_offer)
    fastrtc_compat.hold_dropped_calls(component, MoshiHandler, MoshiHandler.connection_dropped)
