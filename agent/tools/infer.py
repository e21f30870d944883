"""Offline inference for evaluations: a recording in, the agent's audio and text out.

    python -m agent.tools.infer --model kyutai/moshiko-pytorch-bf16 IN.wav OUT.wav --greedy
    python -m agent.tools.infer --model tiny IN.wav OUT.wav --voice ravi --emotion sad   # random weights, CPU
    python -m agent.tools.infer --model nvidia/personaplex-7b-v1 --voice-prompt NATF2 \
        --text-prompt "You are a friendly bank agent." --greedy IN.wav OUT.wav

The recording goes through the same `FrameEngine` a live call uses, as one seat, frame by frame
and as fast as the model runs (no real-time wait, no engine thread): what is measured here is what
a caller would have heard. OUT.wav is the agent's 24 kHz mono audio, aligned with the input (output
frame k answers input frame k; the first frame is silent, Moshi's acoustic delay). The text goes to
stdout and to OUT.txt beside OUT.wav. Any WAV rate and channel count is read (mixed to mono and
resampled to 24 kHz); the last partial frame is padded with zeros. A conditioned model speaks
with the catalogue's voice and emotion (its defaults unless --voice/--emotion say otherwise), as a
call does; an unconditioned one (Kyutai's Moshiko/Moshika) ignores them. A model that takes prompts
(PersonaPlex) starts from `--voice-prompt` (a preset name of the model or a WAV file) and
`--text-prompt` (the persona) through the same prompt path as a live call (agent/engine/prompts.py,
agent/engine/prompt_state.py): output frame 0 is then already the agent's first answer frame.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.audio.stream import resample
from agent.config import EngineConfig, ModelConfig, SamplingConfig
from agent.engine import FrameEngine
from agent.engine.prompts import PromptSpec
from agent.errors import CatalogueError, ConditionError, ModelLoadError, PromptError
from agent.models import LoadedModel, load_model
from agent.voices import load_catalogue

log = logging.getLogger(__name__)


@dataclass
class InferResult:
    pcm: np.ndarray  # float32, 24 kHz, FRAME_SIZE samples per input frame
    text_tokens: list[int]  # one per frame; -2 where the model had nothing yet (the first frame)
    text: str


def read_wav(path: str | Path) -> np.ndarray:
    """Any WAV (rate, channels, sample format) as 24 kHz mono float32."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return resample(audio.mean(axis=1), rate, SAMPLE_RATE)


def to_frames(audio: np.ndarray) -> np.ndarray:
    """(n_frames, FRAME_SIZE) float32, the last partial frame padded with zeros."""
    n_frames = -(-audio.size // FRAME_SIZE)
    padded = np.zeros(n_frames * FRAME_SIZE, np.float32)
    padded[:audio.size] = audio
    return padded.reshape(n_frames, FRAME_SIZE)


def infer(model: LoadedModel, audio: np.ndarray, sampling: SamplingConfig | None = None,
          conditions: dict[str, str] | None = None, prompt: PromptSpec | None = None) -> InferResult:
    """Run 24 kHz mono `audio` through a one-seat FrameEngine on `model` (which must not back
    another engine: the streaming state lives in its modules). `conditions`, e.g. {"speaker":
    "ravi", "emotion": "sad"}, applies from the first frame; None keeps the engine's defaults.
    `prompt` (a model that takes prompts): the voice/text prompt the conversation starts from
    (PromptError if the model cannot take it)."""
    engine = FrameEngine(model, EngineConfig(max_sessions=1), sampling)
    seat = engine.acquire("infer")
    if conditions:
        seat.set_conditions(conditions)  # ConditionError for a value the model does not know
    if prompt is not None:
        seat.set_prompt(prompt)
    pcm, tokens, pieces = [], [], []
    for frame in to_frames(audio):
        seat.push(frame)
        engine.step_once()
        out = seat.pull()
        assert out is not None, "the engine produced no frame for an input frame"
        pcm.append(out.pcm)
        tokens.append(out.text_token)
        pieces.append(out.text)
    seat.release("done")
    return InferResult(np.concatenate(pcm) if pcm else np.zeros(0, np.float32), tokens, "".join(pieces).strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF repo id, a local checkpoint folder, 'tiny' or 'moshi-7b-random'")
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling (deterministic)")
    p.add_argument("--seed", type=int, default=ModelConfig.seed, help="sampling seed (and tiny-model weights)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--voice", default=None, help="a voice id from assets/catalogue.json (default: its default)")
    p.add_argument("--emotion", default=None, help="an emotion id from assets/catalogue.json (default: its default)")
    p.add_argument("--voice-prompt", default=None,
                   help="a model that takes prompts (PersonaPlex): a preset voice name (e.g. NATF2) or a WAV file")
    p.add_argument("--text-prompt", default=None, help="the persona for a model that takes prompts")
    p.add_argument("input", type=Path, help="a WAV file, any rate and channel count")
    p.add_argument("output", type=Path, help="the agent's audio (24 kHz mono WAV); its text goes to OUTPUT.txt")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    sampling = SamplingConfig(use_sampling=not args.greedy)
    config = ModelConfig(model=args.model, device=args.device, dtype=args.dtype, seed=args.seed, sampling=sampling)
    try:
        settings = load_catalogue().settings(args.voice, args.emotion)
        model = load_model(config)
        audio = read_wav(args.input)
    except (CatalogueError, ModelLoadError, sf.SoundFileError) as exc:
        log.error("%s", exc)
        return 2
    torch.manual_seed(args.seed)
    prompt = None
    if args.voice_prompt or args.text_prompt:
        if not model.takes_prompts:
            log.error("%s takes no voice or text prompt (a PersonaPlex checkpoint does)", model.name)
            return 2
        prompt = PromptSpec(args.voice_prompt.removesuffix(".pt") if args.voice_prompt else None, args.text_prompt)
    try:
        result = infer(model, audio, sampling, settings.conditions(model.condition_values), prompt)
    except (ConditionError, PromptError) as exc:
        log.error("%s", exc)
        return 2
    sf.write(str(args.output), result.pcm, SAMPLE_RATE, subtype="FLOAT")
    args.output.with_suffix(".txt").write_text(result.text + "\n", encoding="utf-8")
    print(result.text)
    log.info("%d frames (%.1f s) -> %s", len(result.text_tokens), result.pcm.size / SAMPLE_RATE, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
