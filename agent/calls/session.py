"""One call: a seat in the engine, the input path, both VAD streams, the transcript and its figures.

A transport (the fastrtc handler) calls `receive()` with whatever audio it has and `next_output()`
for the agent's next 80 ms; it never touches the engine directly.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from agent import FRAME_SECONDS, SAMPLE_RATE
from agent.audio.stream import ChunkReport, InputAudio
from agent.calls.vad import TurnLatencyTracker, VadHub
from agent.engine import FrameEngine, OutputFrame, Seat
from agent.engine.prompts import PromptSpec
from agent.engine.sampling import SeatSampling
from agent.errors import (
    CallRefused,
    CatalogueError,
    ConditionError,
    EngineStoppedError,
    PromptError,
    ResumeFailed,
    SamplingError,
    SeatsFullError,
)
from agent.ops.metrics import RollingWindow
from agent.voices import CallSettings, Catalogue

log = logging.getLogger(__name__)

TRANSCRIPT_CHARS = 4000
# Opening and ending calls (a seat, conditioning rows, the VAD's last judgement) runs on these few
# threads, never on the event loop and never on a thread per call.
CALL_SETUP_WORKERS = 4
MAX_PENDING_OFFERS = 1024  # WebRTC offers whose call has not opened yet (their client, for the cap)
# WebSocket close codes that mean the caller left; any other end (1006: no close frame) is a dropped
# connection, whose call waits for the caller to resume it (CallHub.drop)
WEBSOCKET_HANG_UP_CODES = frozenset({1000, 1001})


@dataclass
class SessionFigures:
    """A snapshot for the readouts (UI, logs, tests)."""

    call_id: str
    seat: int
    seconds: float
    settings: CallSettings
    transcript: str
    frames_in: int
    frames_out: int
    input_dropped: int
    output_dropped: int
    frozen_ticks: int
    bad_chunks: int
    non_finite_samples: int
    frame_latency_ms: dict[str, float | None]
    turn_latencies_ms: list[float | None]
    latency_series: list[tuple[float, float]] = field(default_factory=list)
    closed_reason: str | None = None
    conditioned: bool = False  # the LM is conditioned on this call's voice and emotion
    sampling: SeatSampling | None = None  # how the LM samples this call (once the engine applied it)


class Session:
    def __init__(self, engine: FrameEngine, call_id: str, settings: CallSettings, silence_ms: int = 300,
                 max_seconds: float | None = None, on_turn_latency: Callable[[float], None] | None = None,
                 vad: VadHub | None = None, client: str | None = None):
        """`vad`: the hub that judges this call's audio with every other call's; None judges it
        here, on the transport's threads (one call alone: tools and tests). `client`: the caller's
        address, for the per-client call cap."""
        self.call_id = call_id
        self.client = client
        self.resume_token = secrets.token_urlsafe(18)  # the caller's key to come back after a dropped connection
        self.dropped_at: float | None = None  # while its connection is down (the seat is held)
        self.connection = 0  # which connection carries the call: +1 on each resume (the old one lets go)
        self.settings = settings
        self.engine = engine
        self.seat: Seat = engine.acquire(call_id)  # raises SeatsFullError
        self._available_conditions = engine.condition_values
        try:
            self._apply(settings)
        except ValueError:
            self.seat.release("settings not available")
            raise
        self.started_at = time.monotonic()
        self._input = InputAudio()
        self._input_report = ChunkReport()
        self.bad_chunks = 0
        self.max_seconds = max_seconds
        self.latency = TurnLatencyTracker(silence_ms=silence_ms, on_latency=on_turn_latency, label=call_id)
        self._vad = vad
        if vad is not None:
            vad.add(self.latency)
        # input frame complete -> its output frame handed to the transport (so a transport that
        # reads late shows here, not only a slow step)
        self.frame_latency = RollingWindow()
        self._transcript: deque[str] = deque()
        self._transcript_chars = 0
        self._lock = threading.Lock()
        self._output_ready: asyncio.Event | None = None  # set from the engine's thread (wait_output)
        log.info("call %s started on seat %d (%s, %s)", call_id, self.seat.index, settings.voice, settings.emotion)

    @property
    def closed(self) -> bool:
        return self.seat.closed

    @property
    def over_time(self) -> bool:
        return self.max_seconds is not None and time.monotonic() - self.started_at > self.max_seconds

    @property
    def dropped(self) -> bool:
        return self.dropped_at is not None

    def hold(self) -> None:
        """The caller's connection dropped: freeze the seat (LM context kept, not stepped)."""
        self.dropped_at = time.monotonic()
        self.seat.hold(True)
        self._output_ready = None  # a reconnection waits on its own event loop
        log.info("call %s: connection dropped; seat %d held for the caller to resume", self.call_id, self.seat.index)

    def resume(self) -> None:
        """The caller is back on a new connection: the seat steps again from where it stopped. (The
        old connection may not have been seen to drop yet; it lets go, see `connection`.)"""
        away = time.monotonic() - (self.dropped_at or time.monotonic())
        self.connection += 1
        if self.dropped_at is not None:
            self.dropped_at = None
            self.seat.hold(False)
        self._output_ready = None
        log.info("call %s resumed after %.1f s away", self.call_id, away)

    def change_settings(self, settings: CallSettings) -> None:
        """A new voice/emotion/sampling takes effect on this call's next frame (ConditionError if the
        model does not know the voice, SamplingError for sampling out of range; the call keeps its
        current settings then)."""
        self._apply(settings)
        self.settings = settings

    def sampling(self, settings: CallSettings) -> SeatSampling:
        """The sampling these settings mean on this call's engine (its defaults, then the request)."""
        return self.engine.sampler.default.with_request(settings.sampling)

    def _apply(self, settings: CallSettings) -> None:
        sampling = self.sampling(settings).checked(self.engine.sampler.config)  # check both before either
        self.seat.set_conditions(settings.conditions(self._available_conditions))
        self.seat.set_sampling(sampling)

    def start_from_prompt(self, spec: PromptSpec) -> None:
        """Run this call on a voice/text prompt from its next frame (PromptError if the model cannot
        take it). A new prompt starts the conversation over."""
        self.seat.set_prompt(spec)

    def receive(self, rate: int, samples: np.ndarray) -> None:
        """Any client chunk in (raises AudioFormatError for audio it cannot read)."""
        arrived = time.monotonic()
        try:
            frames = self._input.push(rate, samples, self._input_report)
        except ValueError:
            self.bad_chunks += 1
            raise
        pending_s = self._input.framer.pending / SAMPLE_RATE
        for k, frame in enumerate(frames):
            done_at = arrived - pending_s - (len(frames) - 1 - k) * FRAME_SECONDS
            self.seat.push(frame, done_at)
            self.latency.on_user_audio(frame, done_at - FRAME_SECONDS)
        if self._vad is None:
            self.latency.process()

    async def wait_output(self, timeout: float) -> OutputFrame | None:
        """`next_output` for a coroutine: waits on the event loop, woken by the engine's thread when a
        frame, a notice or the end of the call arrives; no thread is held while it waits. None on
        timeout, or at once when the call is closed."""
        if self._output_ready is None:
            loop, ready = asyncio.get_running_loop(), asyncio.Event()
            self._output_ready = ready
            self.seat.on_change(lambda: loop.call_soon_threadsafe(ready.set))
        ready = self._output_ready
        ready.clear()
        frame = self.next_output(0)
        if frame is not None or self.closed:
            return frame
        try:
            await asyncio.wait_for(ready.wait(), timeout)
        except TimeoutError:
            return None
        return self.next_output(0)

    def take_notices(self) -> list[str]:
        """What the caller should be told since the last call (e.g. the engine reset this call)."""
        return self.seat.take_notices()

    def next_output(self, timeout: float) -> OutputFrame | None:
        """The agent's next frame, waiting up to `timeout`; None if none is ready."""
        frame = self.seat.pull(timeout)
        if frame is None:
            return None
        now = time.monotonic()
        self.frame_latency.add(1e3 * (now - frame.input_done_at))
        self.latency.on_agent_audio(frame.pcm, now)
        if self._vad is None:
            self.latency.process()
        if frame.text:
            with self._lock:
                self._transcript.append(frame.text)
                self._transcript_chars += len(frame.text)
                while self._transcript_chars > TRANSCRIPT_CHARS:
                    self._transcript_chars -= len(self._transcript.popleft())
        return frame

    @property
    def transcript(self) -> str:
        with self._lock:
            return "".join(self._transcript).strip()

    def figures(self) -> SessionFigures:
        c = self.seat.counters
        turns = list(self.latency.turns)
        return SessionFigures(
            call_id=self.call_id, seat=self.seat.index, seconds=time.monotonic() - self.started_at,
            settings=self.settings, transcript=self.transcript, frames_in=c.frames_in, frames_out=c.frames_out,
            input_dropped=c.input_dropped, output_dropped=c.output_dropped, frozen_ticks=c.frozen_ticks,
            bad_chunks=self.bad_chunks, non_finite_samples=self._input_report.non_finite,
            frame_latency_ms={"last": self.frame_latency.last, "p50": self.frame_latency.percentile(50),
                              "p95": self.frame_latency.percentile(95)},
            turn_latencies_ms=[t.latency_ms for t in turns if t.closed],
            latency_series=self.latency.latencies.items(),
            closed_reason=self.seat.closed_reason,
            conditioned=self._conditioned(),
            sampling=self.seat.sampling,
        )

    def _conditioned(self) -> bool:
        """The LM already runs this call on the voice and emotion chosen (applied at a tick)."""
        wanted = self.settings.conditions(self._available_conditions)
        return bool(wanted) and all(self.seat.conditions.get(k) == v for k, v in wanted.items())

    def close(self, reason: str = "call ended") -> None:
        if not self.seat.closed:
            log.info("call %s ended: %s (%d frames in, %d out)", self.call_id, reason,
                     self.seat.counters.frames_in, self.seat.counters.frames_out)
        self.seat.release(reason)
        if self._vad is not None:
            self._vad.remove(self.latency)


