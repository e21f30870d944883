"""Client audio in, exact Mimi frames out (and back): layout, dtype, rate, framing.

Whatever a transport hands us (48 kHz browser WebRTC, 16 or 24 kHz WebSocket, int16 or float,
mono or stereo, (N,), (1, N), (C, N) or (N, C)) becomes 24 kHz mono float32 in exact
1920-sample frames. Resampling is streaming (soxr keeps its filter state across chunks), so no
sample is dropped or duplicated at chunk boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import soxr

from agent import FRAME_SIZE, SAMPLE_RATE

MAX_CHUNK_SECONDS = 10.0  # larger chunks are refused: a client should stream, not upload
MAX_CHANNELS = 8
MIN_RATE, MAX_RATE = 4_000, 192_000
# Audio soxr holds back inside its filter, measured with soxr 1.1 (8/16/44.1/48 kHz in):
# LQ 12.5/12.5/11/2.5 ms, HQ 43/12/18/29 ms. Latency matters more here than a passband past
# what a 24 kHz speech codec keeps. (fastrtc's WebRTC path already hands us 24 kHz.)
RESAMPLE_QUALITY = "LQ"


class AudioFormatError(ValueError):
    """Input audio that cannot be interpreted; the message says why."""


@dataclass
class ChunkReport:
    """What normalising one chunk had to fix, for the session's counters."""

    non_finite: int = 0  # NaN/Inf samples replaced by 0
    clipped: int = 0  # float samples beyond [-1, 1] clipped


def to_mono_float(samples: np.ndarray, report: ChunkReport | None = None) -> np.ndarray:
    """Any supported layout and dtype -> 1-D float32 in [-1, 1]."""
    array = np.asarray(samples)
    if array.dtype == object or array.dtype.kind not in "iuf":
        raise AudioFormatError(f"audio must be integer or float samples, got dtype {array.dtype}")
    if array.ndim == 2:
        # Channels are the short axis: (C, N) from fastrtc/av, (N, C) from files and sounddevice.
        if array.shape[0] > array.shape[1]:
            array = array.T
        if array.shape[0] > MAX_CHANNELS:
            raise AudioFormatError(f"audio has {array.shape[0]} channels; at most {MAX_CHANNELS} are accepted")
    elif array.ndim != 1:
        raise AudioFormatError(f"audio must be 1-D or 2-D, got shape {array.shape}")

    if array.dtype.kind in "iu":
        info = np.iinfo(array.dtype)
        scale = float(max(-int(info.min), int(info.max))) if info.min < 0 else (info.max + 1) / 2
        offset = 0.0 if info.min < 0 else scale
        floats = (array.astype(np.float64) - offset) / scale
    else:
        floats = array.astype(np.float64, copy=True)
        bad = ~np.isfinite(floats)
        if bad.any():
            if report is not None:
                report.non_finite += int(bad.sum())
            floats[bad] = 0.0
        if report is not None:
            report.clipped += int((np.abs(floats) > 1.0).sum())
        np.clip(floats, -1.0, 1.0, out=floats)
    mono = floats.mean(axis=0) if floats.ndim == 2 else floats
    return mono.astype(np.float32)


def check_rate(rate: object) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not MIN_RATE <= int(rate) <= MAX_RATE:
        raise AudioFormatError(f"sample rate {rate!r} is not an integer in {MIN_RATE}..{MAX_RATE} Hz")
    return int(rate)


def to_int16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


class StreamResampler:
    """Streaming sample-rate conversion that follows the input rate if it changes mid-stream."""

    def __init__(self, out_rate: int = SAMPLE_RATE):
        self.out_rate = out_rate
        self.in_rate: int | None = None
        self._stream: soxr.ResampleStream | None = None

    def process(self, rate: int, mono: np.ndarray) -> np.ndarray:
        rate = check_rate(rate)
        if rate == self.out_rate and self._stream is None:
            self.in_rate = rate
            return mono
        flushed = np.zeros(0, np.float32)
        if rate != self.in_rate:
            if self._stream is not None:  # rate changed: flush the old filter's tail first
                flushed = self._stream.resample_chunk(np.zeros(0, np.float32), last=True)
            self.in_rate = rate
            self._stream = None if rate == self.out_rate else soxr.ResampleStream(
                rate, self.out_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        out = mono if self._stream is None else self._stream.resample_chunk(mono)
        return np.concatenate([flushed, out]) if flushed.size else out


class Framer:
    """Accumulates samples and hands out exact fixed-size frames; keeps the remainder."""

    def __init__(self, frame_size: int = FRAME_SIZE):
        self.frame_size = frame_size
        self._pending = np.zeros(0, np.float32)

    @property
    def pending(self) -> int:
        return int(self._pending.size)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        data = np.concatenate([self._pending, samples]) if self._pending.size else samples
        n_frames = data.size // self.frame_size
        frames = [data[i * self.frame_size:(i + 1) * self.frame_size].copy() for i in range(n_frames)]
        self._pending = data[n_frames * self.frame_size:].copy()
        return frames


@dataclass
class InputAudio:
    """One client's input path: any chunk in, exact 24 kHz mono frames out."""

    resampler: StreamResampler = field(default_factory=StreamResampler)
    framer: Framer = field(default_factory=Framer)

    def push(self, rate: int, samples: np.ndarray, report: ChunkReport | None = None) -> list[np.ndarray]:
        check_rate(rate)
        array = np.asarray(samples)
        if array.size == 0:
            return []
        channels = 1 if array.ndim < 2 else min(array.shape)
        if array.size > MAX_CHUNK_SECONDS * int(rate) * channels:
            raise AudioFormatError(f"a chunk of {array.size / channels / int(rate):.1f} s is over the "
                                   f"{MAX_CHUNK_SECONDS:.0f} s limit; stream smaller chunks")
        mono = to_mono_float(array, report)
        return self.framer.push(self.resampler.process(rate, mono))
