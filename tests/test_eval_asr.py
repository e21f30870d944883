"""agent.eval's ASR side: Telugu CER/WER, and a tiny random Whisper (transformers' own classes, no
download) running through the real pipeline for word timings, `asr` and `score --asr`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import soundfile as sf

from agent.eval.__main__ import main
from agent.eval.asr import AsrError, build_tiny_whisper, load_transcriber
from agent.eval.intelligibility import error_rates, normalise
from agent.eval.speech import place, speak
from agent.eval.transcript import read_words

RATE = 16_000
QUESTION = "నమస్కారం, మీరు ఎలా ఉన్నారు?"


def test_eval_normalise_keeps_telugu_marks_and_drops_punctuation():
    assert normalise("నమస్కారం,  మీరు ఎలా ఉన్నారు?") == "నమస్కారం మీరు ఎలా ఉన్నారు"
    assert normalise("Hello, WORLD!") == "hello world"


def test_eval_error_rates_known_values():
    ref = "నమస్కారం మీరు ఎలా ఉన్నారు"  # 25 code points, 4 words
    rates = error_rates([ref], ["నమస్కారం మీరు ఎల ఉన్నారు"])  # one vowel sign dropped
    assert rates.wer == pytest.approx(1 / 4) and rates.cer == pytest.approx(1 / 25)
    assert error_rates([ref], [ref + "!"]).cer == 0.0  # punctuation is not an error
    # corpus rates: total edits over total reference length, not a mean of rates
    two = error_rates(["అవును", ref], ["", ref])
    assert two.wer == pytest.approx(1 / 5) and two.cer == pytest.approx(5 / 30)
    empty = error_rates(["", "సరే"], ["x", "సరే"])
    assert (empty.n, empty.skipped, empty.cer) == (1, 1, 0.0)


def test_eval_unknown_or_missing_backend_is_a_clear_error():
    with pytest.raises(AsrError, match="unknown ASR backend"):
        load_transcriber("kaldi")
    if importlib.util.find_spec("faster_whisper") is None:
        with pytest.raises(AsrError, match="pip install faster-whisper"):
            load_transcriber("faster-whisper")


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("asr") / "tiny-whisper")


def test_eval_tiny_whisper_gives_timed_words(tiny_whisper):
    transcriber = load_transcriber(f"whisper:{tiny_whisper}", device="cpu")
    audio = speak(QUESTION, "te", RATE)
    words = transcriber.words(audio, RATE, offset_s=2.0)
    assert words, "the tiny Whisper's decoding is limited to letters and spaces: it always says something"
    assert all(2.0 <= w.start <= w.end <= 2.0 + audio.size / RATE + 0.1 for w in words)
    assert [w.start for w in words] == sorted(w.start for w in words)
    assert transcriber.words(audio[:100], RATE) == []  # too short to hear


def sample_set(root: Path) -> None:
    """Two samples: the agent's output.wav says what its output.txt / reference.txt says."""
    q = speak(QUESTION, "te", RATE)
    a = speak("నేను బాగున్నాను", "te+f3", RATE)
    end = 0.5 + q.size / RATE
    for name, ref_file in (("0", "output.txt"), ("1", "reference.txt")):
        folder = root / name
        folder.mkdir(parents=True)
        sf.write(folder / "input.wav", place(6.0, RATE, [(0.5, q)]), RATE)
        sf.write(folder / "output.wav", place(6.0, RATE, [(end + 0.3, a)]), RATE)
        (folder / ref_file).write_text("నేను బాగున్నాను\n", encoding="utf-8")
        (folder / "turn_taking.json").write_text(json.dumps([{"text": "[TURN-TAKING]", "timestamp": [end, end]}]))


@pytest.mark.slow
def test_eval_asr_and_score_with_asr_cli(tmp_path, tiny_whisper, capsys):
    sample_set(tmp_path)
    out = tmp_path / "asr.json"
    assert main(["asr", str(tmp_path), "--asr", f"whisper:{tiny_whisper}", "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    figures = data["intelligibility"]
    assert figures["n"] == 2 and figures["cer"] > 0.5  # random weights: noise, not Telugu
    assert [s["reference_from"] for s in data["samples"]] == ["output.txt", "reference.txt"]
    assert all(s["hypothesis"] for s in data["samples"])
    assert "CER" in capsys.readouterr().out

    scores = tmp_path / "scores.json"
    assert main(["score", str(tmp_path), "--task", "turn-taking", "--asr", f"whisper:{tiny_whisper}",
                 "--device", "cpu", "--json", str(scores)]) == 0
    figures = json.loads(scores.read_text())["turn_taking"]
    assert figures["speech_from"] == [f"asr:whisper:{tiny_whisper}"]
    words = read_words(tmp_path / "0" / "output.json")  # FDB's format, readable by its scripts and ours
    assert words and figures["n"] == 2
