"""Telugu test speech from Debian's espeak-ng, placed at known times.

Contract: `speak(text, voice)` -> mono float32 at `rate`, trimmed to the voiced part (espeak pads its
output with silence, which would blur "where speech starts/ends"), so a caller that places it at t
knows the speech runs from t to t + len/rate. `place(duration_s, rate, [(t, audio), ...])` mixes
clips into silence at those times. Used by the generated evaluation set and the scorer's tests.
"""

from __future__ import annotations

import numpy as np

from agent.audio.espeak import EspeakError, espeak

TRIM_LEVEL = 0.01  # |sample| below this, at the ends of espeak's output, is its padding

SpeechError = EspeakError  # what `speak` raises: espeak-ng missing, or it said nothing


def speak(text: str, voice: str = "te", rate: int = 16_000, speed_wpm: int | None = None) -> np.ndarray:
    """espeak-ng speaking `text` with `voice` (e.g. te, te+f3, te+m3), trimmed, at `rate`."""
    return espeak(text, voice, rate, ["-s", str(speed_wpm)] if speed_wpm else (), trim_level=TRIM_LEVEL)


def seconds(audio: np.ndarray, rate: int) -> float:
    return audio.size / rate


def place(duration_s: float, rate: int, clips: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """Silence `duration_s` long with each clip added at its start time (cut at the end)."""
    out = np.zeros(round(duration_s * rate), np.float32)
    for start_s, clip in clips:
        start = round(start_s * rate)
        piece = clip[: max(0, out.size - start)]
        out[start:start + piece.size] += piece
    return out
