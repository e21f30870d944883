"""espeak-ng speech as an array: the one place the project runs the espeak-ng command.

Contract: `espeak(text, voice, rate)` -> mono float32 at `rate` (24 kHz unless asked otherwise), what
espeak-ng writes for `text` with `voice` (e.g. te, te+f3, te+m3) and any further command-line `args`
(e.g. ["-s", "150"]), resampled by the project's resampler. `trim_level` cuts espeak's silent padding
at both ends (samples whose magnitude stays below it, judged at espeak's own rate) before resampling.
EspeakError when espeak-ng is missing or said nothing. (The training data's TTS drives libespeak-ng
in-process instead: agent/train/tts.py, which needs its word events.)
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent import SAMPLE_RATE
from agent.audio.files import read_mono
from agent.audio.stream import resample

TELUGU_TEXT = ("నమస్కారం, మీరు ఎలా ఉన్నారు? ఈ రోజు వాతావరణం చాలా బాగుంది. "
               "నాకు ఒక కప్పు కాఫీ కావాలి. రేపు మనం కలుద్దాం.")  # telugu_speech's sentences


class EspeakError(RuntimeError):
    """espeak-ng is not installed, or it produced no speech."""


def espeak(text: str, voice: str = "te", rate: int = SAMPLE_RATE, args: Sequence[str] = (),
           trim_level: float | None = None) -> np.ndarray:
    """espeak-ng speaking `text` with `voice`, as mono float32 at `rate` (see the module notes)."""
    if shutil.which("espeak-ng") is None:
        raise EspeakError("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, *args, "-w", str(wav), text], check=True, capture_output=True)
        audio, file_rate = read_mono(wav)
    if trim_level is not None:
        loud = np.nonzero(np.abs(audio) > trim_level)[0]
        if loud.size == 0:
            raise EspeakError(f"espeak-ng said nothing for {text!r} with voice {voice!r}")
        audio = audio[loud[0]:loud[-1] + 1]
    return np.ascontiguousarray(resample(audio, file_rate, rate))


def telugu_speech(seconds: float) -> np.ndarray:
    """`seconds` of Telugu speech at 24 kHz: a few sentences and a second of silence, repeated."""
    one = np.concatenate([espeak(TELUGU_TEXT, "te"), np.zeros(SAMPLE_RATE, np.float32)])
    return np.tile(one, int(np.ceil(seconds * SAMPLE_RATE / one.size)))[:int(seconds * SAMPLE_RATE)]
