"""Offline inference for evaluations: a recording in, the agent's audio and text out.

    python -m agent.tools.infer --model kyutai/moshiko-pytorch-bf16 IN.wav OUT.wav --greedy
    python -m agent.tools.infer --model tiny IN.wav OUT.wav --voice ravi --emotion sad   # random weights, CPU
    python -m agent.tools.infer --model nvidia/personaplex-7b-v1 --voice-prompt NATF2 \
        --text-prompt "You are a friendly bank agent." --greedy IN.wav OUT.wav

The recording goes through the same `FrameEngine` a live call uses (agent/engine/offline.py), as one
seat, frame by frame and as fast as the model runs (no real-time wait, no engine thread): what is measured here is what
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
from pathlib import Path

import soundfile as sf
import torch

from agent import SAMPLE_RATE
from agent.audio.files import read_audio
from agent.config import ModelConfig, SamplingConfig
from agent.engine.offline import InferResult, infer
from agent.engine.prompts import PromptSpec
from agent.errors import CatalogueError, ConditionError, ModelLoadError, PromptError
from agent.models import load_model
from agent.voices import load_catalogue

__all__ = ["InferResult", "infer", "main"]

log = logging.getLogger(__name__)


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
        audio = read_audio(args.input)
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
