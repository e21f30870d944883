"""A caller's place in the batch: bounded queues in and out, its own counters, its settings.

Jitter policy (per seat, counted in `SeatCounters`):
- input backlog is bounded (`EngineConfig.input_queue_frames`); when full the oldest frame is dropped;
- output backlog is bounded (`EngineConfig.output_queue_frames`); when full the oldest frame is dropped;
- a seat whose input is late sits the tick out (frozen) and never delays the others by more than a frame;
- a seat that sends nothing for `idle_timeout_s` is freed (its client vanished; agent/engine/loop.py);
- a held seat (`Seat.hold`: its caller's connection dropped and may come back) is neither stepped
  nor freed for idleness, and other seats do not wait for it; its LM context stays as it was.

Drops are also added to engine-wide totals (`DropTotals`, the engine's `EngineStats`), which outlive
the seat.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent import FRAME_SIZE
from agent.config import EngineConfig
from agent.engine.prompts import PromptSpec
from agent.engine.sampling import SeatSampling
from agent.errors import EngineStoppedError


@dataclass
class OutputFrame:
    """One 80 ms frame of the agent, produced by one batched step."""

    pcm: np.ndarray  # FRAME_SIZE float32 samples at 24 kHz
    text: str  # the decoded text piece, '' when the model emitted padding
    text_token: int
    input_done_at: float  # time.monotonic() when the input frame that produced it was complete
    produced_at: float  # time.monotonic() when the step finished
    voiced: bool  # False while the model's acoustic delay has not produced audio yet


@dataclass
class SeatCounters:
    frames_in: int = 0
    frames_out: int = 0
    input_dropped: int = 0  # oldest input frames dropped: client sent faster than real time
    output_dropped: int = 0  # oldest output frames dropped: client did not read its audio
    frozen_ticks: int = 0  # ticks this seat sat out because its input was late
    non_finite_frames: int = 0  # frames that carried NaN/Inf (zeroed before the model)


class DropTotals(Protocol):
    """The engine-wide drop counts a seat adds to (written with the engine lock held)."""

    input_dropped: int
    output_dropped: int


class SeatHost(Protocol):
    """What a seat forwards to its engine: the settings that take effect at a tick, and its release."""

    def release(self, seat: Seat, reason: str) -> None: ...
    def set_conditions(self, seat: Seat, conditions: dict[str, str]) -> None: ...
    def set_sampling(self, seat: Seat, settings: SeatSampling) -> None: ...
    def set_prompt(self, seat: Seat, spec: PromptSpec) -> None: ...


class Seat:
    """A caller's place in the batch: push input frames, pull output frames. Thread-safe.

    The caller's side is push/pull/hold/release and the settings; the engine's side (`take_input`,
    `deliver`, `tell`, `mark_closed`) is called by the engine with its lock held. Seat and engine
    share one lock, which the engine hands over at construction."""

    def __init__(self, host: SeatHost, index: int, owner: str, config: EngineConfig,
                 lock: threading.Lock, engine_wake: threading.Condition, totals: DropTotals):
        self.index = index
        self.owner = owner
        self.counters = SeatCounters()
        self.closed_reason: str | None = None
        self.conditions: dict[str, str] = {}  # what the LM is conditioned on for this seat, once applied
        self.sampling: SeatSampling | None = None  # how this seat is sampled, once applied
        self.prompt: PromptSpec | None = None  # the voice/text prompt this seat runs on, once restored
        self.last_input_at = time.monotonic()
        self.held = False  # frozen while its caller reconnects (hold)
        self._host = host
        self._totals = totals
        self._lock = lock  # the engine's: a tick takes every seat's frame at once
        self._engine_wake = engine_wake  # tells the engine's loop that input arrived
        self._inputs: deque[tuple[np.ndarray, float]] = deque()
        self._outputs: deque[OutputFrame] = deque()
        self._notices: deque[str] = deque(maxlen=8)  # messages for the caller (e.g. a failed step)
        self._listeners: list[Callable[[], Callable[[], None] | None]] = []
        self._max_in = config.input_queue_frames
        self._max_out = config.output_queue_frames
        self._out_ready = threading.Condition(lock)

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    @property
    def input_backlog(self) -> int:
        """Input frames waiting for a tick."""
        return len(self._inputs)

    def push(self, frame: np.ndarray, done_at: float | None = None) -> None:
        """Queue one FRAME_SIZE float32 frame (24 kHz mono). Never blocks."""
        if frame.shape != (FRAME_SIZE,):
            raise ValueError(f"a frame is {FRAME_SIZE} samples, got shape {frame.shape}")
        done_at = time.monotonic() if done_at is None else done_at
        with self._lock:
            if self.closed:
                raise EngineStoppedError(f"seat {self.index} is closed: {self.closed_reason}")
            if len(self._inputs) >= self._max_in:
                self._inputs.popleft()
                self.counters.input_dropped += 1
                self._totals.input_dropped += 1
            self._inputs.append((frame, done_at))
            self.counters.frames_in += 1
            self.last_input_at = time.monotonic()
            self._engine_wake.notify_all()

    def pull(self, timeout: float = 0.0) -> OutputFrame | None:
        """The next output frame, waiting up to `timeout` seconds; None if there is none yet."""
        with self._lock:
            if not self._outputs and timeout > 0 and not self.closed:
                self._out_ready.wait(timeout)
            return self._outputs.popleft() if self._outputs else None

    def on_change(self, wake: Callable[[], Callable[[], None] | None]) -> None:
        """Call `wake()` (from the engine's thread; it must not block) whenever an output frame or a
        notice arrives, or the seat closes: an async transport waits on this instead of a thread.
        What `wake()` returns, if not None, is run after the tick's other listeners (wake_listeners)."""
        with self._lock:
            self._listeners.append(wake)
            if self._outputs or self._notices or self.closed:
                finish([after] if (after := wake()) is not None else [])

    def hold(self, held: bool) -> None:
        """Freeze this seat (True) while its caller is away: it keeps its LM context, is not stepped
        and is not freed for idleness; False takes it back (the idle clock starts again)."""
        with self._lock:
            self.held = held
            self.last_input_at = time.monotonic()
            self._engine_wake.notify_all()

    def take_notices(self) -> list[str]:
        """Messages for this seat's caller since the last call (e.g. its conversation was reset)."""
        with self._lock:
            notices = list(self._notices)
            self._notices.clear()
            return notices

    def release(self, reason: str = "released") -> None:
        self._host.release(self, reason)

    def set_conditions(self, conditions: dict[str, str]) -> None:
        """Condition this seat (e.g. {"speaker": "ravi", "emotion": "sad"}) from its next frame on;
        other seats are untouched. Raises ConditionError for a value the model does not know."""
        self._host.set_conditions(self, conditions)

    def set_sampling(self, settings: SeatSampling) -> None:
        """Sample this seat with these settings from its next frame on; other seats are untouched.
        Raises SamplingError for values outside what the server allows."""
        self._host.set_sampling(self, settings)

    def set_prompt(self, spec: PromptSpec) -> None:
        """Start this seat's conversation over from a voice/text prompt (agent/engine/prompts.py) at its
        next tick. Raises PromptError for a prompt the model cannot take. Other seats never wait
        for it: a cached prompt is copied into the seat's row, a new one is computed once, in one
        pass, between two ticks (agent/engine/admission.py)."""
        self._host.set_prompt(self, spec)

    # -- the engine's side (engine lock held) ----------------------------------------------------

    def queued_at(self, k: int) -> float | None:
        """When the k-th waiting input frame (0 = the oldest) was complete; None if fewer wait."""
        return self._inputs[k][1] if k < len(self._inputs) else None

    def take_input(self) -> tuple[np.ndarray, float] | None:
        """The oldest input frame (NaN/Inf zeroed) and when it was complete; None if none came,
        and the seat sits this tick out (counted)."""
        if not self._inputs:
            self.counters.frozen_ticks += 1
            return None
        frame, done_at = self._inputs.popleft()
        if not np.isfinite(frame).all():  # sessions sanitise; this guards direct callers
            self.counters.non_finite_frames += 1
            frame = np.nan_to_num(frame, nan=0.0, posinf=0.0, neginf=0.0)
        return frame, done_at

    def mark_closed(self, reason: str) -> None:
        """The seat is closed: its queued input is dropped and anyone waiting is woken."""
        self.closed_reason = reason
        self._inputs.clear()
        self._changed()

    def deliver(self, frame: OutputFrame, wake: bool = True) -> None:
        """Queue an output frame (engine lock held). `wake=False` leaves the async listeners to a
        `wake_listeners()` once every seat of the tick has its frame: a loop serving many calls is
        then woken once per tick (agent/calls/wakeups.py), not part-way through the tick's seats."""
        if len(self._outputs) >= self._max_out:
            self._outputs.popleft()
            self.counters.output_dropped += 1
            self._totals.output_dropped += 1
        self._outputs.append(frame)
        self.counters.frames_out += 1
        self._out_ready.notify_all()
        if wake:
            self.wake_listeners()

    def tell(self, message: str) -> None:
        """Queue a message for the caller (take_notices)."""
        self._notices.append(message)
        self._changed()

    def _changed(self) -> None:
        self._out_ready.notify_all()
        self.wake_listeners()

    def wake_listeners(self, then: list[Callable[[], None]] | None = None) -> None:
        """Call the listeners. One may return a callable to run once every listener of the tick has
        been called (a LoopWaker's one wake-up of its loop, agent/calls/wakeups.py); with `then`
        they are collected there, once each (see `finish`), else run now."""
        later = [] if then is None else then
        for wake in list(self._listeners):
            try:
                after = wake()
            except RuntimeError:  # its event loop is closed: nobody waits there any more
                self._listeners.remove(wake)
                continue
            if after is not None and after not in later:
                later.append(after)
        if then is None:
            finish(later)


def finish(later: list[Callable[[], None]]) -> None:
    """Run what the listeners of a tick left to run once (`Seat.wake_listeners`)."""
    for after in later:
        with contextlib.suppress(RuntimeError):  # its event loop closed meanwhile
            after()


@dataclass
class Gathered:
    """One input frame from each seat that has one: what a tick steps (engine lock held to gather)."""

    seats: list[tuple[Seat, float]]  # the seats stepped, each with when its frame was complete
    pcm: np.ndarray  # [num_seats, 1, FRAME_SIZE] float32, zeros in the rows that sit out
    exec_mask: np.ndarray  # [num_seats] bool: the rows that step
    late: int  # occupied, unheld seats that had no frame (they sit the tick out)


def gather(seats: Sequence[Seat | None]) -> Gathered:
    """Pop one frame per ready seat; empty and held seats are skipped (engine lock held)."""
    taken = Gathered([], np.zeros((len(seats), 1, FRAME_SIZE), np.float32), np.zeros(len(seats), bool), 0)
    for seat in seats:
        if seat is None or seat.held:
            continue
        one = seat.take_input()
        if one is None:
            taken.late += 1
            continue
        frame, done_at = one
        taken.pcm[seat.index, 0] = frame
        taken.exec_mask[seat.index] = True
        taken.seats.append((seat, done_at))
    return taken
