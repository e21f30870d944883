"""Text-to-speech backends for the `synth` stage: Telugu text + a voice style -> 24 kHz speech with word timings.

Contract: `backend.synthesize([(text, style), ...])` returns, per item and in order, a `Speech` (mono float32
at 24 kHz, trimmed to its voiced part, and its words with start/end seconds inside that audio) or a
`TTSError` saying why that item failed; one failed item never fails the batch. `user_styles()` lists the
backend's voices for the user side. `about()` names the generator, its version and licence for the card.

- `EspeakBackend` (offline, CPU, what tests use): libespeak-ng through ctypes, Telugu (`te` + a variant).
  Voices and emotions are pitch, pitch range, rate, volume and variant settings. Word timings are the
  engine's own WORD events (the sample where each word starts), each word's end the last voiced 10 ms
  before the next word starts: exact to 10 ms, no aligner involved.
- `ParlerBackend` (GPU): Indic Parler-TTS through the `parler-tts` package (imported on first use). Speaker
  and emotion go into the description; items are synthesised in batches (transcripts padded on the left,
  each clip cut at `audios_length`). The model gives no word timings: each turn's voiced span is exact,
  its words are spread over it by character count (method "proportional" in the labels).
- Anything else: `module:Class` (a class with this contract), e.g. another engine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import math
import os
import pickle
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent import SAMPLE_RATE
from agent.audio.stream import resample
from agent.train.records import Word

EXACT, PROPORTIONAL = "tts-events", "proportional"


class TTSError(Exception):
    """One item could not be synthesised; the message says why."""


@dataclass(frozen=True)
class Style:
    """Who speaks and how: a catalogue voice (agent) or one of the backend's user voices."""

    voice: str  # catalogue voice id, or a user voice id ("user-07")
    gender: str  # "female" / "male"
    emotion: str = "neutral"  # catalogue emotion id


@dataclass
class Speech:
    audio: np.ndarray  # float32 mono, SAMPLE_RATE
    words: list[Word]  # seconds inside `audio`
    method: str  # EXACT or PROPORTIONAL


class Backend(Protocol):
    name: str

    def synthesize(self, items: list[tuple[str, Style]]) -> list[Speech | TTSError]: ...

    def user_styles(self) -> list[Style]: ...

    def about(self) -> dict: ...


def voiced_bounds(audio: np.ndarray, rate: int, floor_db: float = -35.0, hop_s: float = 0.01) -> np.ndarray:
    """Per 10 ms frame: True when within `floor_db` of the clip's loudest frame."""
    hop = max(1, int(rate * hop_s))
    n = max(1, math.ceil(audio.size / hop))
    padded = np.zeros(n * hop, np.float64)
    padded[:audio.size] = audio
    level = 10 * np.log10(np.mean(padded.reshape(n, hop) ** 2, axis=1) + 1e-12)
    return level > level.max() + floor_db


def trim(audio: np.ndarray, words: list[Word], rate: int, lead_s: float = 0.02, tail_s: float = 0.06
         ) -> tuple[np.ndarray, list[Word]]:
    """Cut leading and trailing silence (keeping a short margin); word times move with the audio."""
    voiced = np.flatnonzero(voiced_bounds(audio, rate))
    if voiced.size == 0:
        raise TTSError("the engine produced only silence")
    first = max(0, int(voiced[0] * 0.01 * rate - lead_s * rate))
    last = min(audio.size, int((voiced[-1] + 1) * 0.01 * rate + tail_s * rate))
    offset, length = first / rate, (last - first) / rate
    moved = [Word(w.text, round(float(min(max(w.start - offset, 0.0), length)), 4),
                  round(float(min(max(w.end - offset, 0.0), length)), 4)) for w in words]
    return audio[first:last].astype(np.float32), [w for w in moved if w.end > w.start]


def proportional_words(text: str, start: float, end: float) -> list[Word]:
    """Words spread over [start, end] by character count (when the engine gives no timings)."""
    tokens = text.split()
    weights = np.array([len(t) + 1 for t in tokens], np.float64)
    edges = start + (end - start) * np.concatenate([[0], np.cumsum(weights)]) / weights.sum()
    return [Word(t, round(float(a), 4), round(float(b), 4)) for t, a, b in zip(tokens, edges[:-1], edges[1:])]


# ---------------------------------------------------------------------------------------------
# espeak-ng
# ---------------------------------------------------------------------------------------------

# Catalogue voice -> (variant, pitch 0-100, rate words/min). Unknown ids fall back on their gender.
ESPEAK_VOICES = {"lakshmi": ("f3", 55, 165), "sravani": ("f4", 72, 180), "ravi": ("m3", 30, 155),
                 "kiran": ("m1", 48, 185)}
