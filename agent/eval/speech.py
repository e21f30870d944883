"""Telugu test speech from Debian's espeak-ng, placed at known times.

Contract: `speak(text, voice)` -> mono float32 at `rate`, trimmed to the voiced part (espeak pads its
output with silence, which would blur "where speech starts/ends"), so a caller that places it at t
knows the speech runs from t to t + len/rate. `place(duration_s, rate, [(t, audio), ...])` mixes
clips into silence at those times. Used by the generated evaluation set and the scorer's tests.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from agent.audio.stream import resample

TRIM_LEVEL = 0.01  # |sample| below this, at the ends of espeak's output, is its padding


class SpeechError(RuntimeError):
    pass


def speak(text: str, voice: str = "te", rate: int = 16_000, speed_wpm: int | None = None) -> np.ndarray:
    """espeak-ng speaking `text` with `voice` (e.g. te, te+f3, te+m3), trimmed, at `rate`."""
    if shutil.which("espeak-ng") is None:
        raise SpeechError("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        args = ["espeak-ng", "-v", voice, "-w", str(wav)]
        if speed_wpm:
            args += ["-s", str(speed_wpm)]
        subprocess.run([*args, text], check=True, capture_output=True)
        audio, file_rate = sf.read(str(wav), dtype="float32")
    loud = np.nonzero(np.abs(audio) > TRIM_LEVEL)[0]
    if loud.size == 0:
        raise SpeechError(f"espeak-ng said nothing for {text!r} with voice {voice!r}")
    audio = audio[loud[0]:loud[-1] + 1]
    return np.ascontiguousarray(resample(audio, file_rate, rate))


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
