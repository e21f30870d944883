"""The engine's tick lateness: how long after it was due (by the tick loop's rules) each tick started,
recorded per tick and exposed in /metrics."""

from __future__ import annotations

import time

import numpy as np

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
