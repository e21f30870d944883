"""The small Telugu CTC recogniser (agent.eval.ctc): the shipped model hears fresh espeak-ng speech of
sentences it never heard, its sentences never meet the project's, and a few-step training run resumes
after an interruption exactly where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.eval.asr import AsrError, load_transcriber
from agent.eval.ctc import sentences as corpus
from agent.eval.ctc import speech
from agent.eval.ctc import train as ctc_train
from agent.eval.ctc.features import RATE
from agent.eval.ctc.model import ModelConfig
from agent.eval.intelligibility import error_rates

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "models" / "asr-te-ctc"
MAX_CER = 0.10  # issue 22: the recogniser's figures count only at <= 10 % on clean held-out espeak-ng speech


def test_telugu_small_asr_shipped_model_hears_unseen_espeak_sentences():
    recipe = json.loads((SHIPPED / "recipe.json").read_text(encoding="utf-8"))
    assert recipe["heldout_clean"]["cer"] <= MAX_CER
    transcriber = load_transcriber("ctc")
    assert "espeak-ng CER" in transcriber.name
    training = recipe["training"]
    fresh = corpus.unseen(12, 99, training["train_sentences"], training["seed"])
    heard_before = {corpus.clean(s) for s in corpus.generate(training["train_sentences"], training["seed"])}
    assert not heard_before & {corpus.clean(s) for s in fresh}
    corpus.assert_disjoint(fresh)
    voices = ("te", "te+f3", "te+m3", "te+f2")
    hyps = [transcriber.text(speech.render(speech.Rendering(s, voices[i % len(voices)])), RATE)
            for i, s in enumerate(fresh)]
    rates = error_rates(fresh, hyps)
    assert rates.n == len(fresh) and rates.cer <= MAX_CER, list(zip(fresh, hyps))
    words = transcriber.words(speech.render(speech.Rendering(fresh[0])), RATE, offset_s=2.0)
    assert words and words[0].start >= 2.0 and all(w.end >= w.start for w in words)
    assert transcriber.words(speech.np.zeros(RATE, speech.np.float32), RATE) == []  # silence: no words


def test_telugu_small_asr_missing_folder_or_other_language_is_a_clear_error(tmp_path):
    with pytest.raises(AsrError, match="recipe.json missing"):
        load_transcriber(f"ctc:{tmp_path}")
    with pytest.raises(AsrError, match="Telugu only"):
        load_transcriber("ctc", language="hi")


def test_telugu_small_asr_sentences_never_meet_the_projects():
    from agent.audio.espeak import TELUGU_TEXT
    from agent.eval import evalset
    from agent.eval.ctc.sentences import ASSETS
    project = corpus.project_sentences()
    lines = [s for s in (ASSETS / "telugu_sentences.txt").read_text(encoding="utf-8").splitlines() if corpus.clean(s)]
    for source in (lines[0], lines[-1], evalset.QUESTIONS[0], evalset.INTERRUPTIONS[0], evalset.MONOLOGUE[0],
                   TELUGU_TEXT):
        assert corpus.clean(source) in project
        assert corpus.overlaps(source) is not None
        assert corpus.overlaps(source + " మరియు") is not None  # a draw containing a project sentence
    with pytest.raises(AssertionError, match="meets the project"):
        corpus.assert_disjoint(["చాలా బాగుంది", evalset.QUESTIONS[0]])
    drawn = corpus.generate(400, 0)
    assert len({corpus.clean(s) for s in drawn}) == 400
    corpus.assert_disjoint(drawn)


def _tiny(out: Path) -> ctc_train.AsrTrainConfig:
    return ctc_train.AsrTrainConfig(out=out, train_sentences=12, heldout_sentences=4, unseen_voice_sentences=4,
                                    steps=4, batch_size=4, warmup=2, eval_every=2, project_check=False, workers=1,
                                    quiet=True, model=ModelConfig(conv=16, hidden=8, layers=1, dropout=0.0))


def test_telugu_small_asr_training_smoke_run_resumes(tmp_path, monkeypatch):
    whole = ctc_train.train_asr(_tiny(tmp_path / "whole"))
    assert [p["step"] for p in whole["curve"]] == [2, 4]

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "data").symlink_to(tmp_path / "whole" / "data")  # same shards; the point is the steps
    real_save = ctc_train._save_state

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # stopped right after the step-2 checkpoint

    monkeypatch.setattr(ctc_train, "_save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ctc_train.train_asr(_tiny(resumed_dir))
    monkeypatch.setattr(ctc_train, "_save_state", real_save)
    resumed = ctc_train.train_asr(_tiny(resumed_dir))
    assert resumed["curve"] == [{**p, "minutes": q["minutes"]} for p, q in zip(whole["curve"], resumed["curve"])]
    assert (resumed_dir / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        ctc_train.train_asr(ctc_train.AsrTrainConfig(**{**_tiny(resumed_dir).__dict__, "lr": 1e-4}))
    assert load_transcriber(f"ctc:{resumed_dir / 'model'}").heldout_cer == resumed["heldout_clean"]["cer"]


def test_telugu_small_asr_codec_round_trip_command(tmp_path, capsys):
    from agent.eval.__main__ import main
    lines = tmp_path / "sentences.txt"
    lines.write_text("\n".join(corpus.unseen(2, 98, 3000, 0)), encoding="utf-8")
    out = tmp_path / "codec.json"
    assert main(["codec", "--asr", "ctc", "--sentences", str(lines), "--json", str(out)]) == 0
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert figures["n"] == 2 and figures["clean"]["cer"] <= MAX_CER
    assert [x["reference"] for x in figures["samples"]] == lines.read_text(encoding="utf-8").splitlines()
    assert all(x["round_trip"] for x in figures["samples"])  # the codec's speech is heard as words
    assert "codec round trip:  CER" in capsys.readouterr().out