ESPEAK_BY_GENDER = {"female": ("f2", 60, 170), "male": ("m2", 40, 170)}
# Catalogue emotion -> (pitch shift, pitch range 0-100, rate factor, volume 0-200).
ESPEAK_EMOTIONS = {"neutral": (0, 50, 1.0, 100), "happy": (12, 85, 1.12, 115), "sad": (-14, 15, 0.78, 80),
                   "angry": (4, 70, 1.18, 150), "surprised": (22, 100, 1.08, 120)}
# User voices: these variants at three pitches (the agent's own settings excluded).
USER_VARIANTS = {"male": ["m2", "m4", "m5", "m6", "m7", "klatt", "klatt3"],
                 "female": ["f1", "f2", "f5", "klatt4", "klatt6"]}
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4  # espeak_PARAMETER
_EVENT_LIST_END, _EVENT_WORD = 0, 1  # espeakEVENT_LIST_TERMINATED, espeakEVENT_WORD


class _EspeakEvent(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_void_p)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_EspeakEvent))
# The library keeps one synthesis callback per process: every EspeakBackend registers this same one,
# and it feeds whichever backend is synthesising now (a per-instance callback would be taken over by
# the next instance made, and the first would then get no audio).
_synthesising: EspeakBackend | None = None
_LIBC = ctypes.CDLL(None)  # this process's C library: the rand() state espeak-ng draws from


@_CALLBACK
def _feed_active(wav, n: int, events) -> int:
    return _synthesising._collect(wav, n, events) if _synthesising is not None else 0


