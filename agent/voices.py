"""The voice and emotion catalogue (assets/catalogue.json), shared by the UI, the engine and training.

What a loaded model really supports is asked of the model, never assumed: a checkpoint with
`speaker`/`emotion` LUT conditioners supports the values it was trained with; Kyutai's released
Moshiko (male) and Moshika (female) have no conditioners and speak in one fixed voice each.

Reading the catalogue imports neither torch nor moshi (a page, a client or a script may need it
without a model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from agent.config import SamplingRequest

CATALOGUE_PATH = Path(__file__).resolve().parent.parent / "assets" / "catalogue.json"
GENDERS = ("female", "male")
SPEAKER, EMOTION = "speaker", "emotion"  # the LM's conditioner names for a voice and an emotion


class CatalogueError(ValueError):
    """A malformed catalogue file or an unknown voice/emotion id."""


@dataclass(frozen=True)
class Voice:
    id: str
    name_en: str
    name_te: str
    gender: str
    description: str
    released_checkpoint: str | None = None  # Kyutai's unconditioned checkpoint with this gender of voice

    @property
    def label(self) -> str:
        return f"{self.name_en} · {self.name_te} ({self.gender})"


@dataclass(frozen=True)
class Emotion:
    id: str
    name_en: str
    name_te: str
    description: str

    @property
    def label(self) -> str:
        return f"{self.name_en} · {self.name_te}"


@dataclass(frozen=True)
class CallSettings:
    voice: str
    emotion: str
    sampling: SamplingRequest = ()  # the caller's own temperatures/top-k; () = the server's defaults

    def conditions(self, available: dict[str, list[str]]) -> dict[str, str]:
        """The conditioner values for this call, for the conditioners the model has."""
        wanted = {SPEAKER: self.voice, EMOTION: self.emotion}
        return {name: value for name, value in wanted.items() if name in available}


@dataclass(frozen=True)
class Support:
    """Whether a catalogue entry changes anything on the loaded model, and why not."""

    supported: bool
    reason: str = ""


@dataclass(frozen=True)
class Catalogue:
    voices: tuple[Voice, ...]
    emotions: tuple[Emotion, ...]
    default_voice: str
    default_emotion: str

    def voice(self, voice_id: str) -> Voice:
        for v in self.voices:
            if v.id == voice_id:
                return v
        raise CatalogueError(f"unknown voice {voice_id!r}; choose one of {[v.id for v in self.voices]}")

    def emotion(self, emotion_id: str) -> Emotion:
        for e in self.emotions:
            if e.id == emotion_id:
                return e
        raise CatalogueError(f"unknown emotion {emotion_id!r}; choose one of {[e.id for e in self.emotions]}")

    def settings(self, voice: str | None = None, emotion: str | None = None,
                 sampling: SamplingRequest = ()) -> CallSettings:
        """Validated call settings; None means the catalogue's default."""
        return CallSettings(self.voice(voice or self.default_voice).id,
                            self.emotion(emotion or self.default_emotion).id, sampling)

    def voice_support(self, model_name: str, conditioner_values: dict[str, list[str]]) -> dict[str, Support]:
        values = conditioner_values.get(SPEAKER)
        out = {}
        for v in self.voices:
            if values is not None:
                out[v.id] = Support(v.id in values, "" if v.id in values else "not among this model's trained speakers")
            elif v.released_checkpoint and _same_checkpoint(model_name, v.released_checkpoint):
                out[v.id] = Support(True, "this checkpoint's own fixed voice")
            else:
                out[v.id] = Support(False, "this model has no speaker conditioning; its voice is fixed")
        return out

    def emotion_support(self, conditioner_values: dict[str, list[str]]) -> dict[str, Support]:
        values = conditioner_values.get(EMOTION)
        return {e.id: Support(values is not None and e.id in values,
                              "" if values is not None and e.id in values
                              else "this model has no emotion conditioning" if values is None
                              else "not among this model's trained emotions")
                for e in self.emotions}


def _same_checkpoint(model_name: str, repo_id: str) -> bool:
    """A repo id or a local copy of it (a folder named like the repo)."""
    return model_name.rstrip("/").split("/")[-1] == repo_id.split("/")[-1]


def _require(entry: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not isinstance(entry.get(k), str) or not entry.get(k)]
    if missing:
        raise CatalogueError(f"{where}: missing or empty {missing}")


def load_catalogue(path: Path = CATALOGUE_PATH) -> Catalogue:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogueError(f"cannot read catalogue {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("voices"), list) or not isinstance(raw.get("emotions"), list):
        raise CatalogueError(f"{path}: needs 'voices' and 'emotions' lists")
    voices = []
    for i, v in enumerate(raw["voices"]):
        _require(v, ("id", "name_en", "name_te", "gender", "description"), f"{path}: voices[{i}]")
        if v["gender"] not in GENDERS:
            raise CatalogueError(f"{path}: voice {v['id']!r} has gender {v['gender']!r}; use one of {GENDERS}")
        voices.append(Voice(v["id"], v["name_en"], v["name_te"], v["gender"], v["description"],
                            v.get("released_checkpoint")))
    emotions = []
    for i, e in enumerate(raw["emotions"]):
        _require(e, ("id", "name_en", "name_te", "description"), f"{path}: emotions[{i}]")
        emotions.append(Emotion(e["id"], e["name_en"], e["name_te"], e["description"]))
    for kind, items in (("voice", voices), ("emotion", emotions)):
        ids = [x.id for x in items]
        if not ids:
            raise CatalogueError(f"{path}: no {kind}s")
        if len(set(ids)) != len(ids):
            raise CatalogueError(f"{path}: duplicate {kind} ids in {ids}")
    catalogue = Catalogue(tuple(voices), tuple(emotions), raw.get("default_voice", voices[0].id),
                          raw.get("default_emotion", emotions[0].id))
    catalogue.settings()  # the defaults must exist
    return catalogue
