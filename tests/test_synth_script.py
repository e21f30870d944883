"""Synthetic dialogues (agent/train/script.py, synth.py, tts.py) through the real CLI: espeak-ng's Telugu
voices via libespeak-ng, the tiny Moshi for tokens/train/export, the app's own loader at the end.

The chain test is issue 13's "done when": script -> synth -> tokens -> train -> export -> load.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent.train.__main__ import main
from agent.voices import EMOTION, SPEAKER, load_catalogue
from synth_helpers import FAIL_WORD
from train_helpers import read_jsonl as _jsonl
from train_helpers import train_cli as _cli

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ROOT / "assets" / "telugu_sentences.txt"
CATALOGUE = load_catalogue()
VOICES, EMOTIONS = {v.id for v in CATALOGUE.voices}, {e.id for e in CATALOGUE.emotions}


def _active(channel: np.ndarray, hop: int = 480, floor_db: float = -50) -> np.ndarray:
    """Per 20 ms: True where the channel carries sound (silence between turns is digital zero)."""
    n = channel.size // hop
    return np.sqrt(np.mean(channel[:n * hop].reshape(n, hop) ** 2, axis=1)) > 10 ** (floor_db / 20)


def _frames(start: float, end: float) -> slice:
    return slice(int(start / 0.02), max(int(start / 0.02) + 1, int(end / 0.02)))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """The issue's two commands: script --sentences FILE --count 20 --seed 7, then synth --tts espeak."""
    work = tmp_path_factory.mktemp("synth")
    _cli("script", "--sentences", str(SENTENCES), "--count", "20", "--seed", "7", "--out", str(work / "A"))
    _cli("synth", "--in", str(work / "A"), "--tts", "espeak", "--out", str(work / "B"))
    return work


