"""`--model` resolved through one table of model kinds: each named kind says how it loads and how its
codec alone loads; every other value is a released checkpoint (a Hugging Face repo id or a local folder).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from moshi.models.compression import MimiModel

from agent import ASSETS
from agent.config import (
    DEFAULT_GPU_MODEL,
    RANDOM_7B_MODEL,
    TELUGU_TINY_MODEL,
    TINY_MODEL,
    TINY_PERSONAPLEX_MODEL,
    ModelConfig,
)
from agent.errors import ModelLoadError
from agent.models.kyutai import checkpoint_mimi, load_checkpoint
from agent.models.loaded import LoadedModel, resolve_device, resolve_dtype
from agent.models.tiny import build_random_7b, build_tiny, tiny_mimi, tiny_mimi_config, tiny_personaplex_folder

log = logging.getLogger(__name__)

TELUGU_TINY_DIR = ASSETS / "models" / TELUGU_TINY_MODEL
TELUGU_TINY_NOTE = ("a toy trained on this project's CPU on synthetic espeak-ng Telugu dialogues, not a Telugu Moshi: "
                    "a muffled robotic voice whose words are not intelligible, a few dozen sentences, "
                    "no understanding. It exists to show that the training "
                    "pipeline teaches full-duplex behaviour (silent while you speak, answering when you stop) and "
                    "to give the CPU demo a voice that speaks.")


@dataclass(frozen=True)
class Request:
    """One `--model` to load, with the device, dtype, seed and context it loads with."""

    name: str
    device: torch.device
    dtype: torch.dtype
    seed: int
    context: int | None


Codec = tuple[MimiModel, dict | None]  # Mimi and its config (None: Kyutai's default)


@dataclass(frozen=True)
class ModelKind:
    summary: str
    load: Callable[[Request], LoadedModel]
    load_mimi: Callable[[str, torch.device, int], Codec]  # (name, device, seed): the codec without the LM


def _telugu_tiny_dir() -> str:
    if not (TELUGU_TINY_DIR / "config.json").is_file():
        raise ModelLoadError(f"--model {TELUGU_TINY_MODEL}: no trained weights in {TELUGU_TINY_DIR}. Train them on a "
                             "CPU (about an hour): python -m agent.train telugu-tiny --work /tmp/telugu-tiny")
    return str(TELUGU_TINY_DIR)


def _tiny_personaplex(r: Request) -> LoadedModel:
    model = load_checkpoint(str(tiny_personaplex_folder(seed=r.seed)), r.device, r.dtype, r.context)
    model.name = TINY_PERSONAPLEX_MODEL
    return model


def _telugu_tiny(r: Request) -> LoadedModel:
    model = load_checkpoint(_telugu_tiny_dir(), r.device, r.dtype, r.context)
    model.name, model.toy_note = TELUGU_TINY_MODEL, TELUGU_TINY_NOTE
    return model


def _tiny_codec(name: str, device: torch.device, seed: int) -> Codec:
    return tiny_mimi(device, seed), tiny_mimi_config()


KINDS: dict[str, ModelKind] = {
    TINY_MODEL: ModelKind(
        "small Moshi + Mimi from moshi's classes, random seeded weights: the real streaming code on a CPU",
        lambda r: build_tiny(r.device, r.dtype, r.seed, r.context), _tiny_codec),
    TINY_PERSONAPLEX_MODEL: ModelKind(
        "a tiny random checkpoint in PersonaPlex's layout (16-step depformer, preset voices), written to a "
        "folder and loaded as the real one",
        _tiny_personaplex, _tiny_codec),  # its folder holds this same Mimi
    RANDOM_7B_MODEL: ModelKind(
        "the full 7B architecture and full Mimi with random weights, for benchmarks",
        lambda r: build_random_7b(r.device, r.dtype, r.seed, r.context),
        lambda name, device, seed: (build_random_7b(device, torch.float32, seed).mimi, None)),
    TELUGU_TINY_MODEL: ModelKind(
        "the toy trained on this CPU on synthetic espeak-ng Telugu dialogues, shipped in assets/models/telugu-tiny/",
        _telugu_tiny, lambda name, device, seed: checkpoint_mimi(_telugu_tiny_dir(), device)),
}
CHECKPOINT = ModelKind(
    "a Hugging Face repo id in Kyutai's layout (incl. nvidia/personaplex-7b-v1, gated) or a local folder",
    lambda r: load_checkpoint(r.name, r.device, r.dtype, r.context),
    lambda name, device, seed: checkpoint_mimi(name, device))


def kind_of(name: str) -> ModelKind:
    return KINDS.get(name, CHECKPOINT)


def default_model_name(device: torch.device) -> str:
    return DEFAULT_GPU_MODEL if device.type == "cuda" else TINY_MODEL


def load_model(config: ModelConfig) -> LoadedModel:
    """The one entry point: `--model`, `--device`, `--dtype` in, a ready model out."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    name = config.model or default_model_name(device)
    model = kind_of(name).load(Request(name, device, dtype, config.seed, config.context))
    if model.random_weights:
        log.warning("Model %s has RANDOM weights (or was fine-tuned from them): not a trained speech model, "
                    "so the agent's voice is noise.",
                    model.name)
    log.info("Loaded %s", model.description)
    return model


def load_mimi(name: str, device: torch.device, seed: int = ModelConfig.seed) -> Codec:
    """Only the codec of `--model` (and its config, None for Kyutai's default): what encoding audio
    to training tokens needs, without loading a 7B LM."""
    return kind_of(name).load_mimi(name, device, seed)
