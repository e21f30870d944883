"""The fastrtc handler: one per connection (WebRTC from the page, or fastrtc's WebSocket protocol).

It turns transport calls into session calls and nothing more. `receive` runs in fastrtc's worker
threads and only queues frames; the Moshi step runs on the engine's own thread, so a slow step
never blocks receiving. `emit` waits on the session's output queue (see EMIT_WAIT_S).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
from fastrtc import StreamHandler
from fastrtc.utils import CloseStream, current_context

from agent import SAMPLE_RATE
from agent.audio import AudioFormatError, to_int16
from agent.engine import ConditionError, EngineStoppedError
from agent.sampling import SamplingError, sampling_request
from agent.session import CallHub, CallRefused, Session
from agent.voices import CallSettings, CatalogueError

log = logging.getLogger(__name__)

# fastrtc's WebSocket path queues whatever emit() returns, None included, and sends one item per
# 20 ms at most: an emit that gave up every 20 ms fed it faster than it drains, and the agent's
# audio fell seconds behind over a long call. Waiting up to 100 ms keeps it to ~12.5 frames a second.
EMIT_WAIT_S = 0.1
# The page's inputs after the call component, in order (ui.build_demo); other clients may send fewer.
INPUT_NAMES = ("voice", "emotion", "text_temperature", "text_topk", "audio_temperature", "audio_topk",
               "text_prompt", "voice_prompt")
WEBRTC_MARKER = "__webrtc_value__"


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
            if self.session is not None:
                if not self.session.closed:
                    return self.session
                # the engine freed the seat (no audio for a while, or a prompted call reached the
                # context): end that call properly first, tell the caller, start over below
                reason = self.session.seat.closed_reason
                self.hub.close(self.session, "its seat was freed by the engine")
                self._notify("warning", f"The call starts over: {reason}")
            if self._refused is not None:
                return None
            try:
                try:
                    settings = self._requested_settings()
                except (CatalogueError, SamplingError) as exc:
                    raise CallRefused(str(exc)) from exc
                self.session = self.hub.open(self._call_id(), settings)
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
