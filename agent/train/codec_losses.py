"""Reconstruction losses and distances for the codec that weigh what makes speech intelligible.

A plain STFT magnitude loss is ruled by the loud 300-1000 Hz band; mel compression gives the 1-3 kHz
formants that carry vowels and consonants their share (EnCodec, DAC: ../shared/notes/codec-facts.md).

Contract: `multiscale_mel_loss(out, ref)` -> L1 between log-mel spectrograms at several window sizes
(DAC's recipe: windows 32 ... 2048, hop = window / 4, 5 ... 320 mel bins), averaged over scales; zero
for identical signals. `mel_cepstral_distance(out, ref)` -> a held-out figure in dB: the distance of
the first 13 mel-cepstral coefficients (without c0, the level), over frames where the reference speaks.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from agent import SAMPLE_RATE

# (window, mel bins): DAC's seven scales; the smallest windows see too few bins for more mels
MEL_SCALES = ((32, 5), (64, 10), (128, 20), (256, 40), (512, 80), (1024, 160), (2048, 320))
MEL_FLOOR = 1e-5  # DAC's clamp: -100 dB, below anything audible here


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


@lru_cache(maxsize=32)
def mel_filterbank(n_fft: int, n_mels: int, rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular HTK-mel filters, [n_mels, n_fft // 2 + 1], each band's peak 1 (no dependency on
    torchaudio or librosa, which are not runtime requirements)."""
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    edges = 700.0 * (10 ** (np.linspace(0, _hz_to_mel(np.array(rate / 2)), n_mels + 2) / 2595.0) - 1.0)
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - low) / np.maximum(centre - low, 1e-9)
    falling = (high - freqs[None]) / np.maximum(high - centre, 1e-9)
    bank = np.clip(np.minimum(rising, falling), 0, None)
    return torch.from_numpy(bank.astype(np.float32))


def log_mel(x: torch.Tensor, n_fft: int, n_mels: int, floor: float = MEL_FLOOR) -> torch.Tensor:
    """log10 mel magnitude of `x` ([..., samples]) -> [batch, n_mels, frames], clamped at `floor`."""
    window = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    spec = torch.stft(x.reshape(-1, x.shape[-1]), n_fft, hop_length=max(1, n_fft // 4), window=window,
                      return_complex=True).abs()
    mel = torch.matmul(mel_filterbank(n_fft, n_mels).to(x), spec)
    return mel.clamp_min(floor).log10()


def multiscale_mel_loss(out: torch.Tensor, ref: torch.Tensor,
                        scales: tuple[tuple[int, int], ...] = MEL_SCALES, floor: float = MEL_FLOOR) -> torch.Tensor:
    """Mean over scales of the L1 distance between log-mel spectrograms (DAC's mel loss). espeak-ng's
    pauses are digital zeros: at DAC's -100 dB floor the decoder's faint hiss there is the largest error
    of all, so a higher `floor` stops the loss spending itself on silence."""
    total = out.new_zeros(())
    for n_fft, n_mels in scales:
        total = total + (log_mel(out, n_fft, n_mels, floor) - log_mel(ref, n_fft, n_mels, floor)).abs().mean()
    return total / len(scales)


@lru_cache(maxsize=4)
def _dct_matrix(n_mels: int, n_coeffs: int) -> torch.Tensor:
    """Orthonormal DCT-II rows 1 .. n_coeffs (c0, the overall level, left out)."""
    k = torch.arange(1, n_coeffs + 1, dtype=torch.float64)[:, None]
    n = torch.arange(n_mels, dtype=torch.float64)[None]
    return (math.sqrt(2.0 / n_mels) * torch.cos(math.pi * k * (n + 0.5) / n_mels)).float()


def mel_cepstral_distance(out: np.ndarray, ref: np.ndarray, n_fft: int = 1024, n_mels: int = 40,
                          n_coeffs: int = 13) -> float:
    """Mel-cepstral distance in dB, (10 / ln 10) sqrt(2 sum (c_out - c_ref)^2), averaged over the
    reference's frames within 50 dB of its loudest (pauses do not count)."""
    mels = [log_mel(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None], n_fft, n_mels)[0] * math.log(10)
            for x in (out, ref)]  # natural-log mel energies, [n_mels, frames]
    dct = _dct_matrix(n_mels, n_coeffs)
    c_out, c_ref = (dct @ m for m in mels)
    level_db = 20 * mels[1].amax(dim=0) / math.log(10)
    loud = level_db > level_db.max() - 50
    per_frame = (10 / math.log(10)) * torch.sqrt(2 * (c_out - c_ref).pow(2).sum(dim=0))
    return float(per_frame[loud].mean())