class SessionRegistry:
    """Live calls by connection id, so readouts (UI timers, /metrics) can find them. A resumed call
    is found by its first connection's id (its call id) and by each later connection's."""

    def __init__(self, keep_closed: int = 32, keep_links: int = 1024):
        self._live: dict[str, Session] = {}
        self._recent: deque[Session] = deque(maxlen=keep_closed)
        self._links: OrderedDict[str, str] = OrderedDict()  # a later connection's id -> its call id
        self._keep_links = keep_links
        self._lock = threading.Lock()

    def add(self, session: Session) -> None:
        with self._lock:
            self._live[session.call_id] = session

    def remove(self, session: Session) -> None:
        with self._lock:
            if self._live.get(session.call_id) is session:
                del self._live[session.call_id]
                self._recent.append(session)

    def link(self, connection_id: str, session: Session) -> None:
        """`connection_id` now carries `session` (a resumed call): `get` finds the call by it too."""
        if connection_id == session.call_id:
            return
        with self._lock:
            self._links[connection_id] = session.call_id
            while len(self._links) > self._keep_links:
                self._links.popitem(last=False)

    def is_live(self, call_id: str) -> bool:
        with self._lock:
            return call_id in self._live

    def calls_from(self, client: str) -> int:
        """Live calls whose caller is at this address."""
        with self._lock:
            return sum(1 for s in self._live.values() if s.client == client)

    def get(self, call_id: str | None) -> Session | None:
        if not call_id:
            return None
        with self._lock:
            call_id = self._links.get(call_id, call_id)
            found = self._live.get(call_id)
            if found is None:
                found = next((s for s in reversed(self._recent) if s.call_id == call_id), None)
            return found

    def live(self) -> list[Session]:
        with self._lock:
            return list(self._live.values())






