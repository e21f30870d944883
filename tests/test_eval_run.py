"""`python -m agent.eval run`: a set goes through the live engine, many samples in one batch.

On the tiny random-weight model (real moshi streaming code). Exactness checks use greedy sampling:
a batch of seats must give each sample what it gets alone, and what `agent.tools.infer` (one seat) gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.eval.__main__ import main
from agent.eval.layout import find_samples
from agent.eval.runner import RunConfig, SeatOptions, run_set
from agent.tools.infer import infer
from conftest import tiny_model
from tiny_helpers import GREEDY, varied_audio


def make_set(root: Path) -> dict[str, tuple[int, int]]:
    """Three samples at different rates, layouts and lengths; returns name -> (rate, samples)."""
    specs = {"0": (24_000, 11, "float"), "1": (16_000, 7, "int16"), "2": (48_000, 9, "stereo")}
    out = {}
    for i, (name, (rate, n_frames, kind)) in enumerate(specs.items()):
        audio = varied_audio(n_frames, seed=10 + i)  # 24 kHz
        from agent.audio.stream import resample
        audio = resample(audio, SAMPLE_RATE, rate)[: n_frames * FRAME_SIZE * rate // SAMPLE_RATE - 37]
        folder = root / name
        folder.mkdir(parents=True)
        if kind == "stereo":
            sf.write(folder / "input.wav", np.stack([audio, 0.5 * audio], axis=1), rate, subtype="PCM_16")
        else:
            sf.write(folder / "input.wav", audio, rate, subtype="PCM_16" if kind == "int16" else "FLOAT")
        out[name] = (rate, audio.size)
    (root / "1" / "turn_taking.json").write_text(json.dumps([{"text": "[TURN-TAKING]", "timestamp": [0.3, 0.5]}]))
    return out


def outputs(root: Path) -> dict[str, np.ndarray]:
    return {f.name: sf.read(f / "output.wav", dtype="int16")[0] for f in sorted(root.iterdir())}


def test_eval_run_writes_aligned_mono_outputs_in_the_benchmark_layout(tmp_path):
    specs = make_set(tmp_path)
    report = run_set(tiny_model(), find_samples(tmp_path), config=RunConfig(seats=2, sampling=GREEDY))
    assert report.samples == 3 and report.skipped == 0
    assert report.steps == 7 + 9  # two seats: 0 (11 frames) and 1 (7); 2 (9) takes 1's seat when it ends
    for name, (rate, n) in specs.items():
        info = sf.info(tmp_path / name / "output.wav")
        assert (info.channels, info.samplerate, info.frames, info.subtype) == (1, rate, n, "PCM_16")
        audio, _ = sf.read(tmp_path / name / "output.wav", dtype="float32")
        assert not audio[: rate * FRAME_SIZE // SAMPLE_RATE - rate // 1000].any()  # frame 0: Moshi's delay
        assert np.abs(audio).max() > 0  # the tiny model's (noise) voice after it
        assert (tmp_path / name / "output.txt").exists()


def test_eval_run_samples_in_one_batch_do_not_mix(tmp_path):
    """Greedy, 3 seats: sample 0's output is the same whatever its batch neighbours hear (same batch
    size and row: the same arithmetic, so exact; across batch sizes rounding may differ, see
    tests/test_engine.py)."""
    make_set(tmp_path / "a")
    make_set(tmp_path / "b")
    for name, seed in (("1", 99), ("2", 98)):  # other audio beside sample 0
        sf.write(tmp_path / "b" / name / "input.wav", varied_audio(9, seed), SAMPLE_RATE)
    run_set(tiny_model(), find_samples(tmp_path / "a"), config=RunConfig(seats=3, sampling=GREEDY))
    run_set(tiny_model(), find_samples(tmp_path / "b"), config=RunConfig(seats=3, sampling=GREEDY))
    a, b = outputs(tmp_path / "a"), outputs(tmp_path / "b")
    np.testing.assert_array_equal(a["0"], b["0"])
    assert (tmp_path / "a" / "0" / "output.txt").read_text() == (tmp_path / "b" / "0" / "output.txt").read_text()
    assert not np.array_equal(a["1"][:4000], b["1"][:4000])  # the check can fail: other input, other output


def test_eval_run_one_seat_equals_agent_infer(tmp_path):
    """The same engine as `agent.tools.infer` (one seat): the same audio and text, greedy."""
    make_set(tmp_path)
    samples = [s for s in find_samples(tmp_path) if s.name == "0"]  # the 24 kHz float sample
    run_set(tiny_model(), samples, config=RunConfig(seats=1, sampling=GREEDY))
    audio, _ = sf.read(tmp_path / "0" / "input.wav", dtype="float32")
    expected = infer(tiny_model(), audio, GREEDY)
    got, _ = sf.read(tmp_path / "0" / "output.wav", dtype="float32")
    np.testing.assert_allclose(got, expected.pcm[: audio.size], atol=1 / 32768)  # 16-bit rounding
    assert (tmp_path / "0" / "output.txt").read_text().strip() == expected.text


def test_eval_run_voice_option_reaches_the_seat(tmp_path):
    make_set(tmp_path / "a")
    make_set(tmp_path / "b")
    run_set(tiny_model(), find_samples(tmp_path / "a"), SeatOptions(voice="ravi", emotion="sad"),
            RunConfig(seats=3, sampling=GREEDY))
    run_set(tiny_model(), find_samples(tmp_path / "b"), SeatOptions(), RunConfig(seats=3, sampling=GREEDY))
    assert not np.array_equal(outputs(tmp_path / "a")["0"], outputs(tmp_path / "b")["0"])


def test_eval_run_cli_rate_skip_and_errors(tmp_path, capsys, caplog):
    make_set(tmp_path)
    args = ["run", str(tmp_path), "--model", "tiny", "--device", "cpu", "--seats", "3", "--greedy"]
    assert main([*args, "--output-rate", "16000"]) == 0
    assert "3 samples" in capsys.readouterr().out
    assert sf.info(tmp_path / "2" / "output.wav").samplerate == 16_000
    assert sf.info(tmp_path / "2" / "output.wav").frames == round(specs_len(tmp_path / "2") / 3)
    (tmp_path / "0" / "output.json").write_text("{}")  # a transcript of that output
    assert main([*args, "--skip-existing"]) == 0
    assert "0 samples" in capsys.readouterr().out and (tmp_path / "0" / "output.json").exists()
    assert main(args) == 0
    assert not (tmp_path / "0" / "output.json").exists()  # stale transcript removed with the old output
    assert main([*args, "--voice", "nobody"]) == 2
    assert "unknown voice 'nobody'" in caplog.text
    sf.write(tmp_path / "1" / "input.wav", np.zeros(0, np.float32), 16_000)
    assert main(args) == 2
    assert "input.wav: empty" in caplog.text


def specs_len(folder: Path) -> int:
    return sf.info(folder / "input.wav").frames


def test_eval_run_clean_prefix_and_seeded_sampling(tmp_path):
    """v1.5's clean_input.wav -> clean_output.wav; a sampled run repeats itself for the same seed."""
    for root in ("a", "b", "c"):
        folder = tmp_path / root / "0"
        folder.mkdir(parents=True)
        sf.write(folder / "input.wav", varied_audio(6, seed=1), SAMPLE_RATE)
        sf.write(folder / "clean_input.wav", varied_audio(5, seed=2), SAMPLE_RATE)

    def sampled(seed):
        return RunConfig(seats=1, seed=seed, prefix="clean_")

    for root, seed in (("a", 7), ("b", 7), ("c", 8)):
        run_set(tiny_model(), find_samples(tmp_path / root), config=sampled(seed))

    def read(root):
        return sf.read(tmp_path / root / "0" / "clean_output.wav", dtype="int16")[0]

    assert not (tmp_path / "a" / "0" / "output.wav").exists()
    assert read("a").size == 5 * FRAME_SIZE
    np.testing.assert_array_equal(read("a"), read("b"))
    assert not np.array_equal(read("a"), read("c"))  # the check can fail: another seed, other draws
