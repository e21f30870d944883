"""One call: a seat in the engine, the input path, both VAD streams, the transcript and its figures.

A transport (the fastrtc handler) calls `receive()` with whatever audio it has and `next_output()`
for the agent's next 80 ms; it never touches the engine directly. Calls open through the hub
(agent.calls.hub); the registry (agent.calls.registry) finds them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from agent import FRAME_SECONDS, SAMPLE_RATE
from agent.audio.stream import ChunkReport, InputAudio
from agent.calls.vad import TurnLatencyTracker, VadHub
from agent.calls.wakeups import LoopWaker
from agent.engine import FrameEngine, OutputFrame, Seat
from agent.engine.prompts import PromptSpec
from agent.engine.sampling import SeatSampling
from agent.ops.metrics import RollingWindow
from agent.voices import CallSettings

log = logging.getLogger(__name__)

TRANSCRIPT_CHARS = 4000


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

    def input_missing(self) -> int:
        """24 kHz input samples the next frame still lacks: a transport that gathers packets hands
        them over once they complete it, so the frame is not delayed."""
        return self._input.framer.frame_size - self._input.framer.pending

    async def wait_output(self, timeout: float) -> OutputFrame | None:
        """`next_output` for a coroutine: waits on the event loop, woken by the engine's thread when a
        frame, a notice or the end of the call arrives; no thread is held while it waits. None on
        timeout, or at once when the call is closed."""
        if self._output_ready is None:
            waker, ready = LoopWaker.of(asyncio.get_running_loop()), asyncio.Event()
            self._output_ready = ready
            self.seat.on_change(lambda: waker.wake(ready))  # one loop wake-up per tick for all its calls
        ready = self._output_ready
        ready.clear()
        frame = self.next_output(0)
        if frame is not None or self.closed:
            return frame
        try:
            async with asyncio.timeout(timeout):  # no task per frame, as wait_for made
                await ready.wait()
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