@pytest.mark.slow
def test_script_synth_chain_gives_labelled_stereo_dialogues_the_app_loads(made, tmp_path):
    a, b = made / "A", made / "B"
    scripts, records = _jsonl(a / "manifest.jsonl"), _jsonl(b / "manifest.jsonl")
    assert len(scripts) == 20 and len(records) == 20
    assert {r["agent_voice"] for r in records} == VOICES
    assert {t["emotion"] for r in records for t in r["turns"] if t["role"] == "agent"} == EMOTIONS
    events = {k: sum(r["events"].get(k, 0) for r in records) for k in ("backchannels", "interruptions", "overlaps",
                                                                         "pauses")}
    assert all(n > 0 for n in events.values()), events
    both_share = []
    for record in records:
        audio, rate = sf.read(b / record["path"], dtype="float32", always_2d=True)
        assert rate == 24_000 and audio.shape[1] == 2
        left, right = _active(audio[:, 0]), _active(audio[:, 1])
        assert left.sum() * 0.02 > 1.0 and right.sum() * 0.02 > 1.0, record["id"]  # both sides speak
        both_share.append((left & right).sum() / max(1, (left | right).sum()))
        labels = json.loads((b / record["alignment"]).read_text(encoding="utf-8"))
        assert labels["text_conditions"] == {SPEAKER: record["agent_voice"], EMOTION: record["emotion"]}
        main_words = [w for w in labels["alignments"] if w[2] == "SPEAKER_MAIN"]
        assert len(main_words) == record["n_words"] > 0
        # Exact timings: every agent word lies on sound on the LEFT, and outside the agent's turns the LEFT is
        # silent (labels and audio come from the same placement).
        voiced = np.mean([left[_frames(*w[1])].mean() for w in main_words])
        assert voiced > 0.85, (record["id"], voiced)
        inside = np.zeros_like(left)
        for turn in record["turns"]:
            if turn["role"] == "agent":
                inside[_frames(turn["start"], turn["end"] + 0.04)] = True
                assert all(turn["start"] <= w[1] <= w[2] <= turn["end"] + 1e-3 for w in turn["words"])
        assert (left & ~inside).sum() <= 2, record["id"]
        # An interrupted turn stops shortly after the other side starts.
        for n, turn in enumerate(record["turns"]):
            if turn["interrupted"]:
                cutter = next(t for t in record["turns"][n + 1:] if t["role"] != turn["role"] and t["kind"] == "turn")
                assert cutter["start"] < turn["end"] <= cutter["start"] + 0.35
        prompt, prompt_rate = sf.read(b / record["voice_prompt"], dtype="float32", always_2d=True)
        assert prompt_rate == 24_000 and prompt.shape[1] == 1 and _active(prompt[:, 0]).sum() > 10
    assert np.mean(both_share) < 0.2, both_share  # mostly in turns
    card = json.loads((b / "card.json").read_text())
    assert card["dialogues"] == 20 and card["hours"] > 0.05 and set(card["agent_voices"]) == VOICES
    assert set(card["agent_turns_per_emotion"]) == EMOTIONS and card["user_voices"] >= 8
    assert card["generator"]["tts"]["name"] == "espeak-ng" and card["generator"]["script_seeds"] == [7]
    # Measured on the audio: each emotion's settings change pitch, rate and level the way they should.
    effects = card["emotion_effects"]
    assert effects["neutral"] == {"f0_ratio": 1.0, "rate_ratio": 1.0, "level_db": 0.0}
    assert effects["surprised"]["f0_ratio"] > effects["happy"]["f0_ratio"] > 1.05 > 0.95 > effects["sad"]["f0_ratio"]
    assert effects["sad"]["rate_ratio"] < 0.9 < 1.05 < effects["angry"]["rate_ratio"]
    assert effects["sad"]["level_db"] < -1 and effects["angry"]["level_db"] > 1
    assert "MIT" in (b / "README.md").read_text()

    # tokens reads synth's folder as align's; a tiny training run; export; the app's loader loads it.
    tokens, run, model = tmp_path / "tokens", tmp_path / "run", tmp_path / "model"
    _cli("tokens", "--in", str(b / "manifest.jsonl"), "--out", str(tokens))
    shards = _jsonl(tokens / "manifest.jsonl")
    assert len(shards) == 20 and all(s["conditions"][SPEAKER] in VOICES and s["conditions"][EMOTION] in EMOTIONS
                                     for s in shards)
    _cli("train", "--in", str(tokens / "manifest.jsonl"), "--out", str(run), "--max-steps", "3", "--batch-size", "2",
         "--duration-sec", "4", "--lora-rank", "4", "--checkpoint-every", "3", "--no-gradient-checkpointing")
    _cli("export", "--in", str(run), "--out", str(model), "--dtype", "fp32")
    from agent.config import ModelConfig
    from agent.models import load_model
    loaded = load_model(ModelConfig(model=str(model), device="cpu", dtype="float32"))
    assert set(loaded.condition_values[SPEAKER]) >= VOICES and set(loaded.condition_values[EMOTION]) >= EMOTIONS
    import app
    models, _, _ = app.configs(app.parse_args(["--model", str(model)]))
    assert models[0].model == str(model)


def _line(voice: str = "ravi", emotion: str = "happy", **changes) -> dict:
    script = {"voice": voice, "persona": "You are Ravi, a travel desk agent.", "licence": "CC-BY-4.0",
              "prompt_text": "రేపు మనం కలుద్దాం.",
              "turns": [{"speaker": "user", "text": "బస్సు ఎప్పుడు వస్తుంది?"},
                        {"speaker": "agent", "text": "బస్సు పది నిమిషాల్లో వస్తుంది, దయచేసి వేచి ఉండండి.",
                         "emotion": emotion},
                        {"speaker": "user", "text": "సరే", "kind": "backchannel"},
                        {"speaker": "user", "text": "ధన్యవాదాలు, మళ్ళీ కలుద్దాం.", "interrupts": True}]}
    script.update(changes)
    return script


