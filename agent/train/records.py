"""The records the stages hand each other: one dataclass per manifest line, JSON in and out.

Every manifest is a `manifest.jsonl` in the stage's output folder, one record per line; `path` fields
are relative to that folder, so a stage's folder can be moved or copied as a whole. Times are seconds
inside the file the record describes.

    ingest     AudioRecord     one kept source file, 24 kHz, loudness-normalised
    segment    SegmentRecord   one utterance (or a whole two-speaker recording, passed through)
    dialogues  DialogueRecord  one stereo conversation (or monologue), LEFT = agent, RIGHT = user, with its Turns
    align      AlignedRecord   one dialogue ready for moshi-finetune (WAV + alignment JSON)
    tokens     TokenRecord     one dialogue as Mimi codes + the per-frame text stream (what training reads)
    script     ScriptRecord    one synthetic dialogue's script: agent voice, persona, turns with events
    synth      SynthRecord     an AlignedRecord (tokens reads it as align's) + the synthetic dialogue's labels
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

UTTERANCE, CONVERSATION = "utterance", "conversation"  # kinds of source: one speaker, or two on two channels
AGENT, USER = "agent", "user"
ROAD_ASSEMBLED, ROAD_CONVERSATION, ROAD_MONOLOGUE = "assembled", "conversation", "monologue"

Span = list[float]  # [start, end] in seconds

T = TypeVar("T")


class RecordError(ValueError):
    """A manifest line that does not make a valid record; the message says what is wrong."""


def clean_text(text: Any) -> str | None:
    """NFC-normalised, whitespace-collapsed text; None for missing or blank."""
    if text is None:
        return None
    if not isinstance(text, str):
        text = str(text)
    # NFC: Telugu can encode the same syllable in more than one code-point order; one form for the tokenizer.
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return text or None


@dataclass(frozen=True)
class Word:
    """One time-aligned word (seconds), in the training records and in evaluation transcripts."""

    text: str
    start: float
    end: float

    def shifted(self, offset: float) -> Word:
        return Word(self.text, round(self.start + offset, 4), round(self.end + offset, 4))

    @property
    def mid(self) -> float:
        return (self.start + self.end) / 2

    @classmethod
    def parse(cls, obj: Any) -> Word:
        """[w, s, e], [w, [s, e]], [w, [s, e], speaker] (moshi-finetune's shape) or {"word"|"text", "start", "end"}."""
        try:
            if isinstance(obj, dict):
                text, start, end = obj.get("word", obj.get("text")), obj["start"], obj["end"]
            elif isinstance(obj[1], (list, tuple)):
                text, (start, end) = obj[0], obj[1]
            else:
                text, start, end = obj[0], obj[1], obj[2]
            text = clean_text(text)
            start, end = float(start), float(end)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise RecordError(f"bad word timing {obj!r}: {exc}") from exc
        if not text or not (0 <= start <= end):
            raise RecordError(f"bad word timing {obj!r}: needs text and 0 <= start <= end")
        return cls(text, start, end)


def _list_cell(value: Any, name: str, shape: str) -> list | None:
    """A list given as is or as JSON in a CSV cell; None when empty. RecordError otherwise."""
    if value is None or value == "":
        return None
    if isinstance(value, str):  # a CSV cell holds JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{name} is not JSON: {exc}") from exc
    if not isinstance(value, list):
        raise RecordError(f"{name} must be a list of {shape}")
    return value


def parse_words(value: Any) -> list[Word] | None:
    items = _list_cell(value, "words", "[word, start, end]")
    if items is None:
        return None
    return sorted((Word.parse(w) for w in items), key=lambda w: w.start) or None


@dataclass
class GivenSegment:
    """A transcript given for one stretch of a multi-utterance file (so the transcript can be split)."""

    start: float
    end: float
    transcript: str | None = None
    emotion: str | None = None

    @classmethod
    def parse(cls, obj: Any) -> GivenSegment:
        try:
            seg = cls(float(obj["start"]), float(obj["end"]), clean_text(obj.get("transcript", obj.get("text"))),
                      clean_text(obj.get("emotion")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"bad segment {obj!r}: needs start, end, transcript") from exc
        if not 0 <= seg.start < seg.end:
            raise RecordError(f"bad segment {obj!r}: needs 0 <= start < end")
        return seg


def parse_segments(value: Any) -> list[GivenSegment] | None:
    items = _list_cell(value, "segments", "{start, end, transcript}")
    if items is None:
        return None
    return sorted((GivenSegment.parse(s) for s in items), key=lambda s: s.start) or None


@dataclass
class AudioRecord:
    """ingest/manifest.jsonl: one kept source file."""

    id: str
    path: str  # 24 kHz PCM-16 WAV, relative to the manifest's folder
    duration: float
    kind: str  # "utterance": one speaker, mono; "conversation": two speakers, stereo LEFT = agent, RIGHT = user
    speaker: str  # the (agent-side, for a conversation) speaker id as the source names it
    emotion: str  # a catalogue emotion id (assets/catalogue.json)
    licence: str
    source: str  # where it came from: a file path, "dataset:split:row" or a URL
    transcript: str | None = None  # of the whole file (the agent side for a conversation)
    words: list[Word] | None = None  # given word timings (agent side for a conversation)
    segments: list[GivenSegment] | None = None  # given per-segment transcripts
    user_speaker: str | None = None  # conversation: the speaker on the user channel
    user_transcript: str | None = None  # conversation: informational, never trained as agent text
    gender: str | None = None  # "female"/"male" when the source says so
    channels: int = 1
    sample_rate: int = 24_000
    source_rate: int = 0  # the source file's sample rate before resampling
    gain_db: float = 0.0  # gain applied by loudness normalisation (per channel: the agent's)


@dataclass
class SegmentRecord:
    """segments/manifest.jsonl: one utterance cut by the VAD, or a whole conversation passed through."""

    id: str
    parent_id: str
    path: str
    duration: float
    kind: str
    speaker: str
    emotion: str
    licence: str
    source: str
    start: float  # where this segment starts and ends in the parent file
    end: float
    speech: list[Span] = field(default_factory=list)  # voiced regions in this file (agent channel if stereo)
    transcript: str | None = None
    # "segment": the transcript belongs to this segment (given per segment or cut from word timings);
    # "file": the file's one transcript, kept because the file was kept whole; None: no transcript.
    transcript_scope: str | None = None
    words: list[Word] | None = None
    user_speech: list[Span] | None = None  # conversation: voiced regions on the user channel
    user_speaker: str | None = None
    user_transcript: str | None = None
    gender: str | None = None


@dataclass
class Turn:
    role: str  # "agent" (LEFT channel) or "user" (RIGHT channel)
    start: float
    end: float
    speaker: str
    emotion: str | None
    transcript: str | None
    source: str  # the segment id it came from
    speech: list[Span] = field(default_factory=list)  # voiced regions, dialogue time
    words: list[Word] | None = None  # given timings, dialogue time
    backchannel: bool = False  # a short acknowledgement inside the other side's turn
    overlap: float = 0.0  # seconds this turn starts before the previous turn of the other side ends


@dataclass
class DialogueRecord:
    """dialogues/manifest.jsonl: one stereo 24 kHz conversation, LEFT = agent, RIGHT = user."""

    id: str
    path: str
    duration: float
    # "assembled" from single-speaker utterances, "conversation" (a two-speaker recording), or "monologue"
    # (one speaker's utterances back to back on the LEFT, the RIGHT silent: Telugu adaptation data)
    road: str
    agent_speaker: str
    agent_voice: str | None  # the catalogue voice id the agent speaker trains, when mapped
    emotion: str | None  # the agent's emotion if it is one for the whole dialogue, else None
    licences: list[str]
    sources: list[str]  # segment ids used
    turns: list[Turn]
    user_speakers: list[str] = field(default_factory=list)
    agent_transcript: str | None = None  # conversation road: a transcript given only for the whole file
    seed: int | None = None


@dataclass
class AlignedRecord:
    """align/manifest.jsonl: one dialogue with its moshi-finetune alignment file."""

    id: str
    path: str  # data/<id>.wav (stereo, LEFT = agent)
    alignment: str  # data/<id>.json: {"alignments": [[word, [start, end], "SPEAKER_MAIN"], ...]}
    duration: float
    agent_speaker: str
    agent_voice: str | None
    emotion: str | None
    licences: list[str]
    n_words: int  # agent words written
    methods: dict[str, int]  # words per method: "given", "proportional", or a plug-in aligner's name
    text_conditions: dict[str, str] | None = None  # conditioner name -> value (speaker/emotion) for stage 7
    # the agent's PersonaPlex-style prompt, when the source has one (synth): a persona text and a voice clip
    persona: str | None = None
    voice_prompt: str | None = None  # prompts/<id>.wav: the agent's voice on another sentence (mono, 24 kHz)


@dataclass
class TokenRecord:
    """tokens/manifest.jsonl: one dialogue encoded once, so training reads tokens, not audio."""

    id: str
    path: str  # codes/<id>.safetensors: "audio" int16 [2K, T] (agent K codebooks, then user K), "text" int32 [T]
    frames: int  # T, at Mimi's 12.5 Hz
    duration: float
    agent_speaker: str
    agent_voice: str | None
    emotion: str | None
    licences: list[str]
    n_words: int  # agent words placed in the text stream
    n_text_tokens: int  # text tokens placed (the rest of the stream is padding)
    conditions: dict[str, str | None] = field(default_factory=dict)  # conditioner name -> value (speaker, emotion)
    # the agent's prompt for prompted training (train --prompts): persona text, and prompts/<id>.wav copied here
    persona: str | None = None
    voice_prompt: str | None = None


TURN, BACKCHANNEL = "turn", "backchannel"


@dataclass
class ScriptTurn:
    """One turn of a script. Timing is the synth stage's; the script says only what happens:
    `interrupts`: starts while the other side's previous turn is still going, which stops there;
    `overlap`: starts before the other side's previous turn ends, which finishes anyway;
    `pause_ms`: a long silence before this turn (instead of a drawn gap);
    kind "backchannel": a short acknowledgement on the listener's channel inside the other side's previous
    turn (it does not take the floor)."""

    speaker: str  # "agent" or "user"
    text: str
    emotion: str | None = None  # agent turns: a catalogue emotion id; user turns: None
    kind: str = TURN
    interrupts: bool = False
    overlap: bool = False
    pause_ms: int | None = None


@dataclass
class ScriptRecord:
    """script/manifest.jsonl: one dialogue to synthesise."""

    id: str
    voice: str  # the agent's catalogue voice id
    persona: str  # the agent's role/persona text (PersonaPlex-style text prompt)
    turns: list[ScriptTurn]
    licence: str  # of the text
    source: str  # "sentences:FILE", "llm:HF_ID", "jsonl:FILE:LINE"
    topic: str | None = None
    prompt_text: str | None = None  # a sentence not in the dialogue, for the agent's voice-prompt clip
    seed: int | None = None


@dataclass
class SynthRecord(AlignedRecord):
    """synth/manifest.jsonl: an AlignedRecord (so `tokens` reads synth's folder as align's, with exact word
    timings from the TTS engine instead of the approximate aligner) plus the synthetic dialogue's labels."""

    user_voice: str = ""
    tts: str = ""  # backend and version
    source: str = ""
    seed: int | None = None  # the script's (synth's own seed is in the dataset card)
    events: dict[str, float] = field(default_factory=dict)  # backchannels, interruptions, overlaps, pauses, seconds
    turns: list[dict] = field(default_factory=list)  # role, kind, start, end, text, emotion, voice, interrupted, words
    acoustics: dict = field(default_factory=dict)  # what was done to the user channel: level, noise, room


def to_dict(record: Any) -> dict:
    return asdict(record)


def _spans(value: Any) -> list[Span]:
    return [[float(a), float(b)] for a, b in value]


def from_dict(cls: type[T], data: dict) -> T:
    """Build a record from a manifest line; unknown keys are ignored, missing required ones raise RecordError."""
    if not isinstance(data, dict):
        raise RecordError(f"a record must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names}
    try:
        if "words" in kwargs and kwargs["words"] is not None:
            kwargs["words"] = parse_words(kwargs["words"])
        if cls is AudioRecord and kwargs.get("segments") is not None:
            kwargs["segments"] = parse_segments(kwargs["segments"])
        for key in ("speech", "user_speech"):
            if kwargs.get(key) is not None:
                kwargs[key] = _spans(kwargs[key])
        if cls is DialogueRecord:
            kwargs["turns"] = [from_dict(Turn, t) for t in kwargs.get("turns", [])]
        if cls is ScriptRecord:
            turns = kwargs.get("turns")
            if not isinstance(turns, list):
                raise RecordError("turns must be a list")
            kwargs["turns"] = [from_dict(ScriptTurn, t) for t in turns]
        return cls(**kwargs)
    except RecordError:
        raise
    except (TypeError, ValueError) as exc:
        raise RecordError(f"not a valid {cls.__name__}: {exc}") from exc
