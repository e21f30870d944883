"""The voice/emotion catalogue in assets/ and what a model supports."""

import json

import pytest

from agent.errors import CatalogueError
from agent.voices import load_catalogue


def test_shipped_catalogue_has_two_female_two_male_voices_and_five_emotions():
    cat = load_catalogue()
    genders = sorted(v.gender for v in cat.voices)
    assert genders == ["female", "female", "male", "male"]
    assert len(cat.emotions) == 5
    assert all(v.name_te and v.name_en and v.description for v in cat.voices)
    assert cat.settings().voice == cat.default_voice
    assert cat.settings("ravi", "happy").emotion == "happy"


@pytest.mark.parametrize("voice, emotion, match",
                         [("nobody", None, "unknown voice"), (None, "bored", "unknown emotion")])
def test_unknown_ids_are_refused_clearly(voice, emotion, match):
    with pytest.raises(CatalogueError, match=match):
        load_catalogue().settings(voice, emotion)


def write(tmp_path, data) -> object:
    path = tmp_path / "cat.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["voices"].append(dict(d["voices"][0])), "duplicate voice"),
    (lambda d: d["voices"][0].pop("name_te"), "missing or empty"),
    (lambda d: d["voices"][0].update(gender="robot"), "gender"),
    (lambda d: d.update(emotions=[]), "no emotions"),
    (lambda d: d.update(default_voice="zzz"), "unknown voice"),
    (lambda d: d.pop("voices"), "needs 'voices'"),
])
def test_malformed_catalogues_are_refused(tmp_path, mutate, match):
    from agent.voices import CATALOGUE_PATH
    data = json.loads(CATALOGUE_PATH.read_text(encoding="utf-8"))
    mutate(data)
    with pytest.raises(CatalogueError, match=match):
        load_catalogue(write(tmp_path, data))


def test_unreadable_catalogue(tmp_path):
    with pytest.raises(CatalogueError, match="cannot read"):
        load_catalogue(write(tmp_path, "{not json"))


def test_support_follows_the_model():
    cat = load_catalogue()
    # no conditioners: nothing is supported, with a reason
    none = cat.voice_support("tiny", {})
    assert not any(s.supported for s in none.values()) and all(s.reason for s in none.values())
    # Kyutai's Moshika (female, unconditioned) supports only the voices mapped to it
    moshika = cat.voice_support("kyutai/moshika-pytorch-bf16", {})
    assert {v.id for v in cat.voices if moshika[v.id].supported} == {v.id for v in cat.voices if v.gender == "female"}
    # a conditioned model supports exactly its trained values
    trained = cat.voice_support("mine", {"speaker": ["ravi", "lakshmi"]})
    assert {k for k, s in trained.items() if s.supported} == {"ravi", "lakshmi"}
    emotions = cat.emotion_support({"emotion": ["neutral", "sad"]})
    assert {k for k, s in emotions.items() if s.supported} == {"neutral", "sad"}