def test_script_from_jsonl_skips_bad_lines_with_reasons(tmp_path):
    good = _line()
    bad = {
        "empty": _line(turns=[{"speaker": "user", "text": "  "}, *good["turns"][1:]]),
        "long": _line(turns=[{"speaker": "user", "text": "అ" * 401}, *good["turns"][1:]]),
        "voice": _line(voice="robot"),
        "emotion": _line(emotion="bored"),
        "speaker": _line(turns=[{"speaker": "narrator", "text": "ఒకసారి"}, *good["turns"][1:]]),
        "one side": _line(turns=[good["turns"][0], good["turns"][0]]),
        "backchannel first": _line(turns=[{"speaker": "user", "text": "సరే", "kind": "backchannel"},
                                          *good["turns"][1:]]),
        "licence": _line(licence=""),
    }
    lines = [json.dumps(good, ensure_ascii=False), "{not json", *[json.dumps(x, ensure_ascii=False)
                                                                  for x in bad.values()]]
    (tmp_path / "scripts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _cli("script", "--from", str(tmp_path / "scripts.jsonl"), "--out", str(tmp_path / "A"))
    kept = _jsonl(tmp_path / "A/manifest.jsonl")
    assert [k["id"] for k in kept] == ["jsonl-000001"] and kept[0]["turns"][3]["interrupts"] is True
    reasons = [r["reason"] for r in _jsonl(tmp_path / "A/report.jsonl")]
    assert len(reasons) == 1 + len(bad)
    for expected in ("not JSON", "empty text (turn 1)", "too long (turn 1: 401", "unknown voice 'robot'",
                     "unknown emotion 'bored'", "speaker must be", "by both the agent and the user",
                     "must follow the other side",
                     "no licence"):
        assert any(expected in r for r in reasons), (expected, reasons)
    kinds = json.loads((tmp_path / "A/summary.json").read_text())["reasons"]  # skips grouped by problem
    assert kinds["empty text"] == kinds["text too long"] == kinds["not JSON"] == 1


@pytest.mark.slow
def test_script_is_deterministic_by_seed_and_worker_count(tmp_path):
    def manifest(out: str, *extra: str) -> str:
        _cli("script", "--sentences", str(SENTENCES), "--count", "12", "--out", str(tmp_path / out), *extra)
        return (tmp_path / out / "manifest.jsonl").read_text(encoding="utf-8")

    first = manifest("a", "--seed", "3")
    assert manifest("b", "--seed", "3", "--workers", "2") == first
    assert manifest("c", "--seed", "4") != first
    again = main(["script", "--sentences", str(SENTENCES), "--count", "12", "--seed", "3", "--out",
                  str(tmp_path / "a"), "--quiet"])
    assert again == 0 and json.loads((tmp_path / "a/summary.json").read_text())["reused"] == 12


def test_script_refuses_text_without_a_licence(tmp_path, capsys):
    bare = tmp_path / "sentences.txt"
    bare.write_text(SENTENCES.read_text(encoding="utf-8"), encoding="utf-8")
    assert main(["script", "--sentences", str(bare), "--count", "2", "--out", str(tmp_path / "A")]) == 2
    assert "no licence" in capsys.readouterr().err
    (tmp_path / "sentences.txt.licence").write_text("CC-BY-4.0\n")
    _cli("script", "--sentences", str(bare), "--count", "2", "--out", str(tmp_path / "A"))
    assert {s["licence"] for s in _jsonl(tmp_path / "A/manifest.jsonl")} == {"CC-BY-4.0"}


@pytest.mark.slow
def test_synth_tts_failure_skips_that_dialogue_and_flags_share_alike(tmp_path):
    lines = [_line(id="fine"), _line(id="broken", turns=[{"speaker": "user", "text": f"ఇది {FAIL_WORD}"},
                                                          *_line()["turns"][1:]]),
             _line(id="shared", voice="lakshmi", licence="CC-BY-SA-4.0 (OpenSLR SLR66)")]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), "utf-8")
    _cli("script", "--from", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "A"))
    _cli("synth", "--in", str(tmp_path / "A"), "--tts", "synth_helpers:FailingEspeak", "--out", str(tmp_path / "B"))
    assert [r["id"] for r in _jsonl(tmp_path / "B/manifest.jsonl")] == ["fine", "shared"]
    report = _jsonl(tmp_path / "B/report.jsonl")
    skipped = [r for r in report if r["action"] == "skipped"]
    assert [(r["item"], r["reason"]) for r in skipped] == [
        ("broken", "tts failed (turn 1, user): engine crashed (injected)")]
    assert any(r["item"] == "shared" and "share-alike" in r["reason"] for r in report)
    card = json.loads((tmp_path / "B/card.json").read_text())
    assert card["share_alike"] == ["CC-BY-SA-4.0 (OpenSLR SLR66)"] and card["skipped"] == 1
    assert "Share-alike" in (tmp_path / "B/README.md").read_text()
    # A bad script reaching synth (a hand-edited manifest) is skipped too, with its reason.
    edited = _jsonl(tmp_path / "A/manifest.jsonl")
    edited[0]["turns"][1]["emotion"] = "bored"
    (tmp_path / "A/manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in edited))
    _cli("synth", "--in", str(tmp_path / "A"), "--out", str(tmp_path / "C"))
    assert any("bad script" in r["reason"] and "bored" in r["reason"] for r in _jsonl(tmp_path / "C/report.jsonl"))


@pytest.mark.slow
def test_synth_user_noise_and_room_touch_only_the_user_channel(made, tmp_path):
    _cli("script", "--sentences", str(SENTENCES), "--count", "3", "--seed", "7", "--out", str(tmp_path / "A"))
    _cli("synth", "--in", str(tmp_path / "A"), "--out", str(tmp_path / "noisy"), "--user-noise-prob", "1",
         "--user-room-prob", "1")
    for record in _jsonl(tmp_path / "noisy/manifest.jsonl"):
        clean, _ = sf.read(made / "B" / record["path"], dtype="float32")
        noisy, _ = sf.read(tmp_path / "noisy" / record["path"], dtype="float32")
        assert np.array_equal(clean[:, 0], noisy[:, 0])  # the agent's channel is untouched
        # noise (15-35 dB under the speech) fills the user's pauses, which are digital silence without it
        assert _active(noisy[:, 1], floor_db=-100).all() and not _active(clean[:, 1], floor_db=-100).all()
        assert set(record["acoustics"]) == {"room_rt60_s", "noise_snr_db", "user_lufs"}


@pytest.mark.slow
def test_synth_killed_run_resumes_to_the_same_files(made, tmp_path):
    out = tmp_path / "B"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "agent.train", "synth", "--in", str(made / "A"), "--out", str(out), "--quiet",
            "--tts", "synth_helpers:SlowEspeak"]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list((out / ".done").glob("*.json"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.jsonl").exists()
    done = len(list((out / ".done").glob("*.json")))
    assert 3 <= done < 20
    subprocess.run(argv, env=env, cwd=ROOT, check=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reused"] >= done and summary["reused"] + summary["made"] == summary["kept"] == 20
    # the uninterrupted run, in the same kind of process (the last bit of a float sum can follow the
    # process's thread settings, which a pytest process shares with every test that ran before)
    whole = tmp_path / "whole"
    subprocess.run([*argv[:argv.index("--out") + 1], str(whole), *argv[argv.index("--out") + 2:]], env=env,
                   cwd=ROOT, check=True, timeout=300)
    for record in _jsonl(whole / "manifest.jsonl"):  # the same bytes as the uninterrupted run
        assert (out / record["path"]).read_bytes() == (whole / record["path"]).read_bytes()
        assert (out / record["alignment"]).read_bytes() == (whole / record["alignment"]).read_bytes()
    assert not list(out.rglob(".*.tmp*"))  # no half-written file left behind


@pytest.mark.slow
def test_script_llm_writes_with_a_tiny_random_model(tmp_path):
    """A tiny random Llama from transformers' own classes and a word-level tokenizer built here (no download).
    Its final norm is zeroed, so it samples words uniformly: 'A:'/'U:' markers and Telugu words in random
    order, which the parser must turn into turns, and whose lines must then pass validation."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["A:", "U:", "\n", "నమస్కారం", "బస్సు", "వస్తుంది", "సరే", "ఎప్పుడు", "మీరు", "ఎలా", "ఉన్నారు?"]
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=1, bos_token_id=1)
    model = transformers.LlamaForCausalLM(config)
    model.model.norm.weight.data.zero_()
    model.generation_config.eos_token_id = None  # never stop early: a full reply every time
    folder = tmp_path / "tiny-llm"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    _cli("script", "--llm", str(folder), "--count", "3", "--seed", "1", "--licence", "CC0-1.0", "--out",
         str(tmp_path / "A"), "--llm-device", "cpu")
    kept = _jsonl(tmp_path / "A/manifest.jsonl")
    assert len(kept) == 3 and all(k["source"] == f"llm:{folder}" for k in kept)
    for script in kept:
        assert {t["speaker"] for t in script["turns"]} == {"agent", "user"}
        assert all(set(t["text"].split()) <= set(words) for t in script["turns"] if t["kind"] == "turn")


@pytest.mark.slow
def test_synth_parler_backend_with_a_tiny_random_model(tmp_path):
    """The real parler-tts code path (batched generate, left-padded transcripts, audios_length cuts) on a tiny
    random model; its speech is noise, so only the plumbing and the labels are checked."""
    pytest.importorskip("parler_tts")
    from agent.train.tts import ParlerBackend, Style
    from synth_helpers import build_tiny_parler
    build_tiny_parler(tmp_path / "parler")
    lines = [_line(id="one"), _line(id="two", voice="sravani", emotion="surprised")]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), "utf-8")
    _cli("script", "--from", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "A"))
    _cli("synth", "--in", str(tmp_path / "A"), "--tts", "parler", "--parler-model", str(tmp_path / "parler"),
         "--device", "cpu", "--batch-size", "3", "--out", str(tmp_path / "B"))
    records = _jsonl(tmp_path / "B/manifest.jsonl")
    assert [r["id"] for r in records] == ["one", "two"]
    for record in records:
        assert record["methods"] == {"proportional": len(json.loads((tmp_path / "B" / record["alignment"])
                                                                   .read_text())["alignments"])}
        audio, rate = sf.read(tmp_path / "B" / record["path"], dtype="float32", always_2d=True)
        assert rate == 24_000 and audio.shape[1] == 2 and _active(audio[:, 0]).any() and _active(audio[:, 1]).any()
        assert record["n_words"] == sum(len(t["words"]) for t in record["turns"] if t["role"] == "agent")
    card = json.loads((tmp_path / "B/card.json").read_text())
    assert (card["generator"]["tts"]["name"] == "Indic Parler-TTS"
            and card["generator"]["tts"]["licence"] == "Apache-2.0")
    # Each catalogue voice and emotion reads as its own description; the card's named Telugu speakers are used.
    descriptions = {ParlerBackend.description(Style(v.id, v.gender, e.id))
                    for v in CATALOGUE.voices for e in CATALOGUE.emotions}
    assert len(descriptions) == 20 and any(d.startswith("Lalitha ") for d in descriptions)


def test_synth_espeak_backend_keeps_its_audio_when_another_is_made():
    """espeak-ng holds one synthesis callback per process: a backend made later (another stage, a test's
    plug-in) must not take an earlier one's audio, which then failed every turn with no samples."""
    from agent.train.tts import EspeakBackend, Speech, Style

    first = EspeakBackend()
    EspeakBackend()  # e.g. the telugu-tiny command's own, or a plug-in backend made after synth's
    (speech,) = first.synthesize([("నమస్కారం, మీరు ఎలా ఉన్నారు?", Style("lakshmi", "female"))])
    assert isinstance(speech, Speech) and speech.audio.size > 0.3 * 24_000


def test_synth_espeak_samples_do_not_follow_the_host_process_rand_state_as_on_ray():
    """espeak-ng draws noise from libc's rand(); a Ray worker's core calls rand() before the task runs, which
    changed the samples (one LSB) against the one-process run. The same items must give the same samples
    whatever the host process did with rand() before."""
    import ctypes

    from agent.train.tts import EspeakBackend, Style
    backend = EspeakBackend()
    items = [("నమస్కారం, మీరు ఎలా ఉన్నారు?", Style("lakshmi", "female")), ("సరే", Style("user-p35-klatt", "male"))]
    first = backend.synthesize(items)
    libc = ctypes.CDLL(None)
    libc.srand(12345)
    for _ in range(1000):
        libc.rand()
    again = backend.synthesize(items)
    libc.srand(1)  # back to the unseeded state for whatever runs next in this process
    assert [s.audio.tobytes() for s in first] == [s.audio.tobytes() for s in again]
