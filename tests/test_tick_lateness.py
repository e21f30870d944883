"""The engine's tick lateness: how long after it was due (by the tick loop's rules) each tick started,
recorded per tick and exposed in /metrics."""

from __future__ import annotations

import time

import numpy as np
import pytest

from agent import FRAME_SIZE
from agent.config import EngineConfig
from agent.engine import FrameEngine
from conftest import make_service, tiny_model


def test_tick_lateness_counts_from_when_every_seat_had_its_frame():
    engine = FrameEngine(tiny_model(), EngineConfig(max_sessions=2))
    a, b = engine.acquire("a"), engine.acquire("b")
    for seat in (a, b):
        seat.push(np.zeros(FRAME_SIZE, np.float32))
    engine.step_once()
    ticked = time.monotonic()
    # both frames complete soon after the tick: due when the second one was, before the frame clock
    a.push(np.zeros(FRAME_SIZE, np.float32), done_at=ticked + 0.005)
    b.push(np.zeros(FRAME_SIZE, np.float32), done_at=ticked + 0.010)
    time.sleep(0.2)
    before = time.monotonic()
    engine.step_once()
    after = time.monotonic()
    late = engine.stats.lateness.values()
    assert late.size == 2, late
    assert 1e3 * (before - ticked - 0.010) <= late[-1] <= 1e3 * (after - ticked - 0.010), late


@pytest.mark.slow
def test_tick_lateness_is_exposed_in_metrics():
    service = make_service(max_sessions=1)
    try:
        seat = service.engine.acquire("late")
        for _ in range(3):  # frames complete long ago: the loop's ticks start 300 ms after they were due
            seat.push(np.zeros(FRAME_SIZE, np.float32), done_at=time.monotonic() - 0.3)
        deadline = time.monotonic() + 10
        while service.engine.stats.ticks < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        values = service.metric_values()
        assert values["tick_lateness_p99_seconds"] >= 0.25, values
        text = service.exporter.render()[0].decode()
        assert "agent_tick_lateness_p99_seconds" in text and "agent_tick_lateness_p50_seconds" in text
    finally:
        service.close()


@pytest.mark.slow
def test_calls_on_one_loop_cost_one_wakeup_per_tick():
    """Six calls awaiting their frames on one event loop: the engine's tick wakes the loop once for
    all of them (one call_soon_threadsafe per tick), not once per call, and every call gets each frame."""
    import asyncio

    from agent.calls.session import Session

    calls, ticks = 6, 6
    service = make_service(max_sessions=calls)
    try:
        sessions = [Session(service.engine, f"w{i}", service.catalogue.settings()) for i in range(calls)]

        async def run() -> tuple[int, list[int]]:
            loop = asyncio.get_running_loop()
            scheduled = 0
            threadsafe = loop.call_soon_threadsafe

            def counting(*args, **kwargs):
                nonlocal scheduled
                scheduled += 1
                return threadsafe(*args, **kwargs)

            loop.call_soon_threadsafe = counting
            got = [0] * calls
            for _ in range(ticks):
                for s in sessions:
                    s.receive(24_000, np.zeros(FRAME_SIZE, np.float32))
                frames = await asyncio.gather(*(s.wait_output(10.0) for s in sessions))
                for i, frame in enumerate(frames):
                    got[i] += frame is not None
            return scheduled, got

        scheduled, got = asyncio.run(run())
        assert got == [ticks] * calls
        assert scheduled <= 2 * ticks, f"{scheduled} loop wake-ups for {ticks} ticks of {calls} calls"
    finally:
        service.close()
