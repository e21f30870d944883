"""PersonaPlex's prompt sequence: a voice prompt and a text prompt as frames of forced tokens.

Contract. `PromptBuilder.frames(spec)` turns a `PromptSpec` (a voice: a preset name or a WAV;
a text: the persona) into `PromptFrames`: P frames, each forcing all 17 streams of the LM
(text, 8 agent codebooks, 8 user codebooks), in PersonaPlex's order (their `LMGen.step_system_prompts`):

| phase   | frames             | text               | agent audio (8)            | user audio (8) |
|---------|--------------------|--------------------|----------------------------|----------------|
| voice   | N = ceil(len/1920) | pad (3)            | Mimi codes of the voice    | SINE           |
| silence | 6 (0.5 s)          | pad                | SILENCE                    | SINE           |
| text    | one per token      | "<system> TEXT <system>" | SILENCE              | SINE           |
| silence | 6                  | pad                | SILENCE                    | SINE           |

- A preset voice saved by PersonaPlex (`voices/NAME.pt`: `{"embeddings": [N-1, 1, 1, dim], "cache":
  int64 [1, 17, 4]}`, their `LMGen` after the voice phase) is replayed as they do: its N-1 summed
  input embeddings stand in for ring positions 0..N-2, and its token ring gives the voice's last
  two frames (positions N-1 and N). Read from their code; not checked against their files, which
  cannot be downloaded here. `save_voice_embeddings` (agent/engine/prompt_state.py) writes one from a WAV.
- The voice WAV is read at any rate and channel count, mixed to mono, resampled to 24 kHz,
  loudness-normalised to -24 LUFS with pyloudnorm, cut in 1920-sample frames (the last padded
  with zeros) and encoded frame by frame by a batch-1 streaming Mimi, as their server does.
- A text that already carries the `<system>` tags is not wrapped again. No text (None or blank)
  means "no role": the text phase has no frames (their server crashes on an empty prompt).
- SILENCE and SINE are PersonaPlex's constants for Kyutai's Mimi (2048-entry codebooks). Another
  codec (the tiny test model) gets its own: its codes for a silent frame and for their 440 Hz,
  0.5-amplitude sine frame, encoded once.
- How the frames are stepped through moshi (which positions are forced, what is cached) is
  agent/engine/prompt_state.py's contract; this module knows nothing of moshi's streaming state.

A bad prompt (unknown preset, unreadable or silent WAV, too long a voice or text) raises
`PromptError` with a message fit for the caller.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.audio.files import read_mono
from agent.audio.stream import resample
from agent.config import MAX_TEXT_PROMPT_CHARS
from agent.errors import PromptError
from agent.models import TEXT_PADDING_ID, LoadedModel

SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)  # PersonaPlex's lm.py, Kyutai's Mimi
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
PERSONAPLEX_CARD = 2048
SILENCE_FRAMES = 6  # 0.5 s after the voice and after the text
TARGET_LUFS = -24.0
SYSTEM_TAG = "<system>"
MAX_VOICE_SECONDS = 15.0  # PersonaPlex's presets are a few seconds; longer only costs context
MIN_VOICE_SECONDS = 0.5
MAX_TEXT_TOKENS = 400  # 32 s of forced frames; the whole prompt must stay well inside the context
AUDIO_CODEBOOKS = 8
MAX_ENCODED_VOICES = 64




@dataclass(frozen=True)
class PromptSpec:
    """What a call runs on: a voice (a preset name of the model, or a WAV path the server trusts:
    the catalogue's or a local user's, never a caller's) and a persona text."""

    voice: str | None = None
    text: str | None = None

    @property
    def empty(self) -> bool:
        return not self.voice and not (self.text or "").strip()


@dataclass
class PromptFrames:
    """P frames of forced tokens (see the module notes), and the key that identifies them."""

    key: str  # same key, same frames: the model, the voice's content and the text
    text: np.ndarray  # [P] int64
    agent: np.ndarray  # [P, 8] int64
    user: np.ndarray  # [P, 8] int64
    voice_frames: int
    text_tokens: int
    # a PersonaPlex .pt voice: summed input embeddings for ring positions 0..voice_frames-2
    voice_embeddings: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.text.shape[0])


