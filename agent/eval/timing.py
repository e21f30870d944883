"""Speech segments from Silero VAD, the way Full-Duplex-Bench times them.

Contract: `speech_segments(audio, rate)` -> [(start_s, end_s), ...] from the silero-vad package's own
`get_speech_timestamps` at 16 kHz with its defaults (threshold 0.5, min speech 250 ms, min silence
100 ms, pad 30 ms), which is what both FDB v1's backchannel scorer and v1.5's `get_timing.py` run.
`merge_gaps` joins segments whose gap is at most a threshold (v1.5: 0.6 s for the user, 0.5 s for the
model). `overlaps` and `response_gaps` are v1.5's two interval lists:

- stop intervals: where user and model speak at once, [max(starts), min(ends)], keeping the
  shortest interval per end time (ms);
- response intervals: [user segment end, first model start after it], keeping the latest user end
  per model start.

Times are seconds from the start of the file (interval lists rounded to ms, as v1.5 writes them).
Audio of any rate is resampled to 16 kHz first. Checked against FDB's get_timing.py on generated
samples: the same interval lists.
"""

from __future__ import annotations

import threading

import numpy as np

from agent.audio.stream import resample

VAD_RATE = 16_000
USER_MERGE_GAP_S = 0.6
MODEL_MERGE_GAP_S = 0.5

Interval = tuple[float, float]

_model = None
_model_lock = threading.Lock()


def _silero():
    """The package's Silero model, loaded once (its state is reset by every get_speech_timestamps call,
    which is why calls are serialised by the lock in `speech_segments`)."""
    global _model
    if _model is None:
        from agent.calls.vad import load_silero_package
        _model = load_silero_package()
    return _model


def speech_segments(audio: np.ndarray, rate: int) -> list[Interval]:
    """Silero's speech segments (seconds) of mono `audio` at `rate`, FDB's settings."""
    import torch  # here, not at the top: `python -m agent.eval score --help` stays light
    from silero_vad import get_speech_timestamps
    pcm = resample(np.asarray(audio, np.float32), rate, VAD_RATE)
    if pcm.size == 0:
        return []
    with _model_lock:
        stamps = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(pcm)), _silero(),
                                       sampling_rate=VAD_RATE)
    return [(s["start"] / VAD_RATE, s["end"] / VAD_RATE) for s in stamps]


def merge_gaps(segments: list[Interval], max_gap_s: float) -> list[Interval]:
    """Segments whose gap to the previous one is at most `max_gap_s` joined into one."""
    merged: list[Interval] = []
    for start, end in sorted(segments):
        if merged and start - merged[-1][1] <= max_gap_s:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def overlaps(user: list[Interval], model: list[Interval]) -> list[Interval]:
    """v1.5's stop intervals: user and model speaking at once (both lists sorted, non-overlapping)."""
    raw: list[Interval] = []
    i = j = 0
    while i < len(user) and j < len(model):
        start, end = max(user[i][0], model[j][0]), min(user[i][1], model[j][1])
        if end > start:
            raw.append((start, end))
        if user[i][1] < model[j][1]:
            i += 1
        else:
            j += 1
    shortest: dict[int, Interval] = {}
    for start, end in raw:
        key = round(end * 1000)
        if key not in shortest or end - start < shortest[key][1] - shortest[key][0]:
            shortest[key] = (start, end)
    return [(round(s, 3), round(e, 3)) for s, e in sorted(shortest.values(), key=lambda iv: iv[1])]


def response_gaps(user: list[Interval], model: list[Interval]) -> list[Interval]:
    """v1.5's response intervals: [user end, first model start after it], one per model start."""
    latest: dict[int, Interval] = {}
    for _, user_end in user:
        start = next((s for s, _ in model if s > user_end), None)
        if start is None:
            continue
        key, candidate = round(start * 1000), (round(user_end, 3), round(start, 3))
        if key not in latest or candidate[0] > latest[key][0]:
            latest[key] = candidate
    return sorted(latest.values(), key=lambda iv: iv[1])
