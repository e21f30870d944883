"""The voice and emotion catalogue (assets/catalogue.json), shared by the UI, the engine and training.

What a loaded model really supports is asked of the model, never assumed: a checkpoint with
`speaker`/`emotion` LUT conditioners supports the values it was trained with; Kyutai's released
Moshiko (male) and Moshika (female) have no conditioners and speak in one fixed voice each.

A model that takes prompts (NVIDIA PersonaPlex) speaks in the voice of a short recording and plays
the persona of a text: each catalogue voice names its `prompt`, a preset voice of the model (e.g.
`NATF0`) or a WAV under assets/voices/ (the operator's own recorded speaker, with a `prompt_licence`
line saying whose voice it is and on what terms). Callers choose among these names only: a caller
never sends a recording to clone (see README, "Voices and personas").

Reading the catalogue imports neither torch nor moshi (a page, a client or a script may need it
without a model).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from agent import ASSETS
from agent.config import MAX_TEXT_PROMPT_CHARS, SamplingRequest
from agent.errors import CatalogueError

CATALOGUE_PATH = ASSETS / "catalogue.json"
GENDERS = ("female", "male")
SPEAKER, EMOTION = "speaker", "emotion"  # the LM's conditioner names for a voice and an emotion




@dataclass(frozen=True)
class Voice:
    id: str
    name_en: str
    name_te: str
    gender: str
    description: str
    released_checkpoint: str | None = None  # Kyutai's unconditioned checkpoint with this gender of voice
    prompt: str | None = None  # voice prompt: a preset of the model ("NATF0") or a WAV under assets/ ("voices/x.wav")
    prompt_licence: str | None = None  # for a WAV: whose voice, their consent, the licence

    @property
    def prompt_wav(self) -> Path | None:
        """The catalogue's own recording for this voice, if its prompt is a WAV."""
        return (ASSETS / self.prompt).resolve() if self.prompt and self.prompt.lower().endswith(".wav") else None

    @property
    def label(self) -> str:
        return f"{self.name_en} · {self.name_te} ({self.gender})"


@dataclass(frozen=True)
class Emotion:
    id: str
    name_en: str
    name_te: str
    description: str
    prompt: str | None = None  # on a model that takes text prompts (no emotion LUT): added to the persona

    @property
    def label(self) -> str:
        return f"{self.name_en} · {self.name_te}"


@dataclass(frozen=True)
class Persona:
    """A ready text prompt for models that take one (the page offers these)."""

    id: str
    name: str
    language: str
    text: str