class PromptBuilder:
    """Builds prompt frames for one model. Thread-safe; its Mimi is its own copy (the engine's
    Mimi streams the live batch), so encoding a voice never touches a live call."""

    def __init__(self, model: LoadedModel, max_frames: int | None = None):
        if model.mimi.is_streaming:
            raise RuntimeError("build the PromptBuilder before the engine starts streaming the model's Mimi")
        self.model = model
        self._mimi = copy.deepcopy(model.mimi)
        self._lock = threading.Lock()
        self._voices: dict[str, tuple[tuple[int, int], np.ndarray, str]] = {}  # path -> (stat, codes, id)
        context = model.lm.transformer.layers[0].self_attn.context or 3000
        # a prompt leaves at least three quarters of the context to the conversation
        self.max_frames = max_frames or context // 4
        with self._lock:
            if model.mimi.cardinality == PERSONAPLEX_CARD and model.mimi.num_codebooks >= AUDIO_CODEBOOKS:
                self.silence = np.array(SILENCE_TOKENS, np.int64)
                self.sine = np.array(SINE_TOKENS, np.int64)
            else:
                t = np.arange(FRAME_SIZE) / SAMPLE_RATE
                self.silence = self._encode(np.zeros(FRAME_SIZE, np.float32))[0]
                self.sine = self._encode((0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32))[0]

    def voices(self) -> list[str]:
        """The preset voices the model ships (PersonaPlex's voices.tgz)."""
        return sorted(self.model.preset_voices)

    def frames(self, spec: PromptSpec) -> PromptFrames:
        voice_codes, voice_id, embeddings = self._voice(spec.voice)
        text_ids = self.text_tokens(spec.text)
        silence = [self.silence] * SILENCE_FRAMES
        agent = list(voice_codes) + silence + [self.silence] * len(text_ids) + silence
        text = [TEXT_PADDING_ID] * (len(voice_codes) + SILENCE_FRAMES) + text_ids + [TEXT_PADDING_ID] * SILENCE_FRAMES
        if len(agent) > self.max_frames:
            raise PromptError(f"the prompt is {len(agent)} frames ({len(agent) * 0.08:.1f} s); this model allows "
                              f"{self.max_frames} ({self.max_frames * 0.08:.1f} s): use a shorter voice or text")
        key = hashlib.sha256(f"{self.model.name}\0{voice_id}\0{spec.text or ''}".encode()).hexdigest()[:24]
        return PromptFrames(key=key, text=np.array(text, np.int64), agent=np.stack(agent).astype(np.int64),
                            user=np.tile(self.sine, (len(agent), 1)).astype(np.int64),
                            voice_frames=len(voice_codes), text_tokens=len(text_ids), voice_embeddings=embeddings)

    def text_tokens(self, text: str | None) -> list[int]:
        if text is None or not text.strip():
            return []
        text = text.strip()
        if len(text) > MAX_TEXT_PROMPT_CHARS:
            raise PromptError(f"the text prompt is {len(text)} characters; at most {MAX_TEXT_PROMPT_CHARS}")
        if self.model.tokenizer is None:
            raise PromptError("this model has no text tokenizer, so it cannot take a text prompt")
        if not (text.startswith(SYSTEM_TAG) and text.endswith(SYSTEM_TAG)):
            text = f"{SYSTEM_TAG} {text} {SYSTEM_TAG}"
        ids = [int(i) for i in self.model.tokenizer.encode(text)]
        if len(ids) > MAX_TEXT_TOKENS:
            raise PromptError(f"the text prompt is {len(ids)} tokens; at most {MAX_TEXT_TOKENS}")
        return ids

    # -- the voice ---------------------------------------------------------------------------

    def _voice(self, voice: str | None) -> tuple[np.ndarray, str, torch.Tensor | None]:
        """[N, 8] Mimi codes, an id that changes when the voice's content does, and for a .pt
        voice its input embeddings."""
        if not voice:
            return np.zeros((0, AUDIO_CODEBOOKS), np.int64), "", None
        bare_name = Path(voice).name == voice  # "NATF2" or "NATF2.pt"; a path is a file, never a preset
        path = self.model.preset_voices.get(Path(voice).stem) if bare_name else None
        if path is None:
            path = Path(voice)
            if path.suffix.lower() != ".wav" or not path.is_file():
                raise PromptError(f"unknown voice {voice!r}: use one of this model's voices "
                                  f"{self.voices()} or a WAV from the voice catalogue")
        if path.suffix == ".pt":
            return self._saved_voice(path)
        try:
            stat = path.stat()
            known = self._voices.get(str(path))
            if known is not None and known[0] == (stat.st_mtime_ns, stat.st_size):
                return known[1], known[2], None  # encoded before: a cached prompt costs no Mimi pass
            content = path.read_bytes()
            audio, rate = read_mono(path)
        except (OSError, sf.SoundFileError, RuntimeError) as exc:
            raise PromptError(f"cannot read the voice WAV {path.name}: {exc}") from exc
        codes, voice_id = self.encode_voice(audio, rate), hashlib.sha256(content).hexdigest()
        with self._lock:
            self._voices[str(path)] = ((stat.st_mtime_ns, stat.st_size), codes, voice_id)
            while len(self._voices) > MAX_ENCODED_VOICES:
                self._voices.pop(next(iter(self._voices)))
        return codes, voice_id, None

    def _saved_voice(self, path: Path) -> tuple[np.ndarray, str, torch.Tensor]:
        """A PersonaPlex .pt voice (see the module notes) as codes for its last two frames plus the
        embeddings of the ones before."""
        lm = self.model.lm
        try:
            content = path.read_bytes()
            saved = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
            embeddings, ring = saved["embeddings"], saved["cache"]
        except Exception as exc:  # a pickle, a truncated file, missing keys: all unusable the same way
            raise PromptError(f"cannot read the voice file {path.name}: {type(exc).__name__}: {exc}") from exc
        n = embeddings.shape[0] + 1
        if (embeddings.dim() != 4 or embeddings.shape[1:3] != (1, 1) or embeddings.shape[3] != lm.dim
                or ring.dim() != 3 or ring.shape[:2] != (1, lm.num_codebooks) or n < 2):
            raise PromptError(f"{path.name} is not a PersonaPlex voice for this model (embeddings "
                              f"{tuple(embeddings.shape)}, cache {tuple(ring.shape)}; the LM has dim {lm.dim} "
                              f"and {lm.num_codebooks} streams)")
        if n / 12.5 > MAX_VOICE_SECONDS:
            raise PromptError(f"the voice is {n / 12.5:.1f} s long; use at most {MAX_VOICE_SECONDS:g} s")
        width = ring.shape[2]
        last, after = ring[0, :, (n - 1) % width].numpy(), ring[0, :, n % width].numpy()
        codes = np.tile(self.silence, (n, 1)).astype(np.int64)  # rows before N-2 are never read
        codes[n - 2, 1:] = last[2:1 + AUDIO_CODEBOOKS]  # frame N-2's acoustic codes sit at position N-1
        codes[n - 1, 0] = last[1]
        codes[n - 1, 1:] = after[2:1 + AUDIO_CODEBOOKS]
        return codes, hashlib.sha256(content).hexdigest(), embeddings[:, 0, 0].float()

    def encode_voice(self, audio: np.ndarray, rate: int) -> np.ndarray:
        """Mono audio at any rate -> [N, 8] codes (24 kHz, -24 LUFS, 1920-sample frames)."""
        padded = prepare_voice(audio, rate)
        with self._lock:
            return self._encode(padded)

    @torch.no_grad()
    def _encode(self, audio: np.ndarray) -> np.ndarray:
        """Frame by frame through a fresh batch-1 streaming Mimi (lock held)."""
        frames = torch.from_numpy(audio).to(self.model.device).view(-1, 1, 1, FRAME_SIZE)
        with self._mimi.streaming(1):
            codes = [self._mimi.encode(frame)[0, :AUDIO_CODEBOOKS, 0] for frame in frames]
        return torch.stack(codes).cpu().numpy().astype(np.int64)


def prepare_voice(audio: np.ndarray, rate: int) -> np.ndarray:
    """Mono audio at any rate -> 24 kHz at -24 LUFS (pyloudnorm), padded to whole 1920-sample frames."""
    import pyloudnorm

    seconds = audio.size / max(rate, 1)
    if not np.isfinite(audio).all():
        raise PromptError("the voice WAV holds NaN or infinite samples")
    if seconds < MIN_VOICE_SECONDS or seconds > MAX_VOICE_SECONDS:
        raise PromptError(f"the voice is {seconds:.1f} s long; use {MIN_VOICE_SECONDS:g} to {MAX_VOICE_SECONDS:g} s")
    audio = resample(audio.astype(np.float32), rate, SAMPLE_RATE)
    loudness = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(audio.astype(np.float64))
    if not math.isfinite(loudness):
        raise PromptError("the voice WAV is silent")
    audio = pyloudnorm.normalize.loudness(audio.astype(np.float64), loudness, TARGET_LUFS).astype(np.float32)
    n = -(-audio.size // FRAME_SIZE)
    padded = np.zeros(n * FRAME_SIZE, np.float32)
    padded[:audio.size] = audio
    return padded
