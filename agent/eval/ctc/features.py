"""Log-mel features: 80 bins, 25 ms windows, 10 ms hop at 16 kHz, normalised per utterance.

Each bin is shifted to mean 0 over the utterance, so a fixed linear filter (a codec's muffled top end,
a microphone's tilt) changes nothing but the noise floor; one scale for all bins (their pooled
standard deviation) keeps a silent band quiet instead of blowing its noise up to speech level.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from agent.audio.stream import resample

RATE = 16_000
N_MELS = 80
HOP = 160  # 10 ms
WINDOW = 400  # 25 ms
FLOOR = 1e-6  # power added before the log: below this (about -60 dB) is silence


@lru_cache(maxsize=1)
def _mel():
    import torchaudio
    return torchaudio.transforms.MelSpectrogram(RATE, n_fft=512, win_length=WINDOW, hop_length=HOP,
                                                n_mels=N_MELS, power=2.0)


def log_mel(audio: np.ndarray, rate: int = RATE) -> torch.Tensor:
    """(frames, 80) float32 features of mono `audio` at `rate`."""
    pcm = resample(np.asarray(audio, np.float32), rate, RATE) if rate != RATE else np.asarray(audio, np.float32)
    with torch.no_grad():
        mel = _mel()(torch.from_numpy(np.ascontiguousarray(pcm)))  # (80, frames)
        logmel = (mel + FLOOR).log().T
        centred = logmel - logmel.mean(0)
        return centred / (centred.std(unbiased=False) + 1e-3)
