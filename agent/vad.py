"""Silero VAD on both directions of a call, and voice-to-voice latency per user turn.

Method (pipecat's): a user turn ends when the VAD has heard `silence_ms` of silence after speech;
the end of the turn is placed at the last voiced window, i.e. the silence window is subtracted
again. The turn's latency is the time of the agent's first voiced output window that starts after
that end, minus the end. Both times are wall-clock (`time.monotonic()`) at the server:
the input side is stamped when its audio arrived, the output side when its audio was handed to
the transport. Network and client playout buffering are not included.

Silero's weights come from the `silero-vad` wheel (no download). Each stream holds its own copy
of the model because Silero keeps its recurrent state inside the module. It runs at 8 kHz, and
windows below -55 dBFS count as silence without a model call.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from agent import SAMPLE_RATE
from agent.audio import StreamResampler
from agent.metrics import RollingWindow

VAD_RATE = 8_000  # Silero's cheaper rate (a quarter less CPU per window than 16 kHz); ample for speech
WINDOW = 256  # Silero's window at 8 kHz: 32 ms
# Windows quieter than this are silence without asking Silero (it would say so too). In a call most
# windows on at least one side are silent, and Silero is the largest per-call CPU cost on a server.
SILENCE_RMS = 10 ** (-55 / 20)
REPLY_TIMEOUT_S = 8.0  # a turn with no agent speech within this long is closed as "no reply"
PAUSE_MERGE_FACTOR = 2.0  # speech resuming within 2x the silence window continues the same turn

_base_model = None
_base_lock = threading.Lock()


def _new_silero() -> torch.nn.Module:
    global _base_model
    with _base_lock:
        if _base_model is None:
            from silero_vad import load_silero_vad
            _base_model = load_silero_vad()
        return copy.deepcopy(_base_model)


@dataclass
class Segment:
    start: float  # seconds of stream time
    end: float | None = None


class SpeechDetector:
    """Streaming speech start/end detection on one 24 kHz stream, in stream seconds."""

    def __init__(self, threshold: float = 0.5, silence_ms: int = 300, min_speech_ms: int = 120):
        self.threshold = threshold
        self.neg_threshold = max(threshold - 0.15, 0.01)
        self.silence_s = silence_ms / 1000
        self.min_speech_s = min_speech_ms / 1000
        self._model = _new_silero()
        self._resampler = StreamResampler(VAD_RATE)
        self._buffer = np.zeros(0, np.float32)
        self._windows_done = 0
        self._current: Segment | None = None
        self._silence_from: float | None = None
        self.speaking = False

    @property
    def stream_seconds(self) -> float:
        """Stream time processed so far (end of the last full window)."""
        return self._windows_done * WINDOW / VAD_RATE

    @torch.no_grad()
    def push(self, samples: np.ndarray) -> list[Segment]:
        """Feed 24 kHz mono float samples; returns segments that just started or ended.
        A segment is reported once when it starts (end None) and once when it ends."""
        events: list[Segment] = []
        data = self._resampler.process(SAMPLE_RATE, samples.astype(np.float32, copy=False))
        self._buffer = np.concatenate([self._buffer, data])
        while self._buffer.size >= WINDOW:
            window, self._buffer = self._buffer[:WINDOW], self._buffer[WINDOW:]
            if np.sqrt(np.mean(np.square(window))) < SILENCE_RMS:
                prob = 0.0
            else:
                prob = float(self._model(torch.from_numpy(window.copy()), VAD_RATE))
            start = self.stream_seconds
            self._windows_done += 1
            end = self.stream_seconds
            if prob >= self.threshold:
                self._silence_from = None
                if self._current is None:
                    self._current = Segment(start)
                if not self.speaking and end - self._current.start >= self.min_speech_s:
                    self.speaking = True
                    events.append(Segment(self._current.start))
            elif prob < self.neg_threshold and self._current is not None:
                if self._silence_from is None:
                    self._silence_from = start
                if end - self._silence_from >= self.silence_s:
                    if self.speaking:
                        events.append(Segment(self._current.start, self._silence_from))
                    self._current, self._silence_from, self.speaking = None, None, False
        return events


@dataclass
class Turn:
    user_start: float  # monotonic time the user started speaking
    user_end: float  # monotonic time of the user's last voiced audio (silence window subtracted)
    detected_at: float  # monotonic time the VAD declared the end
    agent_start: float | None = None
    agent_was_speaking: bool = False  # the agent talked over the end of the turn (full duplex)
    closed: bool = False

    @property
    def latency_ms(self) -> float | None:
        return None if self.agent_start is None else 1e3 * (self.agent_start - self.user_end)


class _Clock:
    """Maps stream seconds to wall-clock time from the most recent chunk (streams run in real time)."""

    def __init__(self):
        self.wall_at = 0.0
        self.stream_at = 0.0

    def mark(self, wall_start: float, stream_start: float) -> None:
        self.wall_at, self.stream_at = wall_start, stream_start

    def wall(self, stream_seconds: float) -> float:
        return self.wall_at + (stream_seconds - self.stream_at)


@dataclass
class TurnLatencyTracker:
    """Both VAD streams of one call and the turns measured between them."""

    silence_ms: int = 300
    on_latency: Callable[[float], None] | None = None  # seconds, for each answered turn
    turns: list[Turn] = field(default_factory=list)
    latencies: RollingWindow = field(default_factory=RollingWindow)

    def __post_init__(self):
        self.user = SpeechDetector(silence_ms=self.silence_ms)
        self.agent = SpeechDetector(silence_ms=200)
        self._user_clock, self._agent_clock = _Clock(), _Clock()
        self._user_seconds = 0.0
        self._agent_seconds = 0.0
        self._agent_onsets: deque[float] = deque(maxlen=16)

    def on_user_audio(self, samples: np.ndarray, wall_start: float) -> list[Turn]:
        """User audio (24 kHz) whose first sample arrived at `wall_start`. Returns turns that ended."""
        self._user_clock.mark(wall_start, self._user_seconds)
        self._user_seconds += samples.size / SAMPLE_RATE
        ended = []
        for seg in self.user.push(samples):
            if seg.end is None:
                # The user speaks again. An unanswered end just before this was a pause inside the
                # turn (merged away); an older one was a turn that got no reply.
                resumed = self._user_clock.wall(seg.start)
                self.turns = [t for t in self.turns
                              if t.closed or resumed - t.user_end > PAUSE_MERGE_FACTOR * self.user.silence_s]
                self._close_open_turns(before=resumed)
                continue
            turn = Turn(self._user_clock.wall(seg.start), self._user_clock.wall(seg.end),
                        detected_at=self._user_clock.wall(self.user.stream_seconds),
                        agent_was_speaking=self.agent.speaking)
            self.turns.append(turn)
            # The agent may have started before the silence window let us declare the end.
            onset = next((t for t in self._agent_onsets if t >= turn.user_end), None)
            if onset is not None:
                self._answer(turn, onset)
            ended.append(turn)
        return ended

    def on_agent_audio(self, samples: np.ndarray, wall_start: float) -> list[Turn]:
        """Agent audio (24 kHz) handed to the transport at `wall_start`. Returns turns answered."""
        self._agent_clock.mark(wall_start, self._agent_seconds)
        self._agent_seconds += samples.size / SAMPLE_RATE
        answered = []
        for seg in self.agent.push(samples):
            if seg.end is not None:
                continue
            onset = self._agent_clock.wall(seg.start)
            self._agent_onsets.append(onset)
            for turn in self.turns:
                if not turn.closed and onset >= turn.user_end:
                    self._answer(turn, onset)
                    answered.append(turn)
        self._close_open_turns(before=wall_start - REPLY_TIMEOUT_S)
        return answered

    def _answer(self, turn: Turn, onset: float) -> None:
        turn.agent_start, turn.closed = onset, True
        self.latencies.add(turn.latency_ms)
        if self.on_latency is not None:
            self.on_latency(turn.latency_ms / 1e3)

    def _close_open_turns(self, before: float) -> None:
        for turn in self.turns:
            if not turn.closed and turn.user_end < before:
                turn.closed = True
        del self.turns[:-50]  # keep the recent history only
