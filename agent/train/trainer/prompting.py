"""Prompted training: PersonaPlex's prompt sequence before every window, so a fine-tune keeps taking
voice and text prompts.

Each dialogue's prompt (tokens' record: the persona text and prompts/<id>.wav, synth's voice clip) becomes
forced codes with the serving code's own builder (agent/engine/prompts.py: voice frames at -24 LUFS, 0.5 s
silence, the `<system>`-wrapped text, 0.5 s silence, every stream forced), so training and serving share
one definition of the sequence. They are built once per dialogue when the run starts (one Mimi pass per
voice clip), never per step. The text is tokenized with the run's tokenizer (a Telugu one after a vocabulary
resize), as the exported model's own builder will tokenize it when serving.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import sentencepiece
import torch

from agent.engine.prompts import AUDIO_CODEBOOKS, PromptBuilder, PromptFrames, PromptSpec
from agent.errors import PromptError
from agent.train.common import UsageError
from agent.train.records import TokenRecord
from agent.train.trainer.model import TrainModel


def prompt_builder(model: TrainModel, num_codebooks: int) -> PromptBuilder:
    """The serving code's PromptBuilder for the base, with the run's tokenizer."""
    if not model.base.takes_prompts:
        raise UsageError(f"prompts: {model.base.name} takes no voice or text prompt; prompted training needs a "
                         "PersonaPlex checkpoint (nvidia/personaplex-7b-v1, a folder with its weights, or "
                         "tiny-personaplex)")
    if num_codebooks != AUDIO_CODEBOOKS:
        raise UsageError(f"prompts: the shards hold {num_codebooks} codebooks per side; PersonaPlex's prompt "
                         f"forces {AUDIO_CODEBOOKS}")
    tokenizer = sentencepiece.SentencePieceProcessor(str(model.tokenizer_path))
    return PromptBuilder(dataclasses.replace(model.base, tokenizer=tokenizer))


def prompt_codes(frames: PromptFrames) -> torch.Tensor:
    """Forced prompt frames as the trainer's codes [1 + 2·8, P]: text, the agent's codebooks, the user's."""
    return torch.from_numpy(np.concatenate([frames.text[None], frames.agent.T, frames.user.T])).long()


def build_prompts(builder: PromptBuilder, records: list[TokenRecord], root: Path
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(record id -> prompt codes, record id -> why its prompt is unusable). A dialogue without a persona
    or voice clip gets the empty prompt (zero frames), as a call without one does."""
    prompts: dict[str, torch.Tensor] = {}
    refused: dict[str, str] = {}
    for record in records:
        spec = PromptSpec(str(root / record.voice_prompt) if record.voice_prompt else None, record.persona)
        try:
            prompts[record.id] = prompt_codes(builder.frames(spec))
        except PromptError as exc:
            refused[record.id] = str(exc)
    return prompts, refused
