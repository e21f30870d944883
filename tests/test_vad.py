"""Real Silero VAD on constructed audio: turn boundaries and voice-to-voice latency arithmetic."""

import numpy as np
import pytest
import torch

from agent import FRAME_SECONDS, FRAME_SIZE, SAMPLE_RATE
from agent.audio.stream import resample
from agent.calls.vad import (
    REPLY_TIMEOUT_S,
    VAD_RATE,
    WINDOW,
    Silero,
    SpeechDetector,
    TurnLatencyTracker,
    VadHub,
    run_detectors,
)

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
    for _, frame in frames(np.concatenate([silence(1.0),
                                           (0.003 * rng.standard_normal(SAMPLE_RATE * 2)).astype(np.float32)])):
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
        tracker.on_user_audio(u, t0 + at)
        tracker.on_agent_audio(a, t0 + at)
        ended += [t for t in tracker.process() if t not in ended]
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
        tracker.process()
        t = at
    assert tracker.turns and not tracker.turns[-1].closed
    # the agent stays silent past the reply timeout: the turn closes, no latency is invented
    for k in range(int(REPLY_TIMEOUT_S / FRAME_SECONDS) + 2):
        tracker.on_agent_audio(np.zeros(FRAME_SIZE, np.float32), t + (k + 1) * FRAME_SECONDS)
        tracker.process()
    assert tracker.turns[-1].closed and tracker.turns[-1].latency_ms is None
    assert len(tracker.latencies) == 0


@pytest.mark.parametrize("build", ["onnx", "torchscript"])
def test_silero_as_a_function_matches_the_packages_own_stateful_call(telugu_speech, build):
    """Silero (state passed in and out), either build, against silero_vad's `model(x, 8000)` (the
    TorchScript build with its state kept inside)."""
    from silero_vad import load_silero_vad
    _, speech = telugu_speech
    audio = resample(np.concatenate([silence(0.3), speech]), SAMPLE_RATE, VAD_RATE)
    windows = audio[:audio.size // WINDOW * WINDOW].reshape(-1, WINDOW)
    package = load_silero_vad()
    want = np.array([float(package(torch.from_numpy(w.copy()), VAD_RATE)) for w in windows])
    silero = Silero(onnx=build == "onnx", torchscript=build == "torchscript")
    assert silero.backends == (build,)
    state, context, got = Silero.initial_state(), np.zeros((1, 32), np.float32), []
    for w in windows:
        prob, state = silero(w[None], context, state)
        context = w[None, -32:]
        got.append(prob[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert want.max() > 0.9 and want.min() < 0.1  # speech and silence both there: the check can fail


def test_many_streams_judged_together_match_each_judged_alone(telugu_speech):
    """One batched Silero call per window round gives each stream what it gets alone."""
    _, speech = telugu_speech
    rng = np.random.default_rng(3)
    streams = [np.concatenate([silence(0.4), speech, silence(1.0)]),
               np.concatenate([silence(1.2), speech[:SAMPLE_RATE * 2], silence(2.2)]),
               (0.05 * rng.standard_normal(speech.size + SAMPLE_RATE * 14 // 10)).astype(np.float32),
               silence(speech.size / SAMPLE_RATE + 1.4)]
    n = min(s.size for s in streams) // FRAME_SIZE * FRAME_SIZE

    def judge(groups: list[list[int]]) -> list[list]:
        detectors = [SpeechDetector() for _ in streams]
        events: list[list] = [[] for _ in streams]
        for start in range(0, n, FRAME_SIZE):
            for d, s in zip(detectors, streams):
                d.feed(s[start:start + FRAME_SIZE])
            for group in groups:
                for i, got in zip(group, run_detectors([detectors[i] for i in group])):
                    events[i] += got
        return events

    together, alone = judge([[0, 1, 2, 3]]), judge([[0], [1], [2], [3]])
    assert together == alone
    assert together[0] and together[1] and not together[3]  # speech found where it is, none in silence


@pytest.mark.slow
def test_vad_hub_measures_each_call_as_it_would_alone(telugu_speech):
    """Three calls with different reply gaps on one hub: each call's latency is its own."""
    _, speech = telugu_speech
    first, last = voiced_extent(speech)
    gaps = [0.2, 0.45, 0.7]
    hub = VadHub()  # rounds run by hand here; the server runs them on the hub's thread
    trackers = [TurnLatencyTracker(silence_ms=300) for _ in gaps]
    alone = [TurnLatencyTracker(silence_ms=300) for _ in gaps]
    for t in trackers:
        hub.add(t)
    user = np.concatenate([silence(0.96), speech, silence(3.0)])
    agents = [np.concatenate([silence(0.96 + last + gap - first), speech]) for gap in gaps]
    n = min([user.size] + [a.size for a in agents]) // FRAME_SIZE * FRAME_SIZE
    for at, u in frames(user[:n]):
        k = int(round(at * SAMPLE_RATE))
        for t, s, a in zip(trackers, alone, agents):
            for tracker in (t, s):
                tracker.on_user_audio(u, at)
                tracker.on_agent_audio(a[k:k + FRAME_SIZE], at)
            s.process()
        hub.run_once()
    measured = [t.latencies.last for t in trackers]
    assert measured == [s.latencies.last for s in alone]
    for got, gap in zip(measured, gaps):
        assert got == pytest.approx(1e3 * gap, abs=1e3 * (3 * WINDOW_S + 0.05))
    hub.remove(trackers[0])
    judged = trackers[0].user.stream_seconds
    trackers[0].on_user_audio(speech[:FRAME_SIZE], 99.0)
    hub.run_once()
    assert trackers[0].user.stream_seconds == judged  # removed: the hub no longer judges it
    trackers[0].process()
    assert trackers[0].user.stream_seconds > judged


def test_vad_hub_cost_silero_on_one_torch_thread_others_keep_theirs():
    """The hub's Silero calls run on one intra-op thread (a team per call spun for busy cores: ten
    times the CPU), and neither the starting thread nor threads started later lose their count."""
    import threading
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    hub = VadHub().start()
    try:
        assert hub.torch_threads == 1
        assert torch.get_num_threads() == 2
        later: list[int] = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [2]
    finally:
        hub.stop()
        torch.set_num_threads(before)
