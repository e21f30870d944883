"""The Telugu fine-tuning data pipeline, stages 1-4 (agent/train), end to end through its CLI entry.

A small Telugu corpus is made here with espeak-ng (voices `te` and `te+f3`, emotions by prosody:
happy = higher pitch and faster, sad = lower and slower), plus bad data: a corrupt file, a silent file,
a clipped file, a too-short file, a 4 kHz file, a manifest row whose audio is missing, a row with a
missing label, a row with an unknown emotion, a row with no audio path and a malformed line. An 8 kHz
file must be resampled and kept; a two-speaker stereo recording (agent on the RIGHT channel of the
source) must come out with the agent on the LEFT.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent import SAMPLE_RATE
from agent.audio.stream import resample
from agent.train.__main__ import main
from agent.train.ingest import yt_dlp_command
from agent.train.records import Word
from conftest import espeak_telugu
from train_helpers import read_jsonl as _jsonl
from train_helpers import run_stage as _run

ROOT = Path(__file__).resolve().parent.parent
HAPPY, SAD = ["-p", "75", "-s", "190"], ["-p", "25", "-s", "130"]
LICENCE = "CC-BY-4.0 (synthetic test speech)"

# name, voice, espeak flags, speaker, emotion, text
UTTERANCES = [
    ("k1", "te", [], "kiran_te", "neutral", "నమస్కారం, మీరు ఎలా ఉన్నారు?"),
    ("k2", "te", HAPPY, "kiran_te", "happy", "ఈ రోజు వాతావరణం చాలా బాగుంది."),
    ("k3", "te", [], "kiran_te", "neutral", "నాకు తెలుగు మాట్లాడటం చాలా ఇష్టం."),
    ("k4", "te", [], "kiran_te", "neutral", "అవును"),
    ("l1", "te+f3", [], "lakshmi_f3", "neutral", "నాకు ఒక కప్పు కాఫీ కావాలి."),
    ("l2", "te+f3", SAD, "lakshmi_f3", "sad", "నేను ఈ రోజు చాలా అలసిపోయాను."),
    ("l3", "te+f3", HAPPY, "lakshmi_f3", "happy", "మీకు చాలా ధన్యవాదాలు."),
    ("l4", "te+f3", [], "lakshmi_f3", "neutral", "సరే"),
]
EIGHT_K = "k3"  # written at 8 kHz: must be resampled to 24 kHz, not dropped
# Bad items and the reason their report line must give.
BAD = {
    "corrupt": "corrupt or unreadable audio",
    "silent": "silent",
    "clipped": "clipped",
    "short": "too short",
    "lowrate": "sample rate too low",
    "missing": "audio file not found",
    "nolabel": "missing label: emotion",
    "bademotion": "unknown emotion",
}


def _write(path: Path, audio: np.ndarray, rate: int) -> None:
    sf.write(path, audio, rate, subtype="PCM_16")


def _rms_db(x: np.ndarray) -> float:
    return float(20 * np.log10(max(np.sqrt(np.mean(np.square(x.astype(np.float64)))), 1e-10)))


def _pipeline(src: Path, work: Path) -> dict[str, dict]:
    return {
        "ingest": _run("ingest", "--out", str(work / "ingest"), "--manifest", str(src / "corpus.jsonl"),
                       "--manifest", str(src / "conversation.csv"), "--folder", str(src / "folder"),
                       "--speaker", "lakshmi_f3", "--emotion", "neutral", "--licence", LICENCE),
        "segment": _run("segment", "--in", str(work / "ingest/manifest.jsonl"), "--out", str(work / "segments")),
        "dialogues": _run("dialogues", "--in", str(work / "segments/manifest.jsonl"), "--out", str(work / "dialogues"),
                          "--seed", "7", "--count", "4", "--turns", "4:6", "--backchannel-prob", "1.0",
                          "--overlap-prob", "0.4", "--agent-voice", "kiran_te=kiran",
                          "--agent-voice", "lakshmi_f3=lakshmi"),
        "align": _run("align", "--in", str(work / "dialogues/manifest.jsonl"), "--out", str(work / "align")),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("corpus")
    rows = []
    for name, voice, flags, speaker, emotion, text in UTTERANCES:
        path = src / f"{name}.wav"
        audio = espeak_telugu(text, path, voice=voice, extra=flags)
        if name == EIGHT_K:
            _write(path, resample(audio, SAMPLE_RATE, 8_000), 8_000)
        rows.append({"path": path.name, "speaker": speaker, "emotion": emotion, "transcript": text, "licence": LICENCE})

    # A file of two utterances with a transcript given per segment (so it can be split)...
    a = espeak_telugu("మీరు ఎక్కడ ఉంటారు?", src / "m_a.wav", voice="te+f3")
    b = espeak_telugu("నేను హైదరాబాద్ లో ఉంటాను.", src / "m_b.wav", voice="te+f3")
    gap = np.zeros(SAMPLE_RATE, np.float32)
    _write(src / "multi_seg.wav", np.concatenate([a, gap, b]), SAMPLE_RATE)
    t1 = a.size / SAMPLE_RATE
    rows.append({"path": "multi_seg.wav", "speaker": "lakshmi_f3", "emotion": "neutral", "licence": LICENCE,
                 "segments": [{"start": 0.0, "end": t1, "transcript": "మీరు ఎక్కడ ఉంటారు?"},
                              {"start": t1 + 1.0, "end": t1 + 1.0 + b.size / SAMPLE_RATE,
                               "transcript": "నేను హైదరాబాద్ లో ఉంటాను."},
                              {"start": t1 + 0.3, "end": t1 + 0.7, "transcript": "(a label on the pause)"}]})
    # ...and one with only a transcript for the whole file (kept whole so the transcript stays true).
    c = espeak_telugu("రేపు కలుద్దాం.", src / "m_c.wav")
    _write(src / "multi_one.wav", np.concatenate([c, gap, c]), SAMPLE_RATE)
    rows.append({"path": "multi_one.wav", "speaker": "kiran_te", "emotion": "neutral", "licence": LICENCE,
                 "transcript": "రేపు కలుద్దాం. రేపు కలుద్దాం."})

    # Bad data.
    (src / "corrupt.wav").write_bytes(b"RIFF\x00\x10\x00\x00WAVEfmt " + bytes(range(256)) * 4)
    _write(src / "silent.wav", np.zeros(2 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    loud = espeak_telugu("చాలా గట్టిగా", src / "loud.wav")
    _write(src / "clipped.wav", np.clip(loud / max(np.abs(loud).max(), 1e-6) * 8, -1, 1), SAMPLE_RATE)
    _write(src / "short.wav", 0.3 * np.sin(np.linspace(0, 200, SAMPLE_RATE // 10)).astype(np.float32), SAMPLE_RATE)
    _write(src / "lowrate.wav", resample(loud, SAMPLE_RATE, 4_000) * 0.5, 4_000)
    ok = {"speaker": "kiran_te", "licence": LICENCE, "transcript": "ఏమీ లేదు"}
    rows += [{"path": "corrupt.wav", "emotion": "neutral", **ok},
             {"path": "silent.wav", "emotion": "neutral", **ok},
             {"path": "clipped.wav", "emotion": "neutral", **ok},
             {"path": "short.wav", "emotion": "neutral", **ok},
             {"path": "lowrate.wav", "emotion": "neutral", **ok},
             {"path": "missing.wav", "emotion": "neutral", **ok},  # a transcript with no audio
             {"path": "nolabel.wav", "emotion": "", **ok},
             {"path": "bademotion.wav", "emotion": "excited", **ok},
             {"emotion": "neutral", **ok}]  # no path at all
    for name in ("nolabel", "bademotion"):
        _write(src / f"{name}.wav", loud, SAMPLE_RATE)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + ['{"path": "broken.wav", "speaker": ']
    (src / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # A two-speaker recording at 16 kHz: the user (te) on the LEFT, the agent (te+f3) on the RIGHT.
    user = espeak_telugu("మీరు ఎక్కడ ఉన్నారు?", src / "c_user.wav")
    agent = espeak_telugu("నేను ఇంట్లో ఉన్నాను.", src / "c_agent.wav", voice="te+f3")
    a0 = int(0.3 * SAMPLE_RATE) + user.size + int(0.4 * SAMPLE_RATE)
    stereo = np.zeros((a0 + agent.size + int(0.5 * SAMPLE_RATE), 2), np.float32)
    stereo[int(0.3 * SAMPLE_RATE):int(0.3 * SAMPLE_RATE) + user.size, 0] = user
    stereo[a0:a0 + agent.size, 1] = agent
    _write(src / "conversation.wav", np.stack([resample(stereo[:, 0], SAMPLE_RATE, 16_000),
                                               resample(stereo[:, 1], SAMPLE_RATE, 16_000)], axis=1), 16_000)
    voiced = np.flatnonzero(np.abs(agent) > 0.02)  # given timings span the agent's audible speech
    words, t = [], (a0 + voiced[0]) / SAMPLE_RATE
    step = (voiced[-1] - voiced[0]) / SAMPLE_RATE / 3
    for word in ["నేను", "ఇంట్లో", "ఉన్నాను."]:
        words.append([word, round(t, 3), round(t + step, 3)])
        t += step
    with (src / "conversation.csv").open("w", encoding="utf-8") as f:
        f.write("path,speaker,emotion,licence,agent_channel,user_speaker,transcript,words\n")
        f.write(f'conversation.wav,lakshmi_f3,neutral,{LICENCE},right,kiran_te,నేను ఇంట్లో ఉన్నాను.,'
                f'"{json.dumps(words, ensure_ascii=False).replace(chr(34), chr(34) * 2)}"\n')
    (src / "conversation.meta.json").write_text(json.dumps({"agent_start": a0 / SAMPLE_RATE,
                                                            "agent_end": (a0 + agent.size) / SAMPLE_RATE}))

    # A folder source: labels from the command line (it has no columns), transcript from x.txt.
    folder = src / "folder"
    folder.mkdir()
    espeak_telugu("శుభోదయం", folder / "greeting.wav", voice="te+f3")
    (folder / "greeting.txt").write_text("శుభోదయం\n", encoding="utf-8")
    return src


@pytest.fixture(scope="module")
def work(corpus, tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("work")
    return work, _pipeline(corpus, work)


def test_ingest_converts_and_reports_bad_data(work):
    work, summaries = work
    records = {r["source"].rsplit("/", 1)[-1]: r for r in _jsonl(work / "ingest/manifest.jsonl")}
    expected = {f"{u[0]}.wav" for u in UTTERANCES} | {"multi_seg.wav", "multi_one.wav", "conversation.wav",
                                                       "greeting.wav"}
    assert set(records) == expected
    for name, record in records.items():
        info = sf.info(work / "ingest" / record["path"])
        assert info.samplerate == SAMPLE_RATE
        assert info.channels == (2 if name == "conversation.wav" else 1)
        assert set(record) >= {"id", "path", "duration", "speaker", "emotion", "transcript", "licence", "source"}
        assert abs(record["duration"] - info.frames / SAMPLE_RATE) < 1e-3
    assert records[f"{EIGHT_K}.wav"]["source_rate"] == 8_000
    assert records["conversation.wav"]["source_rate"] == 16_000
    assert records["l2.wav"]["emotion"] == "sad" and records["l2.wav"]["speaker"] == "lakshmi_f3"
    assert records["k2.wav"]["emotion"] == "happy"
    # Folder: labels from the command line, transcript from the sidecar.
    assert records["greeting.wav"]["speaker"] == "lakshmi_f3" and records["greeting.wav"]["transcript"] == "శుభోదయం"
    assert records["greeting.wav"]["licence"] == LICENCE
    # Loudness: the voiced part near the -23 dBFS target, peaks under -1 dBFS.
    audio, _ = sf.read(work / "ingest" / records["k1.wav"]["path"])
    assert np.abs(audio).max() <= 10 ** (-1 / 20) + 1e-3
    assert -30 < _rms_db(audio) < -20

    report = _jsonl(work / "ingest/report.jsonl")
    for name, reason in BAD.items():
        lines = [x for x in report if f"{name}.wav" in x["source"]]
        assert len(lines) == 1 and lines[0]["action"] == "skipped", (name, lines)
        assert lines[0]["reason"].startswith(reason), (name, lines[0]["reason"])
    assert any("no audio path" in x["reason"] for x in report)
    assert any("malformed manifest line" in x["reason"] for x in report)
    assert summaries["ingest"]["skipped"] == len(BAD) + 2
    assert summaries["ingest"]["kept"] == len(expected)


def test_segment_splits_transcripts_only_when_given(work):
    work, _ = work
    segments = _jsonl(work / "segments/manifest.jsonl")
    by_parent: dict[str, list[dict]] = {}
    for s in segments:
        by_parent.setdefault(s["source"].rsplit("/", 1)[-1], []).append(s)
        assert sf.info(work / "segments" / s["path"]).samplerate == SAMPLE_RATE
        assert s["speech"] and all(0 <= a < b <= s["duration"] + 1e-3 for a, b in s["speech"])
    split = by_parent["multi_seg.wav"]
    assert [s["transcript"] for s in split] == ["మీరు ఎక్కడ ఉంటారు?", "నేను హైదరాబాద్ లో ఉంటాను."]
    assert all(s["transcript_scope"] == "segment" for s in split)
    notes = [x for x in _jsonl(work / "segments/report.jsonl") if x["action"] == "note"]
    assert len(notes) == 1 and "has no speech: dropped" in notes[0]["reason"]
    whole = by_parent["multi_one.wav"]
    assert len(whole) == 1 and whole[0]["transcript_scope"] == "file"
    assert whole[0]["transcript"] == "రేపు కలుద్దాం. రేపు కలుద్దాం."
    speech = whole[0]["speech"]
    assert len(speech) >= 2 and speech[-1][1] - speech[0][0] > 2.0  # both spoken parts, the 1 s pause inside
    conversation = by_parent["conversation.wav"]
    assert len(conversation) == 1 and conversation[0]["kind"] == "conversation"
    assert conversation[0]["speech"] and conversation[0]["user_speech"]
    assert sf.info(work / "segments" / conversation[0]["path"]).channels == 2


def test_dialogues_are_stereo_agent_left_with_labels(work, corpus):
    work, _ = work
    dialogues = {d["id"]: d for d in _jsonl(work / "dialogues/manifest.jsonl")}
    assembled = [d for d in dialogues.values() if d["road"] == "assembled"]
    conversations = [d for d in dialogues.values() if d["road"] == "conversation"]
    assert len(assembled) == 4 and len(conversations) == 1
    voices = {"kiran_te": "kiran", "lakshmi_f3": "lakshmi"}
    saw_backchannel = saw_overlap = False
    for d in dialogues.values():
        audio, rate = sf.read(work / "dialogues" / d["path"])
        assert rate == SAMPLE_RATE and audio.ndim == 2 and audio.shape[1] == 2
        assert d["agent_voice"] == voices[d["agent_speaker"]]
        for channel, role in ((0, "agent"), (1, "user")):
            turns = [t for t in d["turns"] if t["role"] == role]
            assert turns
            mask = np.ones(audio.shape[0], bool)
            for t in turns:
                a, b = int(t["start"] * rate), int(t["end"] * rate)
                assert _rms_db(audio[a:b, channel]) > -40, (d["id"], role, t)  # the turn is on its channel
                mask[max(0, int((t["start"] - 0.35) * rate)):int((t["end"] + 0.35) * rate)] = False
            assert np.abs(audio[mask, channel]).max(initial=0) < 0.01, (d["id"], role)  # and nothing else is
        for t in d["turns"]:
            if t["role"] == "agent":
                assert t["speaker"] == d["agent_speaker"] and t["emotion"] and t["transcript"]
            else:
                assert t["speaker"] != d["agent_speaker"]
            saw_backchannel |= t["backchannel"]
            saw_overlap |= t["overlap"] > 0
        if d["road"] == "assembled":
            agent_emotions = {t["emotion"] for t in d["turns"] if t["role"] == "agent"}
            assert agent_emotions == {d["emotion"]}  # one agent emotion per dialogue (the default policy)
            main = [t for t in d["turns"] if not t["backchannel"]]
            for prev, nxt in zip(main, main[1:]):
                assert prev["role"] != nxt["role"]
                assert -0.51 <= nxt["start"] - prev["end"] <= 0.71, (d["id"], prev, nxt)
    assert saw_backchannel and saw_overlap
    # The two-speaker recording: its agent (RIGHT in the source) is now on the LEFT, at the same time.
    conv = conversations[0]
    meta = json.loads((corpus / "conversation.meta.json").read_text())
    agent_turns = [t for t in conv["turns"] if t["role"] == "agent"]
    assert len(agent_turns) == 1 and agent_turns[0]["speaker"] == "lakshmi_f3"
    assert abs(agent_turns[0]["start"] - meta["agent_start"]) < 0.15
    assert conv["user_speakers"] == ["kiran_te"]
    audio, rate = sf.read(work / "dialogues" / conv["path"])
    a, b = int(meta["agent_start"] * rate), int(meta["agent_end"] * rate)
    assert _rms_db(audio[a:b, 0]) > -35 and _rms_db(audio[a:b, 1]) < -60


def test_align_writes_moshi_finetune_shape_inside_agent_speech(work):
    work, _ = work
    dialogues = {d["id"]: d for d in _jsonl(work / "dialogues/manifest.jsonl")}
    aligned = _jsonl(work / "align/manifest.jsonl")
    train = _jsonl(work / "align/train.jsonl")
    assert {r["id"] for r in aligned} == set(dialogues)
    assert [set(x) for x in train] == [{"path", "duration"}] * len(aligned)
    for entry, record in zip(train, aligned):
        wav = work / "align" / entry["path"]
        audio, rate = sf.read(wav)
        assert rate == SAMPLE_RATE and audio.shape[1] == 2
        assert abs(entry["duration"] - audio.shape[0] / rate) < 1e-3
        data = json.loads(wav.with_suffix(".json").read_text(encoding="utf-8"))
        assert set(data) == {"alignments"}  # text_conditions only with --text-conditions
        alignments = data["alignments"]
        assert alignments and record["n_words"] == len(alignments)
        dialogue = dialogues[record["id"]]
        agent_turns = [t for t in dialogue["turns"] if t["role"] == "agent"]
        starts = [a[1][0] for a in alignments]
        assert starts == sorted(starts)
        for word, (start, end), speaker in alignments:
            assert isinstance(word, str) and word and speaker == "SPEAKER_MAIN"
            assert 0 <= start < end <= record["duration"]
            turn = next((t for t in agent_turns if t["start"] - 0.06 <= start and end <= t["end"] + 0.06), None)
            assert turn is not None, (record["id"], word, start, end)
            a, b = int(start * rate), max(int(end * rate), int(start * rate) + 240)
            assert _rms_db(audio[a:b, 0]) > -45, (record["id"], word)  # the agent is speaking there
        # Every agent word is written, in order: the text stream gets the whole transcript.
        expected = " ".join(t["transcript"] for t in sorted(agent_turns, key=lambda t: t["start"]))
        assert " ".join(a[0] for a in alignments) == expected
        assert record["methods"] == ({"given": len(alignments)} if dialogue["road"] == "conversation"
                                     else {"proportional": len(alignments)})
        assert record["text_conditions"]["speaker"] == dialogue["agent_voice"]


def test_second_run_resumes_and_changes_nothing(work, corpus):
    work, first = work
    outputs = sorted(p for p in work.rglob("*") if p.is_file() and ".done" not in p.parts
                     and p.name not in ("summary.json",))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs}
    second = _pipeline(corpus, work)
    for stage, summary in second.items():
        assert summary["made"] == 0, (stage, summary)
        assert summary["reused"] == first[stage]["made"], (stage, summary)
        assert summary["kept"] == first[stage]["kept"] and summary["skipped"] == first[stage]["skipped"]
    for stage in ("ingest", "segments", "dialogues", "align"):  # the same skip and note lines as the first run
        assert before[work / stage / "report.jsonl"][1] == (work / stage / "report.jsonl").read_bytes()
    for path, (mtime, content) in before.items():
        assert path.read_bytes() == content, path
        if path.suffix == ".wav":
            assert path.stat().st_mtime_ns == mtime, path  # not rewritten
    # A changed setting redoes exactly the affected stage's items.
    assert main(["dialogues", "--in", str(work / "segments/manifest.jsonl"), "--out", str(work / "dialogues2"),
                 "--seed", "7", "--count", "4", "--turns", "4:6", "--backchannel-prob", "1.0", "--overlap-prob", "0.4",
                 "--agent-voice", "kiran_te=kiran", "--agent-voice", "lakshmi_f3=lakshmi", "--quiet"]) == 0
    assert (work / "dialogues2/manifest.jsonl").read_bytes() == (work / "dialogues/manifest.jsonl").read_bytes()


def test_later_stages_skip_bad_records(work, tmp_path):
    work, _ = work
    # An ingest manifest with a record whose file is at the wrong rate and one whose file is gone.
    _write(tmp_path / "r8k.wav", np.zeros(8_000, np.float32), 8_000)
    base = {"duration": 1.0, "kind": "utterance", "speaker": "x", "emotion": "neutral", "licence": "l", "source": "s"}
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"id": "r8k", "path": "r8k.wav", **base}) + "\n"
        + json.dumps({"id": "gone", "path": "gone.wav", **base}) + "\n" + '{"id": "partial"}\n', encoding="utf-8")
    assert main(["segment", "--in", str(tmp_path / "manifest.jsonl"), "--out", str(tmp_path / "seg"), "--quiet"]) == 0
    report = {x["item"]: x["reason"] for x in _jsonl(tmp_path / "seg/report.jsonl")}
    assert report["r8k"].startswith("wrong sample rate: 8000 Hz")
    assert report["gone"].startswith("audio file not found")
    assert any(r.startswith("malformed manifest line") for r in report.values())
    assert _jsonl(tmp_path / "seg/manifest.jsonl") == []


def test_optional_sources_fail_clearly(tmp_path, monkeypatch):
    out = tmp_path / "out"
    # URLs need the explicit licence acknowledgement, before anything is downloaded.
    assert main(["ingest", "--out", str(out), "--url", "https://example.invalid/x", "--quiet"]) == 2
    if yt_dlp_command() is None:
        assert main(["ingest", "--out", str(out), "--url", "https://example.invalid/x", "--i-have-the-rights",
                     "--speaker", "s", "--emotion", "neutral", "--licence", "l", "--quiet"]) == 0
        assert "yt-dlp is not installed" in _jsonl(out / "report.jsonl")[0]["reason"]
    # A saved Hugging Face dataset: read through `datasets.load_from_disk` when the package exists.
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(16_000) / 16_000)).astype(np.float32)
    rows = [{"audio": {"array": tone, "sampling_rate": 16_000, "path": None}, "raw_transcription": "ఒకటి",
             "gender": 1}]
    fake = types.ModuleType("datasets")
    fake.__spec__ = ModuleSpec("datasets", None)
    fake.load_from_disk = lambda path: {"train": rows}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert main(["ingest", "--out", str(out), "--hf-dataset", str(tmp_path / "fleurs_te"), "--speaker", "spk1",
                 "--emotion", "neutral", "--licence", "CC-BY-4.0", "--quiet"]) == 0
    (record,) = _jsonl(out / "manifest.jsonl")
    assert record["transcript"] == "ఒకటి" and record["speaker"] == "spk1" and record["source_rate"] == 16_000
    monkeypatch.delitem(sys.modules, "datasets")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert main(["ingest", "--out", str(tmp_path / "out2"), "--hf-dataset", str(tmp_path / "fleurs_te"),
                 "--quiet"]) == 0
    assert "`datasets` package is not installed" in _jsonl(tmp_path / "out2/report.jsonl")[0]["reason"]


@pytest.mark.slow
def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "agent.train", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for stage in ("ingest", "segment", "dialogues", "align"):
        assert stage in result.stdout


class EvenAligner:
    """A stand-in for a real Telugu aligner plugged in with --aligner module:Class."""

    name = "even"

    def align(self, audio, sample_rate, transcript, speech):
        words = transcript.split()
        span = audio.shape[0] / sample_rate / len(words)
        return [Word(w, round(i * span, 3), round((i + 1) * span, 3)) for i, w in enumerate(words)]


def test_roads_and_aligners_are_configuration(work, tmp_path):
    work, _ = work
    road = tmp_path / "conversation_road.json"
    road.write_text(json.dumps({"road": "conversation", "turn_gap_ms": 600}))
    assert main(["dialogues", "--in", str(work / "segments/manifest.jsonl"), "--out", str(tmp_path / "dlg"),
                 "--config", str(road), "--quiet"]) == 0
    (only,) = _jsonl(tmp_path / "dlg/manifest.jsonl")
    assert only["road"] == "conversation"
    assert any("utterances ignored" in x["reason"] for x in _jsonl(tmp_path / "dlg/report.jsonl"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"raod": "conversation"}))
    assert main(["dialogues", "--in", str(work / "segments/manifest.jsonl"), "--out", str(tmp_path / "x"),
                 "--config", str(bad), "--quiet"]) == 2

    assert main(["align", "--in", str(work / "dialogues/manifest.jsonl"), "--out", str(tmp_path / "al"),
                 "--aligner", f"{__name__}:EvenAligner", "--include-user-words", "--text-conditions", "--quiet"]) == 0
    for record in _jsonl(tmp_path / "al/manifest.jsonl"):
        data = json.loads((tmp_path / "al" / record["alignment"]).read_text(encoding="utf-8"))
        assert data["text_conditions"] == {"speaker": record["agent_voice"], "emotion": record["emotion"]}
        speakers = {a[2] for a in data["alignments"]}
        assert speakers == ({"SPEAKER_MAIN", "SPEAKER_OTHER"} if record["id"].startswith("dlg") else {"SPEAKER_MAIN"})
        if record["id"].startswith("dlg"):
            assert set(record["methods"]) == {"even", "user:even"}
    assert main(["align", "--in", str(work / "dialogues/manifest.jsonl"), "--out", str(tmp_path / "al2"),
                 "--aligner", "no_such_module:Nothing", "--quiet"]) == 2


def test_monologue_road_agent_speaks_right_is_silent(work, tmp_path):
    """Telugu adaptation data: one speaker's utterances back to back on the LEFT, the RIGHT exactly silent."""
    work, _ = work
    segments = [s for s in _jsonl(work / "segments/manifest.jsonl") if s["kind"] == "utterance"]
    road = tmp_path / "monologue.json"
    road.write_text(json.dumps({"road": "monologue", "monologue_gap_ms": [300, 900], "max_seconds": 10.0}))
    args = ["dialogues", "--in", str(work / "segments/manifest.jsonl"), "--config", str(road), "--seed", "3",
            "--agent-voice", "kiran_te=kiran", "--agent-voice", "lakshmi_f3=lakshmi"]
    summary = _run(*args, "--out", str(tmp_path / "mono"))
    assert _run(*args, "--out", str(tmp_path / "mono2"))["kept"] == summary["kept"]
    manifest = (tmp_path / "mono/manifest.jsonl").read_bytes()
    assert manifest == (tmp_path / "mono2/manifest.jsonl").read_bytes()  # the seed decides everything
    assert any("two-speaker recordings ignored" in x["reason"] for x in _jsonl(tmp_path / "mono/report.jsonl"))
    monologues = _jsonl(tmp_path / "mono/manifest.jsonl")
    assert len(monologues) >= 2 and summary["skipped"] == 0
    # With --count unset every transcribed utterance is used exactly once.
    used = [t["source"] for d in monologues for t in d["turns"]]
    assert sorted(used) == sorted(s["id"] for s in segments if s["transcript"])
    voices = {"kiran_te": "kiran", "lakshmi_f3": "lakshmi"}
    for d in monologues:
        assert d["road"] == "monologue" and d["id"].startswith("mono-") and d["user_speakers"] == []
        assert d["agent_voice"] == voices[d["agent_speaker"]]
        assert all(t["role"] == "agent" for t in d["turns"])
        assert {t["speaker"] for t in d["turns"]} == {d["agent_speaker"]}  # one speaker per file
        assert {t["emotion"] for t in d["turns"]} == {d["emotion"]}  # one emotion per file (default policy)
        assert all(t["transcript"] and not t["backchannel"] and t["overlap"] == 0 for t in d["turns"])
        assert len({t["source"] for t in d["turns"]}) == len(d["turns"])  # no utterance twice in a file
        audio, rate = sf.read(tmp_path / "mono" / d["path"], dtype="int16")
        assert rate == SAMPLE_RATE and audio.shape[1] == 2
        assert not audio[:, 1].any()  # the user channel is digital silence
        assert len(d["turns"]) == 1 or d["duration"] <= 10.0  # max_seconds
        for t in d["turns"]:
            a, b = int(t["start"] * rate), int(t["end"] * rate)
            assert _rms_db(audio[a:b, 0].astype(np.float64) / 32768) > -40, (d["id"], t)
        for prev, nxt in zip(d["turns"], d["turns"][1:]):
            assert 0.29 <= nxt["start"] - prev["end"] <= 1.5, (d["id"], prev, nxt)

    assert _run("align", "--in", str(tmp_path / "mono/manifest.jsonl"), "--out", str(tmp_path / "al"))["kept"] == \
        len(monologues)
    by_id = {d["id"]: d for d in monologues}
    for record in _jsonl(tmp_path / "al/manifest.jsonl"):
        dialogue = by_id[record["id"]]
        data = json.loads((tmp_path / "al" / record["alignment"]).read_text(encoding="utf-8"))
        alignments = data["alignments"]
        assert alignments and record["n_words"] == len(alignments)
        assert {a[2] for a in alignments} == {"SPEAKER_MAIN"}
        assert " ".join(a[0] for a in alignments) == " ".join(t["transcript"] for t in dialogue["turns"])
        for _, (start, end), _ in alignments:
            assert any(t["start"] - 0.06 <= start and end <= t["end"] + 0.06 for t in dialogue["turns"])
    # Never chosen by "auto": the default road makes no monologues.
    assert not any(d["road"] == "monologue" for d in _jsonl(work / "dialogues/manifest.jsonl"))
