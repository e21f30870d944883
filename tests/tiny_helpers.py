"""Helpers for exact-output tests on the tiny model (tests/test_engine.py, tests/test_infer.py).

The tiny model's Mimi codebooks are fitted by k-means at build time (agent.models.build_tiny), so codes,
the LM's tokens and the audio all follow the input: a test can tell one caller's input from another's.
"""

from __future__ import annotations

import numpy as np

from agent import FRAME_SIZE
from agent.config import SamplingConfig

GREEDY = SamplingConfig(use_sampling=False)


def varied_audio(n_frames: int, seed: int) -> np.ndarray:
    """Deterministic test input: per-frame tone, level and noise, so consecutive frames differ."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames * FRAME_SIZE) / 24_000
    level = np.repeat(rng.uniform(0.05, 0.8, n_frames), FRAME_SIZE)
    freq = np.repeat(rng.uniform(80, 3000, n_frames), FRAME_SIZE)
    x = level * (np.sin(2 * np.pi * freq * t) + 0.5 * rng.standard_normal(t.size))
    return np.clip(x, -1, 1).astype(np.float32)


def frames_of(audio: np.ndarray) -> list[np.ndarray]:
    return [f.copy() for f in audio.reshape(-1, FRAME_SIZE)]
