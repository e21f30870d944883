"""Rolling figures for the live readouts: per-frame step times, real-time factor, turn latencies."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent import FRAME_SECONDS

WINDOW_SECONDS = 60.0


class RollingWindow:
    """Timestamped values kept for the last `horizon` seconds (and at most `max_items`)."""

    def __init__(self, horizon: float = WINDOW_SECONDS, max_items: int = 5000):
        self.horizon = horizon
        self._items: deque[tuple[float, float]] = deque(maxlen=max_items)
        self._lock = threading.Lock()

    def add(self, value: float, at: float | None = None) -> None:
        stamp = time.monotonic() if at is None else at
        with self._lock:
            self._items.append((stamp, float(value)))
            self._trim(stamp)  # here, not only when read: unread windows would hold `max_items` values

    def _trim(self, now: float) -> None:
        while self._items and now - self._items[0][0] > self.horizon:
            self._items.popleft()

    def items(self) -> list[tuple[float, float]]:
        with self._lock:
            self._trim(time.monotonic())
            return list(self._items)

    def values(self) -> np.ndarray:
        return np.array([v for _, v in self.items()], dtype=np.float64)

    @property
    def last(self) -> float | None:
        with self._lock:
            return self._items[-1][1] if self._items else None

    def percentile(self, q: float) -> float | None:
        values = self.values()
        return float(np.percentile(values, q)) if values.size else None

    def __len__(self) -> int:
        return len(self.items())


@dataclass
class StepTimes:
    """Batched step timings (milliseconds) split into Mimi encode, LM step and Mimi decode."""

    total: RollingWindow = field(default_factory=RollingWindow)
    encode: RollingWindow = field(default_factory=RollingWindow)
    lm: RollingWindow = field(default_factory=RollingWindow)
    decode: RollingWindow = field(default_factory=RollingWindow)
    batch: RollingWindow = field(default_factory=RollingWindow)

    def add(self, encode_ms: float, lm_ms: float, decode_ms: float, batch: int) -> None:
        at = time.monotonic()
        self.total.add(encode_ms + lm_ms + decode_ms, at)
        self.encode.add(encode_ms, at)
        self.lm.add(lm_ms, at)
        self.decode.add(decode_ms, at)
        self.batch.add(batch, at)

    def summary(self) -> dict[str, float | None]:
        p50 = self.total.percentile(50)
        return {
            "last_ms": self.total.last,
            "p50_ms": p50,
            "p95_ms": self.total.percentile(95),
            "p99_ms": self.total.percentile(99),
            # Real-time factor: compute time per 80 ms of audio; below 1 keeps up with real time.
            "rtf": None if p50 is None else p50 / (1e3 * FRAME_SECONDS),
            "batch_last": self.batch.last,
        }


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99))}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fmt_ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


# ---------------------------------------------------------------------------------------------
# Prometheus (/metrics)
# ---------------------------------------------------------------------------------------------

STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.25, 0.5)
V2V_BUCKETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


class PrometheusExporter:
    """Histograms observed as events happen; counters and gauges read from the engine at scrape
    time (`snapshot()` returns their current values). One registry per service, not the global one,
    so several services can live in one process (tests)."""

    COUNTERS = {
        "calls_started": "Calls given a seat.",
        "calls_refused": "Calls refused because every seat was taken.",
        "input_dropped": "Input frames dropped because a seat's input backlog was full (client too fast).",
        "output_dropped": "Output frames dropped because a client did not read its audio.",
        "late_ticks": "Ticks a seat sat out because its input frame was late (frozen, padded by waiting).",
        "prompts_restored": "Calls started from a voice/text prompt's state (cached or new).",
        "prompt_prefills": "Prompt states computed (prompt cache misses), each in one pass between two ticks.",
        "step_failures": "Batched steps that raised; their seats were reset and their callers told.",
    }
    GAUGES = {
        "seats_total": "Seats (batch slots) in the engine.",
        "seats_in_use": "Seats taken by live calls.",
        "draining": "1 while the server drains before shutting down.",
        "prompt_cache_entries": "Prompt states held in the bounded (LRU) prompt cache.",
        "prompt_cache_bytes": "Memory held by the prompt cache (keys and values of every cached prompt).",
        "tick_lateness_p50_seconds": "How long after it was due a tick started, median over the last minute.",
        "tick_lateness_p99_seconds": "How long after it was due a tick started, 99th percentile over the last "
                                     "minute (the GIL, a busy host, a slow wake-up).",
    }

    def __init__(self, snapshot: Callable[[], dict[str, float]]):
        from prometheus_client import CollectorRegistry, Histogram

        self.snapshot = snapshot
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram("agent_step_seconds", "Wall time of one batched Mimi encode + LM step + "
                                      "Mimi decode.", buckets=STEP_BUCKETS, registry=self.registry)
        self.voice_to_voice_seconds = Histogram(
            "agent_voice_to_voice_seconds", "From the end of a user's turn to the agent's first voiced audio "
            "(server side, VAD silence window subtracted).", buckets=V2V_BUCKETS, registry=self.registry)
        self.registry.register(self)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        values = self.snapshot()
        for name, help_text in self.COUNTERS.items():
            yield CounterMetricFamily(f"agent_{name}", help_text, value=values.get(name, 0))
        for name, help_text in self.GAUGES.items():
            yield GaugeMetricFamily(f"agent_{name}", help_text, value=values.get(name, 0))

    def describe(self):
        return []  # values are read at scrape time

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
