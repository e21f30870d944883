"""Audio files in: the one reader of sound files for the whole project.

Contract:
- `read_file(source)` -> (float32 (frames, channels), the file's rate): any format soundfile reads, from
  a path or a file-like object; soundfile's errors (`soundfile.SoundFileError`, `RuntimeError`) pass
  through, so each caller turns them into its own refusal.
- `read_mono(source)` -> (mono float32, the file's rate): the channels averaged.
- `read_audio(source, rate=SAMPLE_RATE)` -> mono float32 at `rate` (24 kHz unless asked otherwise),
  resampled by the project's one resampler (`agent.audio.stream.resample`).
- `read_channels(source, rate=SAMPLE_RATE)` -> each channel on its own, as mono float32 at `rate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

from agent import SAMPLE_RATE
from agent.audio.stream import resample

Source = str | Path | BinaryIO


def read_file(source: Source) -> tuple[np.ndarray, int]:
    """Every channel of a sound file as float32 (frames, channels), and its rate."""
    audio, rate = sf.read(str(source) if isinstance(source, Path) else source, dtype="float32", always_2d=True)
    return audio, int(rate)


def read_mono(source: Source) -> tuple[np.ndarray, int]:
    """A sound file mixed to mono float32, at its own rate."""
    audio, rate = read_file(source)
    return audio.mean(axis=1), rate


def read_audio(source: Source, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A sound file (any rate, channel count, sample format) as mono float32 at `rate`."""
    mono, file_rate = read_mono(source)
    return resample(mono, file_rate, rate)


def read_channels(source: Source, rate: int = SAMPLE_RATE) -> list[np.ndarray]:
    """Each channel of a sound file as mono float32 at `rate`."""
    audio, file_rate = read_file(source)
    return [resample(channel, file_rate, rate) for channel in audio.T]
