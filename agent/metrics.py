"""Rolling figures for the live readouts: per-frame step times, real-time factor, turn latencies."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

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
        with self._lock:
            self._items.append((time.monotonic() if at is None else at, float(value)))

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


def fmt_ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"
