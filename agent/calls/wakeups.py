"""One event-loop wake-up per engine tick for every call waiting on that loop.

The engine's thread tells each seat with a new frame in turn, and each call's coroutine waits on an
asyncio.Event. One `call_soon_threadsafe` per call wrote to the loop's self-pipe and woke the loop
once per call per tick; a `LoopWaker` queues the events and schedules one callback that sets them
all: the first event of a burst hands the engine `schedule`, which it runs after the tick's last
seat, and the others join the queue until the callback runs.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable


class LoopWaker:
    """Sets asyncio Events of one loop from other threads, in batches."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker] = weakref.WeakKeyDictionary()
    _by_loop_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[asyncio.Event] = []
        self._scheduled = False  # `schedule` was handed out and its callback has not run yet
        self._lock = threading.Lock()
        self.wakeups = 0  # callbacks scheduled on the loop (one per burst)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopWaker:
        """The one waker of `loop`."""
        with cls._by_loop_lock:
            waker = cls._by_loop.get(loop)
            if waker is None:
                waker = cls._by_loop[loop] = cls(loop)
            return waker

    def wake(self, event: asyncio.Event) -> Callable[[], None] | None:
        """Set `event` on the loop soon (any thread; never blocks). Returns `schedule` when this
        event starts a batch: the caller runs it once it has queued the rest of its burst (the
        engine, after all the tick's seats; Seat.wake_listeners), so the loop wakes once."""
        with self._lock:
            self._pending.append(event)
            if self._scheduled:
                return None  # a callback is due and has not run yet: it sets this one too
            self._scheduled = True
        return self.schedule

    def schedule(self) -> None:
        """Wake the loop to set what is queued. RuntimeError if the loop is closed."""
        self.wakeups += 1
        try:
            self.loop.call_soon_threadsafe(self._set_pending)
        except RuntimeError:
            with self._lock:
                self._pending.clear()
                self._scheduled = False
            raise

    def _set_pending(self) -> None:
        with self._lock:
            events, self._pending, self._scheduled = self._pending, [], False
        for event in events:
            event.set()