class EspeakBackend:
    """libespeak-ng in this process (synchronous mode; one engine per process, so workers are processes)."""

    name = "espeak"

    def __init__(self, language: str = "te"):
        path = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self._lib = ctypes.CDLL(path)
        except OSError as exc:
            raise TTSError(f"espeak-ng's library is missing ({exc}): apt-get install espeak-ng") from exc
        self.language = language
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int]] = []
        self.rate = self._lib.espeak_Initialize(2, 0, None, 0)  # AUDIO_OUTPUT_SYNCHRONOUS
        if self.rate <= 0:
            raise TTSError("espeak-ng failed to initialise")
        self._lib.espeak_SetSynthCallback(_feed_active)
        self._lib.espeak_Info.restype = ctypes.c_char_p
        self.version = self._lib.espeak_Info(None).decode()

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).astype(np.float32) / 32768.0)
        i = 0
        while events[i].type != _EVENT_LIST_END:
            e = events[i]
            self._events.append((e.type, e.text_position, e.length, e.sample))
            i += 1
        return 0

    def settings(self, style: Style) -> tuple[str, int, int, int, int]:
        """(variant, pitch, range, rate, volume) for a style."""
        if style.voice.startswith("user-"):
            variant, pitch = style.voice.split("-", 2)[2], int(style.voice.split("-")[1][1:])
            rate = 170
        else:
            variant, pitch, rate = ESPEAK_VOICES.get(style.voice, ESPEAK_BY_GENDER[style.gender])
        shift, spread, factor, volume = ESPEAK_EMOTIONS.get(style.emotion, ESPEAK_EMOTIONS["neutral"])
        return variant, int(np.clip(pitch + shift, 0, 100)), spread, int(rate * factor), volume

    def user_styles(self) -> list[Style]:
        agents = {(v, p) for v, p, _ in ESPEAK_VOICES.values()}
        return [Style(f"user-p{pitch}-{variant}", gender)
                for gender, variants in USER_VARIANTS.items() for variant in variants for pitch in (35, 50, 65)
                if (variant, pitch) not in agents]

    def about(self) -> dict:
        return {"name": "espeak-ng", "version": self.version, "licence": "GPL-3.0-or-later (the engine; "
                "its output audio is not covered)", "url": "https://github.com/espeak-ng/espeak-ng"}

    def synthesize(self, items: list[tuple[str, Style]]) -> list[Speech | TTSError]:
        """In a forked child: espeak-ng carries state from one utterance into the next (its wave generator
        and echo buffers; espeak_Terminate can block in synchronous mode, so it cannot be reset), so every
        call starts from this process's pristine, never-used engine. The same items then give the same
        samples whatever came before: a resumed run or another worker count reproduces a run exactly.
        espeak-ng also draws from libc's rand() (its noise sources), whose state the child inherits:
        a host process that used rand() before (a Ray worker's core does) would change the samples, so the
        child starts it where a fresh process has it (srand(1), glibc's unseeded state)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: synthesise, send the results, exit without running any parent cleanup
            try:
                os.close(read_end)
                _LIBC.srand(1)
                try:
                    payload = pickle.dumps(self._all(items))
                except BaseException as exc:  # noqa: BLE001 - whatever happens, the parent gets an answer
                    payload = pickle.dumps([TTSError(f"espeak-ng worker failed: {exc!r}")] * len(items))
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(payload)
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(pid, 0)
        if not payload:
            return [TTSError(f"espeak-ng worker died (wait status {status})")] * len(items)
        return pickle.loads(payload)

    def _all(self, items: list[tuple[str, Style]]) -> list[Speech | TTSError]:
        out: list[Speech | TTSError] = []
        for text, style in items:
            try:
                out.append(self._one(text, style))
            except TTSError as exc:
                out.append(exc)
        return out

    def _one(self, text: str, style: Style) -> Speech:
        variant, pitch, spread, rate, volume = self.settings(style)
        if self._lib.espeak_SetVoiceByName(f"{self.language}+{variant}".encode()) != 0:
            raise TTSError(f"espeak-ng has no voice {self.language}+{variant}")
        for param, value in ((_PITCH, pitch), (_RANGE, spread), (_RATE, rate), (_VOLUME, volume)):
            self._lib.espeak_SetParameter(param, value, 0)
        global _synthesising
        self._chunks, self._events = [], []
        data = text.encode("utf-8") + b"\0"
        _synthesising = self
        try:
            status = self._lib.espeak_Synth(data, len(data), 0, 1, 0, 1, None, None)  # POS_CHARACTER, CHARS_UTF8
        finally:
            _synthesising = None
        if status != 0 or not self._chunks:
            raise TTSError(f"espeak-ng failed (status {status}) on {text[:40]!r}")
        audio = np.concatenate(self._chunks)
        words = self._words(text, audio)
        if not words:
            raise TTSError(f"espeak-ng spoke no words of {text[:40]!r}")
        audio, words = trim(audio, words, self.rate)
        return Speech(resample(audio, self.rate, SAMPLE_RATE), words, EXACT)

    def _words(self, text: str, audio: np.ndarray) -> list[Word]:
        """The text's whitespace words timed by the engine's WORD events (first event of a word = its start)."""
        spans, pos = [], 0
        for token in text.split():
            start = text.index(token, pos)
            spans.append((start, start + len(token), token))
            pos = start + len(token)
        starts: dict[int, int] = {}
        for kind, position, _, sample in self._events:
            if kind != _EVENT_WORD:
                continue
            for n, (a, b, _) in enumerate(spans):
                if a <= position - 1 < b:
                    starts.setdefault(n, sample)
                    break
        order = sorted(starts.items())
        voiced = voiced_bounds(audio, self.rate)
        hop = self.rate * 0.01
        words = []
        for k, (n, sample) in enumerate(order):
            limit = order[k + 1][1] if k + 1 < len(order) else audio.size
            first, last = int(sample / hop), max(int(sample / hop), int(math.ceil(limit / hop)) - 1)
            frames = np.flatnonzero(voiced[first:last + 1])
            if frames.size == 0:
                continue  # a word the engine spoke as silence (punctuation): no timing to give
            end = min((first + frames[-1] + 1) * 0.01, limit / self.rate)  # never past the next word's start
            start = max((first + frames[0]) * 0.01, sample / self.rate)  # frames are 10 ms; events are samples
            words.append(Word(spans[n][2], round(float(start), 4), round(float(end), 4)))
        return words


# ---------------------------------------------------------------------------------------------
# Indic Parler-TTS
# ---------------------------------------------------------------------------------------------

# Catalogue voice -> the card's named Telugu speakers where they fit, else a fixed description in words.
PARLER_SPEAKERS = {"lakshmi": "Lalitha", "ravi": "Prakash", "kiran": "Kiran",
                   "sravani": "A young woman with a bright, high-pitched voice"}
PARLER_EMOTIONS = {"neutral": "in a neutral, conversational tone", "happy": "in a happy, expressive tone",
                   "sad": "in a sad, low and slow tone", "angry": "in an angry, forceful tone",
                   "surprised": "in a surprised tone with a raised pitch"}
PARLER_USERS = [f"A {age} {gender} speaker with a {pitch} voice"
                for gender in ("male", "female") for age in ("young", "middle-aged", "older")
                for pitch in ("low-pitched", "moderate", "high-pitched")]


class ParlerBackend:
    """Indic Parler-TTS (`ai4bharat/indic-parler-tts`, Apache-2.0) via the parler-tts package, batched."""

    name = "parler"

    def __init__(self, model: str = "ai4bharat/indic-parler-tts", device: str | None = None, batch_size: int = 8,
                 seed: int = 0, max_new_tokens: int | None = None):
        try:
            import torch
            import transformers
            from parler_tts import ParlerTTSForConditionalGeneration
        except ImportError as exc:
            raise TTSError("--tts parler needs the parler-tts package: pip install parler-tts==0.2.3 "
                           "transformers==4.46.1 torchaudio==2.9.1 (see docs/training.md)") from exc
        import parler_tts
        self.torch, self.seed, self.batch_size, self.model_id = torch, seed, batch_size, model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model = ParlerTTSForConditionalGeneration.from_pretrained(model).to(self.device).eval()
            self.prompt_tokenizer = transformers.AutoTokenizer.from_pretrained(model, padding_side="left")
            self.description_tokenizer = transformers.AutoTokenizer.from_pretrained(
                self.model.config.text_encoder._name_or_path)
        except (OSError, ValueError) as exc:
            raise TTSError(f"cannot load {model}: {exc} (gated on the Hub: request access, set HF_TOKEN)") from exc
        self.rate = int(self.model.config.sampling_rate)
        self.max_new_tokens = max_new_tokens
        self.version = f"parler-tts {getattr(parler_tts, '__version__', '?')}, transformers {transformers.__version__}"

    @staticmethod
    def description(style: Style) -> str:
        if style.voice.startswith("user-"):
            who = PARLER_USERS[int(style.voice.split("-")[1]) % len(PARLER_USERS)]
        else:
            who = PARLER_SPEAKERS.get(style.voice, f"A {style.gender} speaker")
        how = PARLER_EMOTIONS.get(style.emotion, PARLER_EMOTIONS["neutral"])
        return (f"{who} speaks {how} at a moderate pace, in a close-sounding environment with very clear audio "
                f"and no background noise.")

    def user_styles(self) -> list[Style]:
        return [Style(f"user-{i:02d}", d.split()[2]) for i, d in enumerate(PARLER_USERS)]  # "A young male ..."

    def about(self) -> dict:
        return {"name": "Indic Parler-TTS", "model": self.model_id, "version": self.version,
                "licence": "Apache-2.0", "url": "https://huggingface.co/ai4bharat/indic-parler-tts"}

    def synthesize(self, items: list[tuple[str, Style]]) -> list[Speech | TTSError]:
        out: list[Speech | TTSError] = []
        for first in range(0, len(items), self.batch_size):
            batch = items[first:first + self.batch_size]
            try:
                out.extend(self._batch(batch))
            except (RuntimeError, ValueError) as exc:
                out.extend(TTSError(f"Parler-TTS failed on a batch: {exc}") for _ in batch)
        return out

    def _batch(self, batch: list[tuple[str, Style]]) -> list[Speech | TTSError]:
        torch = self.torch
        desc = self.description_tokenizer([self.description(s) for _, s in batch], return_tensors="pt",
                                          padding=True).to(self.device)
        prompt = self.prompt_tokenizer([t for t, _ in batch], return_tensors="pt", padding=True).to(self.device)
        torch.manual_seed(self.seed)
        extra = {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens else {}
        with torch.no_grad():
            generated = self.model.generate(input_ids=desc.input_ids, attention_mask=desc.attention_mask,
                                            prompt_input_ids=prompt.input_ids,
                                            prompt_attention_mask=prompt.attention_mask, do_sample=True,
                                            return_dict_in_generate=True, **extra)
        results: list[Speech | TTSError] = []
        for i, (text, _) in enumerate(batch):
            length = int(generated.audios_length[i])
            audio = generated.sequences[i, :length].float().cpu().numpy().reshape(-1)
            if length == 0 or not np.isfinite(audio).all():
                results.append(TTSError(f"Parler-TTS produced no audio for {text[:40]!r}"))
                continue
            audio = resample(audio, self.rate, SAMPLE_RATE)
            try:
                audio, _ = trim(audio, [], SAMPLE_RATE)
            except TTSError as exc:
                results.append(exc)
                continue
            results.append(Speech(audio, proportional_words(text, 0.02, max(0.03, audio.size / SAMPLE_RATE - 0.06)),
                                  PROPORTIONAL))
        return results


def load_backend(name: str, **options) -> Backend:
    """`espeak`, `parler`, or `module:Class` (constructed with the same options it accepts)."""
    if name == "espeak":
        return EspeakBackend()
    if name == "parler":
        return ParlerBackend(**options)
    module, sep, cls = name.partition(":")
    if not sep:
        raise TTSError(f"unknown --tts {name!r}: espeak, parler, or module:Class")
    try:
        return getattr(importlib.import_module(module), cls)()
    except (ImportError, AttributeError) as exc:
        raise TTSError(f"cannot load --tts {name}: {exc}") from exc