@dataclass
class CallHub:
    """What every transport (fastrtc handler, Kyutai's /api/chat) shares to open and end calls.
    With several models loaded (e.g. Kyutai's Moshiko and Moshika), each call goes to the engine
    whose model has the voice it asks for."""

    engines: list[FrameEngine]
    registry: SessionRegistry
    catalogue: Catalogue
    silence_ms: int = 300
    max_call_seconds: float | None = None
    on_turn_latency: Callable[[float], None] | None = None
    vad: VadHub | None = None  # judges every call's audio in one batch (None: each call on its own)
    max_calls_per_client: int | None = None  # live calls from one address, whatever the transport
    resume_seconds: float = 0.0  # how long a dropped call's seat waits for its caller (0: closed at once)
    draining: bool = False

    def __post_init__(self):
        self._admit = threading.Lock()  # check-then-add of the cap and the call id is one step
        self._offers: OrderedDict[str, str] = OrderedDict()  # WebRTC call id -> the address that offered it
        self._by_token: dict[str, Session] = {}  # resume token -> live call
        self._workers = ThreadPoolExecutor(CALL_SETUP_WORKERS, thread_name_prefix="call-setup")

    def route(self, settings: CallSettings) -> FrameEngine:
        """The engine whose model has this voice; the first engine if none has it."""
        for engine in self.engines:
            support = self.catalogue.voice_support(engine.model.name, engine.condition_values,
                                                   engine.prompt_presets())
            if support[settings.voice].supported:
                return engine
        return self.engines[0]

    def note_offer(self, call_id: str, client: str | None) -> None:
        """A WebRTC offer for `call_id` came from `client`: its call counts against that address
        (WebRTC calls open later, on the media path, where the address is not known)."""
        if not client:
            return
        with self._admit:
            self._offers[call_id] = client
            while len(self._offers) > MAX_PENDING_OFFERS:
                self._offers.popitem(last=False)

    def open(self, call_id: str, settings: CallSettings, client: str | None = None,
             resume_token: str | None = None) -> Session:
        """A new call on a free seat, or CallRefused with a message for the caller. `client` is the
        caller's address (for a WebRTC call, the one that sent its offer, see note_offer). With the
        resume token of a call whose connection dropped, that same call (its seat, its conversation)
        if it is still held; ResumeFailed if not (the caller may then start a new call)."""
        if resume_token:
            return self._resume(resume_token, call_id)
        engine = self.route(settings)
        prompt = self.prompt(engine, settings)
        with self._admit:
            client = client or self._offers.pop(call_id, None)
            if self.draining:
                raise CallRefused("The server is restarting; please reconnect in a moment.")
            if self.registry.is_live(call_id):  # never end or take over a live call by its id
                raise CallRefused("A call with this id is already live on this server.")
            cap = self.max_calls_per_client
            if cap and client and self.registry.calls_from(client) >= cap:
                raise CallRefused(f"At most {cap} call{'s' if cap > 1 else ''} from one address at once: "
                                  "hang up another call first.")
            try:
                session = Session(engine, call_id, settings, self.silence_ms, self.max_call_seconds,
                                  self.on_turn_latency, self.vad, client=client)
            except (SeatsFullError, EngineStoppedError) as exc:
                raise CallRefused(str(exc)) from exc
            except ConditionError as exc:
                raise CallRefused(f"That voice or emotion is not available on this model: {exc}") from exc
            except SamplingError as exc:
                raise CallRefused(f"Those sampling settings are not allowed: {exc}") from exc
            self.registry.add(session)
            self._by_token[session.resume_token] = session
        if prompt is not None:  # outside the admission lock: a new voice prompt is encoded here
            try:
                session.start_from_prompt(prompt)
            except PromptError as exc:
                self.close(session, "prompt refused")
                raise CallRefused(f"That voice or persona prompt cannot be used: {exc}") from exc
        return session

    def prompt(self, engine: FrameEngine, settings: CallSettings) -> PromptSpec | None:
        """The voice/text prompt a call runs on, if its model takes prompts (CallRefused if the
        caller named a voice that is not offered; a model without prompts ignores them)."""
        presets = engine.prompt_presets()
        if presets is None:
            return None
        try:
            return PromptSpec(self.catalogue.prompt_voice(settings, presets), self.catalogue.prompt_text(settings))
        except CatalogueError as exc:
            raise CallRefused(f"That voice or persona prompt cannot be used: {exc}") from exc

    def close(self, session: Session, reason: str) -> None:
        with self._admit:
            if self._by_token.get(session.resume_token) is session:
                del self._by_token[session.resume_token]
        session.close(reason)
        self.registry.remove(session)

    def drop(self, session: Session) -> None:
        """The caller's connection dropped without a hang-up: hold the call for `resume_seconds`
        (its seat frozen), then close it unless the caller came back with its resume token. Call
        from the event loop (the expiry is scheduled there; no thread waits)."""
        if not self.resume_seconds or session.closed or self.draining:
            self.close_soon(session, "connection dropped")
            return
        with self._admit:
            session.hold()
            dropped_at = session.dropped_at
        asyncio.get_running_loop().call_later(self.resume_seconds, self._expire, session, dropped_at)

    def _expire(self, session: Session, dropped_at: float | None) -> None:
        with self._admit:
            if session.dropped_at != dropped_at:
                return  # resumed (and maybe dropped again since: that drop has its own expiry)
        self.close_soon(session, f"connection dropped and not resumed within {self.resume_seconds:g} s")

    def _resume(self, token: str, connection_id: str) -> Session:
        with self._admit:
            session = self._by_token.get(token)
            if session is None or session.closed:
                raise ResumeFailed("That call can no longer be resumed (it ended, or its time to reconnect ran out).")
            session.resume()
            self.registry.link(connection_id, session)
        return session

    async def open_async(self, call_id: str, settings: CallSettings, client: str | None = None,
                         resume_token: str | None = None) -> Session:
        """`open` on the call-setup threads, so the event loop never waits for it."""
        return await asyncio.get_running_loop().run_in_executor(self._workers, self.open, call_id, settings, client,
                                                                resume_token)

    async def close_async(self, session: Session, reason: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._workers, self.close, session, reason)

    def close_soon(self, session: Session, reason: str) -> None:
        """`close` on the call-setup threads; returns at once (sync callers on the event loop)."""
        def done(future) -> None:
            if future.exception() is not None:
                log.error("call %s did not close cleanly", session.call_id, exc_info=future.exception())
        self._workers.submit(self.close, session, reason).add_done_callback(done)

    def stop(self) -> None:
        self._workers.shutdown(wait=True, cancel_futures=False)