@dataclass(frozen=True)
class CallSettings:
    voice: str
    emotion: str
    sampling: SamplingRequest = ()  # the caller's own temperatures/top-k; () = the server's defaults
    voice_prompt: str | None = None  # a preset voice by name (PersonaPlex's `voice_prompt`); None: the voice's own
    text_prompt: str | None = None  # the persona (PersonaPlex's `text_prompt`); None: no role

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
    personas: tuple[Persona, ...] = ()

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
                 sampling: SamplingRequest = (), voice_prompt: str | None = None,
                 text_prompt: str | None = None) -> CallSettings:
        """Validated call settings; None means the catalogue's default."""
        if text_prompt is not None and len(text_prompt) > MAX_TEXT_PROMPT_CHARS:
            raise CatalogueError(f"the text prompt is {len(text_prompt)} characters; at most {MAX_TEXT_PROMPT_CHARS}")
        return CallSettings(self.voice(voice or self.default_voice).id,
                            self.emotion(emotion or self.default_emotion).id, sampling,
                            voice_prompt or None, text_prompt if text_prompt and text_prompt.strip() else None)

    def prompt_voice(self, settings: CallSettings, presets: Collection[str]) -> str | None:
        """The voice prompt a call runs on: a preset name of the model or the path of a catalogue WAV.
        The caller's `voice_prompt` may be a preset (`NATF2`, or `NATF2.pt` as PersonaPlex's client
        sends it) or a catalogue voice id; else the chosen voice's own prompt. Nothing else: a caller
        cannot point the server at a file. CatalogueError for a name that is neither."""
        wanted = settings.voice_prompt
        if wanted:
            stem = wanted.removesuffix(".pt").removesuffix(".wav")
            if stem in presets:
                return stem
            if any(v.id == wanted for v in self.voices):
                return self._voice_prompt(self.voice(wanted), presets)
            raise CatalogueError(f"unknown voice prompt {wanted!r}; choose one of {sorted(presets)} "
                                 f"or a catalogue voice {[v.id for v in self.voices]}")
        return self._voice_prompt(self.voice(settings.voice), presets)

    def prompt_text(self, settings: CallSettings) -> str | None:
        """The text prompt a call runs on: its persona, then its emotion's sentence (a model that
        takes prompts has no emotion conditioner: the persona carries the emotion). None: no role."""
        parts = [settings.text_prompt.strip()] if settings.text_prompt else []
        emotion = self.emotion(settings.emotion)
        if emotion.prompt:
            parts.append(emotion.prompt)
        return " ".join(parts) or None

    def _voice_prompt(self, voice: Voice, presets: Collection[str]) -> str | None:
        if voice.prompt_wav is not None:
            return str(voice.prompt_wav) if voice.prompt_wav.is_file() else None
        return voice.prompt if voice.prompt in presets else None

    def voice_support(self, model_name: str, conditioner_values: dict[str, list[str]],
                      prompt_presets: Collection[str] | None = None) -> dict[str, Support]:
        """`prompt_presets`: the model's preset voices if it takes voice prompts (None if not)."""
        values = conditioner_values.get(SPEAKER)
        out = {}
        for v in self.voices:
            if prompt_presets is not None:
                ok = self._voice_prompt(v, prompt_presets) is not None
                out[v.id] = Support(ok, "a voice prompt" if ok
                                    else f"its voice prompt {v.prompt!r} is not on this model")
            elif values is not None:
                out[v.id] = Support(v.id in values, "" if v.id in values else "not among this model's trained speakers")
            elif v.released_checkpoint and _same_checkpoint(model_name, v.released_checkpoint):
                out[v.id] = Support(True, "this checkpoint's own fixed voice")
            else:
                out[v.id] = Support(False, "this model has no speaker conditioning; its voice is fixed")
        return out

    def emotion_support(self, conditioner_values: dict[str, list[str]],
                        text_prompts: bool = False) -> dict[str, Support]:
        """`text_prompts`: the model takes a text prompt, which carries the emotion (`prompt_text`)."""
        values = conditioner_values.get(EMOTION)
        if text_prompts and values is None:
            return {e.id: Support(bool(e.prompt) or e.id == self.default_emotion,
                                  "through the persona text" if e.prompt or e.id == self.default_emotion
                                  else "no sentence for it in the catalogue") for e in self.emotions}
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
    if (not isinstance(raw, dict) or not isinstance(raw.get("voices"), list)
            or not isinstance(raw.get("emotions"), list)):
        raise CatalogueError(f"{path}: needs 'voices' and 'emotions' lists")
    voices = []
    for i, v in enumerate(raw["voices"]):
        _require(v, ("id", "name_en", "name_te", "gender", "description"), f"{path}: voices[{i}]")
        if v["gender"] not in GENDERS:
            raise CatalogueError(f"{path}: voice {v['id']!r} has gender {v['gender']!r}; use one of {GENDERS}")
        voice = Voice(v["id"], v["name_en"], v["name_te"], v["gender"], v["description"],
                      v.get("released_checkpoint"), v.get("prompt"), v.get("prompt_licence"))
        if voice.prompt_wav is not None and not voice.prompt_licence:
            raise CatalogueError(f"{path}: voice {voice.id!r} prompts with a recording ({voice.prompt}) but has "
                                 "no 'prompt_licence' (whose voice, their consent, the licence)")
        voices.append(voice)
    emotions = []
    for i, e in enumerate(raw["emotions"]):
        _require(e, ("id", "name_en", "name_te", "description"), f"{path}: emotions[{i}]")
        emotions.append(Emotion(e["id"], e["name_en"], e["name_te"], e["description"], e.get("prompt")))
    for kind, items in (("voice", voices), ("emotion", emotions)):
        ids = [x.id for x in items]
        if not ids:
            raise CatalogueError(f"{path}: no {kind}s")
        if len(set(ids)) != len(ids):
            raise CatalogueError(f"{path}: duplicate {kind} ids in {ids}")
    personas = []
    for i, x in enumerate(raw.get("personas", [])):
        _require(x, ("id", "name", "language", "text"), f"{path}: personas[{i}]")
        if len(x["text"]) > MAX_TEXT_PROMPT_CHARS:
            raise CatalogueError(f"{path}: persona {x['id']!r} is longer than {MAX_TEXT_PROMPT_CHARS} characters")
        personas.append(Persona(x["id"], x["name"], x["language"], x["text"]))
    catalogue = Catalogue(tuple(voices), tuple(emotions), raw.get("default_voice", voices[0].id),
                          raw.get("default_emotion", emotions[0].id), tuple(personas))
    catalogue.settings()  # the defaults must exist
    return catalogue
