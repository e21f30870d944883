"""Model loading: turn `--model` into Mimi + Moshi LM + text tokenizer.

    kinds.py        the table of `--model` kinds (tiny, tiny-personaplex, moshi-7b-random, telugu-tiny,
                    and any repo id or folder), `load_model` and `load_mimi`
    loaded.py       `LoadedModel`, what the engine gets; device and dtype resolution
    kyutai.py       released checkpoints (Hugging Face repo or folder) through moshi's own loader
    personaplex.py  NVIDIA PersonaPlex on stock moshi: every depformer layout conversion, the gated repo,
                    preset voices
    tiny.py         models built here with random, seeded weights (tiny, moshi-7b-random, tiny-personaplex)
    checkpoint.py   the checkpoint-folder reader and the one writer (fixtures, the toy's base, export)

This module only re-exports the names callers use.
"""

from agent.models import personaplex
from agent.models.checkpoint import CheckpointFiles, read_checkpoint, write_checkpoint, write_checkpoint_folder
from agent.models.kinds import (
    KINDS,
    TELUGU_TINY_DIR,
    TELUGU_TINY_NOTE,
    ModelKind,
    default_model_name,
    kind_of,
    load_mimi,
    load_model,
)
from agent.models.kyutai import checkpoint_info, load_checkpoint
from agent.models.loaded import TEXT_PADDING_ID, LoadedModel, resolve_device, resolve_dtype
from agent.models.tiny import (
    build_random_7b,
    build_tiny,
    tiny_lm_kwargs,
    tiny_mimi_config,
    tiny_personaplex_folder,
    tiny_tokenizer_path,
    voice_conditioners,
)

__all__ = [
    "KINDS", "TELUGU_TINY_DIR", "TELUGU_TINY_NOTE", "TEXT_PADDING_ID", "CheckpointFiles", "LoadedModel", "ModelKind",
    "build_random_7b", "build_tiny", "checkpoint_info", "default_model_name", "kind_of", "load_checkpoint",
    "load_mimi", "load_model", "personaplex", "read_checkpoint", "resolve_device", "resolve_dtype",
    "tiny_lm_kwargs", "tiny_mimi_config", "tiny_personaplex_folder", "tiny_tokenizer_path", "voice_conditioners",
    "write_checkpoint", "write_checkpoint_folder",
]
