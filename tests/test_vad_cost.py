"""What the VAD costs: Silero's ONNX build on onnxruntime for small batches (its fixed cost per call
is a fifth of TorchScript's), TorchScript for large ones and where onnxruntime is missing, and one
network call per window round for every stream of every call. The figures are benchmarks
(`python -m agent.tools.loadtest vad`, docs/benchmarks.md); these tests check the behaviour."""

import sys

import numpy as np
import pytest

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.audio.stream import resample
from agent.calls.vad import (
    CONTEXT,
    ONNX_MAX_BATCH,
    VAD_RATE,
    WINDOW,
    Silero,
    TurnLatencyTracker,
)

AGREEMENT = 1e-5  # measured: 8.3e-7 at most over 30 s of espeak Telugu, one stream


def speech_windows(speech: np.ndarray) -> np.ndarray:
    audio = resample(np.concatenate([np.zeros(SAMPLE_RATE // 3, np.float32), speech]), SAMPLE_RATE, VAD_RATE)
    return audio[:audio.size // WINDOW * WINDOW].reshape(-1, WINDOW)


def judge_stream(silero: Silero, windows: np.ndarray) -> np.ndarray:
    """One stream, window by window, its state carried along."""
    state, context, probs = Silero.initial_state(), np.zeros((1, CONTEXT), np.float32), []
    for w in windows:
        prob, state = silero(w[None], context, state)
        context = w[None, -CONTEXT:]
        probs.append(prob[0])
    return np.array(probs)


def test_vad_cost_onnx_and_torchscript_agree_on_telugu_speech(telugu_speech):
    """The ONNX build gives TorchScript's speech probabilities (and so the same turns and latencies)."""
    _, speech = telugu_speech
    windows = speech_windows(speech)
    onnx, torchscript = Silero(torchscript=False), Silero(onnx=False)
    assert (onnx.backends, torchscript.backends) == (("onnx",), ("torchscript",))
    got, want = judge_stream(onnx, windows), judge_stream(torchscript, windows)
    np.testing.assert_allclose(got, want, rtol=0, atol=AGREEMENT)
    assert np.array_equal(got >= 0.5, want >= 0.5)
    assert want.max() > 0.9 and want.min() < 0.1  # speech and silence both there: the check can fail
    assert onnx.calls == {"onnx": len(windows), "torchscript": 0}
    assert torchscript.calls == {"onnx": 0, "torchscript": len(windows)}


def test_vad_cost_small_batches_on_onnxruntime_large_on_torchscript(telugu_speech):
    """A batch up to ONNX_MAX_BATCH windows goes to onnxruntime, a larger one to TorchScript (cheaper
    per window there); a stream's probability is the same in either."""
    _, speech = telugu_speech
    windows = speech_windows(speech)[10:10 + ONNX_MAX_BATCH + 1]
    contexts = np.zeros((len(windows), CONTEXT), np.float32)
    silero = Silero()
    assert silero.backends == ("onnx", "torchscript")
    small, _ = silero(windows[:ONNX_MAX_BATCH], contexts[:ONNX_MAX_BATCH], Silero.initial_state(ONNX_MAX_BATCH))
    assert silero.calls == {"onnx": 1, "torchscript": 0}
    large, states = silero(windows, contexts, Silero.initial_state(len(windows)))
    assert silero.calls == {"onnx": 1, "torchscript": 1}
    assert states.shape == (2, len(windows), 128)
    np.testing.assert_allclose(small, large[:ONNX_MAX_BATCH], rtol=0, atol=AGREEMENT)
    assert large.max() > 0.5  # speech in the batch: the probabilities say something


def test_vad_cost_falls_back_to_torchscript_without_onnxruntime(monkeypatch, telugu_speech):
    """Where onnxruntime is not installed, the VAD still runs (on TorchScript alone)."""
    _, speech = telugu_speech
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    silero = Silero()
    assert silero.backends == ("torchscript",)
    probs = judge_stream(silero, speech_windows(speech)[:40])
    assert silero.calls == {"onnx": 0, "torchscript": 40} and probs.max() > 0.5
    with pytest.raises(ImportError):
        Silero(torchscript=False)


def test_vad_cost_one_silero_call_per_window_round_for_every_stream(telugu_speech):
    """Both directions of eight calls: one network call per window round, not one per stream."""
    _, speech = telugu_speech
    trackers = [TurnLatencyTracker(label=str(i)) for i in range(8)]
    silero = Silero.shared()
    before = sum(silero.calls.values())
    for i, t in enumerate(trackers):  # one 80 ms frame each way: 638 samples at 8 kHz, 2 windows
        offset = SAMPLE_RATE + 3 * i * FRAME_SIZE  # into the speech: loud windows in every round
        t.on_user_audio(speech[offset:offset + FRAME_SIZE], 0.0)
        t.on_agent_audio(speech[offset + FRAME_SIZE:offset + 2 * FRAME_SIZE], 0.0)
    TurnLatencyTracker.judge_all(trackers)
    assert all(t.user.stream_seconds == t.agent.stream_seconds == 2 * WINDOW / VAD_RATE for t in trackers)
    assert sum(silero.calls.values()) - before == 2
