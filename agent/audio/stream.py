"""Client audio in, exact Mimi frames out (and back): layout, dtype, rate, framing.

Whatever a transport hands us (48 kHz browser WebRTC, 16 or 24 kHz WebSocket, int16 or float,
mono or stereo, (N,), (1, N), (C, N) or (N, C)) becomes 24 kHz mono float32 in exact
1920-sample frames. Resampling is streaming (the filter keeps its state across chunks), so no
sample is dropped or duplicated at chunk boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import signal

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.errors import AudioFormatError

MAX_CHUNK_SECONDS = 10.0  # larger chunks are refused: a client should stream, not upload
MAX_CHANNELS = 8
MIN_RATE, MAX_RATE = 4_000, 192_000




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


class PolyphaseResampler:
    """Streaming rational resampling (up L, down M) with a windowed-sinc FIR, state kept across
    chunks: any chunking of the input gives bit-identical output. Its delay is half the filter,
    TAPS_PER_PHASE / 2 input samples (0.2 ms at 48 kHz, 1 ms at 8 kHz)."""

    TAPS_PER_PHASE = 16

    def __init__(self, in_rate: int, out_rate: int):
        g = math.gcd(in_rate, out_rate)
        self.up, self.down = out_rate // g, in_rate // g
        n_taps = self.TAPS_PER_PHASE * self.up + 1  # odd: the centre falls on a sample, no half-sample shift
        cutoff = 0.92 / max(self.up, self.down)  # of the upsampled Nyquist: a little below the lower rate's
        taps = np.zeros((self.TAPS_PER_PHASE + 1) * self.up)
        taps[:n_taps] = signal.firwin(n_taps, cutoff, window=("kaiser", 8.0)) * self.up
        self._k = self.TAPS_PER_PHASE + 1
        # phase p's taps, newest input first: y = sum_i taps[p + i*up] * x[base - i]
        self._phases = taps.reshape(self._k, self.up).T
        self._history = np.zeros(self._k - 1, np.float64)  # the last k-1 inputs before this chunk
        self._consumed = 0  # input samples seen so far
        self._next_out = 0  # index of the next output sample
        # output n is read at upsampled index n*down + shift: the filter's centre, so y[n] ~ x(n*down/up)
        self._shift = (n_taps - 1) // 2

    def process(self, x: np.ndarray) -> np.ndarray:
        return PolyphaseResampler.process_together([self], [x])[0]

    @staticmethod
    def process_together(resamplers: Sequence[PolyphaseResampler], chunks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """`r.process(x)` for each pair, with one numpy pass per group of streams whose filters, phase
        and chunk length agree (every call's VAD streams, as a rule). The phase is
        `consumed * up - next_out * down`: it alone places each output's taps. Each output is its
        taps' products summed in tap order, elementwise (no einsum or BLAS, whose order depends on
        shape and alignment), so a stream gets the same samples alone or in any group."""
        groups: dict[tuple, list[int]] = {}
        for i, (r, x) in enumerate(zip(resamplers, chunks)):
            key = (r.up, r.down, r._consumed * r.up - r._next_out * r.down, x.size)
            groups.setdefault(key, []).append(i)
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(chunks)
        for (up, down, lag, size), members in groups.items():
            rs = [resamplers[i] for i in members]
            k = rs[0]._k
            data = np.concatenate([np.stack([r._history for r in rs]),
                                   np.stack([chunks[i] for i in members]).astype(np.float64)], axis=1)
            count = max(0, (lag + size * up - 1 - rs[0]._shift) // down + 1)
            m = np.arange(count) * down + rs[0]._shift - lag
            base, phase = m // up + k - 1, m % up
            taps = rs[0]._phases[phase]  # [count, k]
            acc = np.zeros((len(rs), count))
            for i in range(k):  # newest input first
                if up == 1 and count:  # one phase: the inputs are a strided view, the tap a scalar
                    acc += data[:, base[0] - i:base[-1] - i + 1:down] * taps[0, i]
                else:
                    acc += data[:, base - i] * taps[:, i]
            got = acc.astype(np.float32)
            for j, (i, r) in enumerate(zip(members, rs)):
                r._consumed += size
                r._next_out += count
                r._history = data[j, -(k - 1):]
                out[i] = got[j]
        return out


class StreamResampler:
    """Streaming sample-rate conversion to `out_rate` that follows the input rate if it changes."""

    def __init__(self, out_rate: int = SAMPLE_RATE):
        self.out_rate = out_rate
        self.in_rate: int | None = None
        self._filter: PolyphaseResampler | None = None

    def process(self, rate: int, mono: np.ndarray) -> np.ndarray:
        rate = check_rate(rate)
        if rate != self.in_rate:
            # A new rate starts a new filter; the old one's last few samples (its delay) are dropped.
            self.in_rate = rate
            self._filter = None if rate == self.out_rate else PolyphaseResampler(rate, self.out_rate)
        return mono if self._filter is None else self._filter.process(mono)


def resample(audio: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """One-shot resampling of a whole recording (same filter as the streaming path)."""
    mono = to_mono_float(audio)
    return mono if in_rate == out_rate else PolyphaseResampler(in_rate, out_rate).process(mono)


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


# G.711 μ-law, as fastrtc's WebSocket protocol carries it (bit-exact with Python's audioop, which
# Python 3.13 removed): 16-bit PCM is cut to 14 bits, biased by 33, and stored as sign, a 3-bit
# segment (the magnitude's octave) and 4 mantissa bits, all bits inverted.
_ULAW_BIAS = 33  # 0x84 >> 2, in the 14-bit domain
_ULAW_CLIP = 8159  # largest 14-bit magnitude before the bias
_ULAW_SEGMENT_ENDS = np.array([(0x40 << seg) - 1 for seg in range(8)])


def _ulaw_to_int16(code: int) -> int:
    code = ~code & 0xFF
    magnitude = (((code & 0x0F) << 3) + 0x84) << ((code & 0x70) >> 4)
    return 0x84 - magnitude if code & 0x80 else magnitude - 0x84


_ULAW_DECODE = np.array([_ulaw_to_int16(code) for code in range(256)], dtype=np.int16)


def _ulaw_code(pcm: np.ndarray) -> np.ndarray:
    value = np.asarray(pcm, dtype=np.int16).astype(np.int32) >> 2
    mask = np.where(value < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(value), _ULAW_CLIP) + _ULAW_BIAS
    segment = np.searchsorted(_ULAW_SEGMENT_ENDS, magnitude)  # first segment whose end holds it
    code = np.where(segment >= 8, 0x7F,
                    (segment << 4) | ((magnitude >> (np.minimum(segment, 7) + 1)) & 0x0F))
    return (code ^ mask).astype(np.uint8)


# every int16 sample's code, indexed by the sample's 16 bits read as unsigned: encoding is one lookup
ULAW_ENCODE_TABLE = _ulaw_code(np.arange(1 << 16, dtype=np.uint16).view(np.int16))


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 samples -> one μ-law byte per sample."""
    return ULAW_ENCODE_TABLE[np.asarray(pcm, dtype=np.int16).view(np.uint16)].tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    """μ-law bytes -> int16 samples."""
    return _ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]
