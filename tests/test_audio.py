"""The input path: any layout/dtype/rate in, exact 1920-sample 24 kHz frames out, nothing lost."""

import numpy as np
import pytest

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.audio.stream import ChunkReport, Framer, InputAudio, PolyphaseResampler, resample, to_int16, to_mono_float
from agent.errors import AudioFormatError


def sweep(rate: int, seconds: float, f0: float = 50.0, f1: float = 10_000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    k = (f1 / f0) ** (1 / seconds)
    return (0.5 * np.sin(2 * np.pi * f0 * (k ** t - 1) / np.log(k))).astype(np.float32)


def random_chunks(signal: np.ndarray, rng: np.random.Generator, low: int = 1, high: int = 2000):
    i = 0
    while i < signal.shape[-1]:
        n = int(rng.integers(low, high))
        yield signal[..., i:i + n]
        i += n


@pytest.mark.parametrize("rate", [48_000, 16_000, 44_100, 8_000])
def test_streaming_resample_and_framing_is_exact(rate):
    """A sweep cut into random chunks comes out identical to the same resampler fed in one piece:
    no sample dropped or duplicated at chunk or frame boundaries."""
    signal = sweep(rate, 3.0)
    path = InputAudio()
    frames = []
    for chunk in random_chunks(signal, np.random.default_rng(rate)):
        frames += path.push(rate, chunk)
    streamed = np.concatenate(frames + [path.framer._pending])

    reference = resample(signal, rate, SAMPLE_RATE)  # the same filter over the whole signal at once
    assert all(f.shape == (FRAME_SIZE,) and f.dtype == np.float32 for f in frames)
    np.testing.assert_array_equal(streamed, reference)


@pytest.mark.parametrize("rate", [48_000, 16_000, 44_100, 8_000])
def test_resampler_holds_back_little_audio(rate):
    """With 20 ms chunks (what transports send) the filter holds back under 2 ms: latency."""
    signal = sweep(rate, 2.0)
    path = InputAudio()
    step = rate // 50
    out = sum(len(path.push(rate, signal[i:i + step])) for i in range(0, signal.size, step)) * FRAME_SIZE
    out += path.framer.pending
    assert 0 <= 2.0 * SAMPLE_RATE - out < 0.002 * SAMPLE_RATE


@pytest.mark.parametrize("rate", [48_000, 16_000, 44_100, 8_000])
def test_resampler_keeps_speech_band_and_timing(rate):
    """A 1 kHz tone comes out at 1 kHz, at the same level, in the same place (no time shift)."""
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    out = resample(tone, rate, SAMPLE_RATE)
    expected = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(out.size) / SAMPLE_RATE)
    middle = slice(SAMPLE_RATE // 10, out.size - SAMPLE_RATE // 10)
    assert np.abs(out[middle] - expected[middle]).max() < 0.01


def test_downsampling_removes_what_the_new_rate_cannot_hold():
    """A 20 kHz tone at 48 kHz would alias to 4 kHz at 24 kHz: the filter must remove it."""
    t = np.arange(48_000) / 48_000
    out = PolyphaseResampler(48_000, SAMPLE_RATE).process((0.5 * np.sin(2 * np.pi * 20_000 * t)).astype(np.float32))
    assert np.sqrt(np.mean(out[2400:-2400] ** 2)) < 0.005


def test_24k_input_passes_through_bit_exact():
    signal = sweep(SAMPLE_RATE, 1.0)
    path = InputAudio()
    frames = []
    for chunk in random_chunks(signal, np.random.default_rng(0)):
        frames += path.push(SAMPLE_RATE, chunk)
    out = np.concatenate(frames)
    np.testing.assert_array_equal(out, signal[:out.size])
    assert out.size == (signal.size // FRAME_SIZE) * FRAME_SIZE


def test_rate_change_mid_stream_keeps_timeline():
    """A client that switches rate (e.g. renegotiation) loses no audio: output length matches time."""
    path = InputAudio()
    frames = path.push(48_000, sweep(48_000, 1.0)) + path.push(16_000, sweep(16_000, 1.0))
    total = len(frames) * FRAME_SIZE + path.framer.pending
    assert abs(total - 2 * SAMPLE_RATE) < 0.01 * SAMPLE_RATE


def test_layouts_and_dtypes():
    mono = (np.sin(np.arange(4800) / 10) * 0.5).astype(np.float32)
    as_int16 = (mono * 32767).astype(np.int16)
    stereo_cn = np.stack([mono, mono])  # (C, N) as fastrtc/av hand it over
    stereo_nc = stereo_cn.T.copy()  # (N, C) as files and sound cards do
    np.testing.assert_allclose(to_mono_float(as_int16), mono, atol=1e-4)
    np.testing.assert_allclose(to_mono_float(as_int16.reshape(1, -1)), mono, atol=1e-4)
    np.testing.assert_allclose(to_mono_float(stereo_cn), mono, atol=1e-6)
    np.testing.assert_allclose(to_mono_float(stereo_nc), mono, atol=1e-6)
    np.testing.assert_allclose(to_mono_float(mono.astype(np.float64)), mono, atol=1e-7)
    np.testing.assert_allclose(to_mono_float(as_int16.astype(np.int32) << 16), mono, atol=1e-4)
    # unsigned 8-bit WAV style: 128 is silence
    np.testing.assert_allclose(to_mono_float(np.full(10, 128, np.uint8)), np.zeros(10), atol=1e-7)
    # opposite channels cancel: proves channels are mixed, not one picked
    assert np.abs(to_mono_float(np.stack([mono, -mono]))).max() < 1e-6


def test_non_finite_and_out_of_range_are_repaired_and_counted():
    x = np.array([0.5, np.nan, np.inf, -np.inf, 3.0, -0.25], np.float32)
    report = ChunkReport()
    y = to_mono_float(x, report)
    assert np.isfinite(y).all() and np.abs(y).max() <= 1.0
    assert report.non_finite == 3 and report.clipped == 1
    assert y[0] == pytest.approx(0.5) and y[-1] == pytest.approx(-0.25)


@pytest.mark.parametrize("bad, rate, match", [
    (np.zeros((2, 3, 4), np.float32), 24_000, "1-D or 2-D"),
    (np.array(["a", "b"]), 24_000, "integer or float"),
    (np.zeros((100, 20), np.float32), 24_000, "channels"),
    (np.zeros(480, np.float32), 0, "sample rate"),
    (np.zeros(480, np.float32), 10**7, "sample rate"),
    (np.zeros(11 * 16_000, np.float32), 16_000, "limit"),
])
def test_bad_input_gives_clear_errors(bad, rate, match):
    with pytest.raises(AudioFormatError, match=match):
        InputAudio().push(rate, bad)


def test_empty_chunk_is_a_no_op():
    path = InputAudio()
    assert path.push(48_000, np.zeros(0, np.int16)) == []
    assert path.push(48_000, np.zeros((1, 0), np.int16)) == []
    assert path.framer.pending == 0


def test_framer_remainder_and_int16_roundtrip():
    framer = Framer(4)
    assert [f.tolist() for f in framer.push(np.arange(10, dtype=np.float32))] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert framer.pending == 2
    assert [f.tolist() for f in framer.push(np.arange(10, 12, dtype=np.float32))] == [[8, 9, 10, 11]]
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    np.testing.assert_allclose(to_int16(x).astype(np.float32) / 32767, x, atol=1 / 32767)


def test_ulaw_is_bit_exact_with_audioop():
    """Every 16-bit sample and every μ-law byte against Python's own G.711 code (gone in 3.13)."""
    audioop = pytest.importorskip("audioop", reason="Python 3.13 removed audioop; the G.711 points below still run")
    from agent.audio.stream import ulaw_decode, ulaw_encode

    every_sample = np.arange(-32768, 32768, dtype=np.int16)
    assert ulaw_encode(every_sample) == audioop.lin2ulaw(every_sample.tobytes(), 2)
    every_byte = bytes(range(256))
    np.testing.assert_array_equal(ulaw_decode(every_byte),
                                  np.frombuffer(audioop.ulaw2lin(every_byte, 2), dtype=np.int16))


def test_ulaw_g711_reference_points():
    from agent.audio.stream import ulaw_decode, ulaw_encode

    # G.711 μ-law: 0 is 0xFF, full scale is 0x80 / 0x00, the decoder's peak is ±32124, and the
    # encoder's first segment steps by 8 (in 16-bit terms) around zero.
    assert ulaw_encode(np.array([0, 32767, -32768, 8, -8], np.int16)) == bytes([0xFF, 0x80, 0x00, 0xFE, 0x7E])
    assert ulaw_decode(bytes([0xFF, 0x7F, 0x80, 0x00])).tolist() == [0, 0, 32124, -32124]
    x = np.random.default_rng(0).integers(-32768, 32768, 10_000).astype(np.int16)
    back = ulaw_decode(ulaw_encode(x)).astype(np.int32)
    # μ-law keeps the relative error under ~3 % above the first segments
    big = np.abs(x) > 1000
    assert np.max(np.abs(back[big] - x[big]) / np.abs(x[big])) < 0.035
    assert ulaw_decode(b"").shape == (0,) and ulaw_encode(np.zeros(0, np.int16)) == b""


def test_wsclient_runs_without_audioop():
    """Python 3.13 has no audioop: the client must import and code μ-law without it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['audioop'] = None\n"
            "import numpy as np\n"
            "from agent.tools.wsclient import decode_media, encode_media\n"
            "x = np.sin(np.arange(480) / 10).astype(np.float32) * 0.5\n"
            "y = decode_media(encode_media(x))\n"
            "assert y.shape == x.shape and np.max(np.abs(y - x)) < 0.02, np.max(np.abs(y - x))\n")
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("rates", [(24_000, 8_000), (48_000, 24_000), (44_100, 24_000)])
def test_resampler_cost_streams_together_match_each_alone(rates):
    """The VAD resamples every call's stream in one pass (process_together): bit-identical to each
    stream alone, whatever the chunk sizes and however the streams' phases differ."""
    rng = np.random.default_rng(5)
    streams = [sweep(rates[0], 4.0, f0=60.0 + 40 * i) for i in range(5)]
    alone = [PolyphaseResampler(*rates) for _ in streams]
    together = [PolyphaseResampler(*rates) for _ in streams]
    at, compared = [0] * len(streams), 0
    for step in range(40):
        # some rounds all streams alike (one group), others each its own length (its own phase)
        sizes = [1920] * len(streams) if step % 3 else [int(rng.integers(0, 2500)) for _ in streams]
        chunks = [s[a:a + n] for s, a, n in zip(streams, at, sizes)]
        at = [a + c.size for a, c in zip(at, chunks)]
        want = [r.process(c) for r, c in zip(alone, chunks)]
        got = PolyphaseResampler.process_together(together, chunks)
        for w, g in zip(want, got):
            assert g.dtype == np.float32 and np.array_equal(w, g)
            compared += w.size
    assert compared > 0.99 * sum(at) * rates[1] / rates[0] - 100  # every output sample was compared
