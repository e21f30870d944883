"""Real Silero VAD on constructed audio: turn boundaries and voice-to-voice latency arithmetic."""

import numpy as np
import pytest

from agent import FRAME_SECONDS, FRAME_SIZE, SAMPLE_RATE
from agent.vad import REPLY_TIMEOUT_S, SpeechDetector, TurnLatencyTracker

WINDOW_S = 0.032  # Silero's 256-sample window at 8 kHz: the resolution of every boundary


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * SAMPLE_RATE)), np.float32)


def voiced_extent(speech: np.ndarray) -> tuple[float, float]:
    """First and last sample above -40 dBFS: where the speech really is."""
    loud = np.flatnonzero(np.abs(speech) > 0.01)
    return loud[0] / SAMPLE_RATE, loud[-1] / SAMPLE_RATE


def frames(audio: np.ndarray):
    for i in range(0, audio.size - FRAME_SIZE + 1, FRAME_SIZE):
        yield i / SAMPLE_RATE, audio[i:i + FRAME_SIZE]


def test_detector_finds_the_utterance(telugu_speech):
    _, speech = telugu_speech
    lead = 1.04  # a whole number of frames
    audio = np.concatenate([silence(lead), speech, silence(1.5)])
    detector = SpeechDetector(silence_ms=300)
    events = []
    for _, frame in frames(audio):
        events += detector.push(frame)
    ends = [e for e in events if e.end is not None]
    starts = [e for e in events if e.end is None]
    first, last = voiced_extent(speech)
    assert starts and ends, events
    assert starts[0].start == pytest.approx(lead + first, abs=0.1)
    # espeak pauses at commas: the utterance may split, but the last segment ends where speech does
    assert ends[-1].end == pytest.approx(lead + last, abs=0.15)
    assert not detector.speaking


def test_silence_and_noise_are_not_speech():
    rng = np.random.default_rng(0)
    detector = SpeechDetector()
    events = []
    for _, frame in frames(np.concatenate([silence(1.0), (0.003 * rng.standard_normal(SAMPLE_RATE * 2)).astype(np.float32)])):
        events += detector.push(frame)
    assert events == []


@pytest.mark.parametrize("reply_gap", [0.2, 0.64])
def test_voice_to_voice_latency_arithmetic(telugu_speech, reply_gap):
    """User speaks, stops; the agent starts `reply_gap` seconds after the user's last voiced
    sample. Measured latency = agent onset - user end, with the VAD silence window subtracted."""
    _, speech = telugu_speech
    first, last = voiced_extent(speech)
    lead = 0.96
    user = np.concatenate([speech, silence(3.0)])
    user_end = lead + last  # stream seconds of the user's last voiced sample
    agent_onset = user_end + reply_gap
    agent = np.concatenate([silence(agent_onset - first), speech, silence(1.0)])
    user = np.concatenate([silence(lead), user])
    n = min(user.size, agent.size) // FRAME_SIZE * FRAME_SIZE

    tracker = TurnLatencyTracker(silence_ms=300)
    t0 = 1000.0  # arbitrary monotonic origin: both streams stamped in real time
    ended = []
    for (at, u), (_, a) in zip(frames(user[:n]), frames(agent[:n])):
        ended += tracker.on_user_audio(u, t0 + at)
        tracker.on_agent_audio(a, t0 + at)
    assert ended, "the user's turn end was not detected"
    turn = ended[-1]
    assert turn.user_end == pytest.approx(t0 + user_end, abs=0.15)
    # detection waits for the silence window; the reported end does not include it
    assert turn.detected_at - turn.user_end >= 0.3 - WINDOW_S
    # a pause inside the utterance (espeak pauses at commas) is not a turn of its own
    assert [t for t in tracker.turns if t.user_end < turn.user_start] == []
    assert turn.closed and turn.latency_ms is not None
    assert turn.latency_ms == pytest.approx(1e3 * reply_gap, abs=1e3 * (3 * WINDOW_S + 0.05))
    assert tracker.latencies.last == pytest.approx(turn.latency_ms)


def test_turn_without_reply_is_closed_without_latency(telugu_speech):
    _, speech = telugu_speech
    user = np.concatenate([silence(0.48), speech, silence(1.0)])
    tracker = TurnLatencyTracker(silence_ms=300)
    t = 0.0
    for at, u in frames(user):
        tracker.on_user_audio(u, at)
        tracker.on_agent_audio(np.zeros(FRAME_SIZE, np.float32), at)
        t = at
    assert tracker.turns and not tracker.turns[-1].closed
    # the agent stays silent past the reply timeout: the turn closes, no latency is invented
    for k in range(int(REPLY_TIMEOUT_S / FRAME_SECONDS) + 2):
        tracker.on_agent_audio(np.zeros(FRAME_SIZE, np.float32), t + (k + 1) * FRAME_SECONDS)
    assert tracker.turns[-1].closed and tracker.turns[-1].latency_ms is None
    assert len(tracker.latencies) == 0
