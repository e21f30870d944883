"""What a loaded `--model` hands the engine: `LoadedModel`, and the device/dtype it runs in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece
import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from agent.errors import ModelLoadError

TEXT_PADDING_ID = 3  # Moshi's "no word" token; 0 is its end-of-padding marker
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


@dataclass
class LoadedModel:
    """Everything the engine needs from a checkpoint."""

    name: str
    mimi: MimiModel
    lm: LMModel
    tokenizer: sentencepiece.SentencePieceProcessor | None
    device: torch.device
    dtype: torch.dtype
    random_weights: bool  # True: no trained weights are loaded, the voice is random noise
    lm_gen_config: dict = field(default_factory=dict)
    # How it was built, so training can rebuild and export it in Kyutai's folder layout:
    lm_config: dict = field(default_factory=dict)  # LMModel kwargs as config.json holds them
    mimi_config: dict | None = None  # None: Kyutai's default Mimi
    tokenizer_path: Path | None = None
    # PersonaPlex-style models take a voice prompt and a text prompt per call (agent/engine/prompts.py)
    takes_prompts: bool = False
    preset_voices: dict[str, Path] = field(default_factory=dict)  # name -> voices/NAME.pt|.wav
    lm_weights: Path | None = None  # the LM file as loaded (export puts PersonaPlex's dropped steps back from it)
    toy_note: str | None = None  # set for toy models trained here: what the page must say about them
    weights_licence: str | None = None  # as the folder's config.json (model_id) states it; None: not stated

    @property
    def description(self) -> str:
        params = sum(p.numel() for p in self.lm.parameters())
        kind = "RANDOM WEIGHTS (not a trained speech model: the voice is noise)" if self.random_weights else \
            "TOY trained on synthetic espeak-ng speech" if self.toy_note else "trained"
        return (f"{self.name} · {params / 1e6:.1f} M LM params · "
                f"{self.device.type} {str(self.dtype).removeprefix('torch.')} · {kind}")

    @property
    def condition_values(self) -> dict[str, list[str]]:
        """Categorical conditioners the LM really has (e.g. speaker, emotion), with their trained values."""
        provider = self.lm.condition_provider
        out: dict[str, list[str]] = {}
        for name, conditioner in (provider.conditioners.items() if provider is not None else []):
            values = getattr(getattr(conditioner, "tokenizer", None), "possible_values", None)
            if values is not None:
                out[name] = list(values)
        return out

    def decode_text(self, token: int) -> str:
        """The text piece for a sampled text token, '' for padding; '▁' becomes a space."""
        if token in (0, TEXT_PADDING_ID) or token < 0 or self.tokenizer is None:
            return ""
        if token >= self.tokenizer.vocab_size() or self.tokenizer.is_control(token) or self.tokenizer.is_unknown(token):
            return ""
        return self.tokenizer.id_to_piece(token).replace("▁", " ")


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown --dtype {dtype!r}: use bf16, fp16 or fp32") from None
