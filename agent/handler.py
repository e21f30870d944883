"""The fastrtc handler: one per connection (WebRTC from the page, or fastrtc's WebSocket protocol).

It turns transport calls into session calls and nothing more. `receive` runs in fastrtc's worker
threads and only queues frames; the Moshi step runs on the engine's own thread, so a slow step
never blocks receiving. `emit` waits briefly on the session's output queue (fastrtc's WebSocket
path calls it in a tight loop; returning None at once would flood the send queue).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any

import numpy as np
from fastrtc import StreamHandler
from fastrtc.utils import CloseStream, current_context

from agent import SAMPLE_RATE
from agent.audio import AudioFormatError, to_int16
from agent.engine import ConditionError, EngineStoppedError
from agent.session import CallHub, CallRefused, Session
from agent.voices import CallSettings, CatalogueError

log = logging.getLogger(__name__)

EMIT_WAIT_S = 0.02


class MoshiHandler(StreamHandler):
    def __init__(self, hub: CallHub, input_sample_rate: int = SAMPLE_RATE):
        super().__init__(expected_layout="mono", output_sample_rate=SAMPLE_RATE,
                         input_sample_rate=input_sample_rate)
        self.hub = hub
        self.session: Session | None = None
        self._refused: str | None = None
        self._closing_sent = False
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def copy(self) -> "MoshiHandler":
        return MoshiHandler(self.hub, self.input_sample_rate)

    # -- connection identity and UI inputs -------------------------------------------------------

    def _call_id(self) -> str:
        ctx = current_context.get()
        return ctx.webrtc_id if ctx is not None and ctx.webrtc_id else f"call-{uuid.uuid4().hex[:12]}"

    def _requested_settings(self) -> CallSettings:
        """Voice and emotion from the page's inputs (latest_args: [webrtc value, voice, emotion])."""
        args: list[Any] = [a for a in self.latest_args if isinstance(a, str) and a != "__webrtc_value__"]
        voice = next((a for a in args if a in {v.id for v in self.hub.catalogue.voices}), None)
        emotion = next((a for a in args if a in {e.id for e in self.hub.catalogue.emotions}), None)
        return self.hub.catalogue.settings(voice, emotion)

    # -- messages to the client -----------------------------------------------------------------

    def _notify(self, kind: str, message: str) -> None:
        """Send {"type": kind, "message": ...} over the data channel (WebRTC) or the WebSocket."""
        channel = self.channel
        if channel is None:
            return
        payload = json.dumps({"type": kind, "message": message})
        try:
            self.loop.call_soon_threadsafe(channel.send, payload)
        except Exception:  # the client may already be gone
            log.debug("could not notify client", exc_info=True)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)
            self._notify("warning", message)

    # -- session lifecycle ----------------------------------------------------------------------

    def _ensure_session(self) -> Session | None:
        with self._lock:
            if self.session is not None and not self.session.closed:
                return self.session
            if self._refused is not None:
                return None
            try:
                self.session = self.hub.open(self._call_id(), self._requested_settings())
            except CallRefused as exc:
                self._refused = str(exc)
                log.warning("call refused: %s", exc)
                self._notify("error", self._refused)
                return None
            return self.session

    def receive(self, frame: tuple[int, np.ndarray]) -> None:
        session = self._ensure_session()
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
        except CatalogueError as exc:
            self._warn_once("settings", str(exc))
            return
        if wanted != session.settings:
            if self.hub.route(wanted) is not session.engine:
                self._warn_once(f"model:{wanted.voice}", f"The voice {wanted.voice!r} runs on another model: "
                                "hang up and call again to switch to it.")
                return
            try:
                session.change_settings(wanted)
            except ConditionError as exc:
                self._warn_once(f"cond:{wanted}", str(exc))
                return
            log.info("call %s: voice/emotion -> %s", session.call_id, wanted)

    def emit(self):
        session = self.session
        if session is None:
            if self._refused is not None and not self._closing_sent:
                self._closing_sent = True
                return CloseStream()
            threading.Event().wait(EMIT_WAIT_S)
            return None
        out = session.next_output(timeout=EMIT_WAIT_S)
        if out is None:
            return None
        return (SAMPLE_RATE, to_int16(out.pcm).reshape(1, -1))

    def _end_call(self, message: str) -> None:
        """End the call from the server side: tell the client, free the seat, close the stream."""
        with self._lock:
            self._refused = message
        self._notify("warning", message)
        self.shutdown()

    def shutdown(self) -> None:
        with self._lock:
            session, self.session = self.session, None
        if session is not None:
            self.hub.close(session, "client left")
