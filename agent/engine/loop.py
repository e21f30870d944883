"""The engine's thread: when to tick, freeing idle seats, stopping.

Tick timing: a tick fires as soon as every occupied seat has a frame (so a lone caller never waits
for a clock), or one frame period after the previous tick for the seats that are ready, or at once
when a seat has fallen two frames behind. A tick's lateness (`due_since`) is how long after it
became due it starts (the GIL, a busy machine, a slow wake-up). Held seats are left out of every
rule: nobody waits for them, and they are never freed for idleness.

A tick that raises has already been handled (its seats reset and told, the failure counted): the
loop logs it and goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from agent import FRAME_SECONDS
from agent.config import EngineConfig
from agent.engine.seats import Seat

log = logging.getLogger(__name__)


def due(seats: Sequence[Seat | None], now: float, last_tick: float) -> bool:
    """Whether to tick now (engine lock held)."""
    occupied = [s for s in seats if s is not None and not s.held]
    ready = [s for s in occupied if s.input_backlog]
    if not ready:
        return False
    return (len(ready) == len(occupied) or now >= last_tick + FRAME_SECONDS
            or any(s.input_backlog >= 2 for s in ready))


def due_since(seats: Sequence[Seat | None], last_tick: float) -> float | None:
    """When the tick about to run became due by `due`'s rules (engine lock held, before the frames
    are taken); None if none is due. A tick's lateness is how long after this it starts."""
    occupied = [s for s in seats if s is not None and not s.held]
    first = [t for s in occupied if (t := s.queued_at(0)) is not None]
    if not first:
        return None
    since = max(last_tick + FRAME_SECONDS, min(first))  # one frame after the last tick
    if len(first) == len(occupied):
        since = min(since, max(first))  # the moment every seat had its frame
    second = [t for s in occupied if (t := s.queued_at(1)) is not None]
    return min([since, *second])  # a seat two frames behind


def idle(seats: Sequence[Seat | None], now: float, timeout_s: float) -> list[Seat]:
    """Unheld seats whose caller sent nothing for `timeout_s` (engine lock held)."""
    return [s for s in seats if s is not None and not s.held and now - s.last_input_at > timeout_s]


class TickLoop:
    """Runs `tick()` on its own thread whenever it is due; frees idle seats through `release`.
    `seats` is the engine's seat list (read under the lock `wake` belongs to)."""

    def __init__(self, wake: threading.Condition, seats: Sequence[Seat | None], config: EngineConfig,
                 tick: Callable[[], int], release: Callable[[Seat, str], None]):
        self.stopping = False
        self.last_tick = 0.0  # time.monotonic() of the last tick, written by whoever ticks (lock held)
        self.thread: threading.Thread | None = None
        self._wake, self._seats, self._config = wake, seats, config
        self._tick, self._release = tick, release

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="frame-engine", daemon=True)
            self.thread.start()

    def stop(self) -> list[Seat]:
        """Stop taking seats and wake the thread; returns the seats still occupied, to be released."""
        with self._wake:
            self.stopping = True
            seats = [s for s in self._seats if s is not None]
            self._wake.notify_all()
        return seats

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None

    def _run(self) -> None:
        seats = self._seats
        while True:
            with self._wake:
                while not self.stopping:
                    now = time.monotonic()
                    if due(seats, now, self.last_tick) or idle(seats, now, self._config.idle_timeout_s):
                        break
                    waiting = any(s is not None and not s.held and s.input_backlog for s in seats)
                    self._wake.wait(timeout=max(0.001, self.last_tick + FRAME_SECONDS - now) if waiting else 0.25)
                if self.stopping:
                    return
                freed = idle(seats, time.monotonic(), self._config.idle_timeout_s)
            for seat in freed:
                self._release(seat, f"no audio for {self._config.idle_timeout_s:g} s")
            try:
                self._tick()
            except Exception:  # counted, seats reset and told (FrameEngine.step_once); the loop goes on
                log.exception("engine step failed; its seats were reset")
