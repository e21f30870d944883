"""Released checkpoints in Kyutai's layout: a Hugging Face repo id (`kyutai/moshiko-pytorch-bf16`), NVIDIA's
gated PersonaPlex repo, or a local folder. The LM, Mimi and tokenizer load through moshi's own
`CheckpointInfo`, exactly as moshi's server loads them; only weights with PersonaPlex's 16-step
depformer take agent/models/personaplex.py's path.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from agent.errors import ModelLoadError
from agent.models import personaplex
from agent.models.checkpoint import RANDOM_BASES, read_checkpoint
from agent.models.loaded import LoadedModel

# Moshi 7B's geometry and Mimi's config, as moshi's loader falls back to them (shared: copy before changing)
KYUTAI_LM_KWARGS: dict = loaders._lm_kwargs
KYUTAI_MIMI_CONFIG: dict = loaders._mimi_config
_LOAD_ERRORS = (RuntimeError, KeyError, OSError, ValueError)


def checkpoint_info(spec: str) -> loaders.CheckpointInfo:
    """Resolve a repo id or a local folder to Kyutai's CheckpointInfo (files downloaded or found)."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return read_checkpoint(folder)
    if folder.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(f"--model {spec!r} is neither a folder nor a Hugging Face repo id (owner/name)")
    try:
        return loaders.CheckpointInfo.from_hf_repo(spec)
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise ModelLoadError(
            f"Could not download {spec!r} from Hugging Face ({type(exc).__name__}: {exc}).\n"
            "  - Check the network and the repo id, or log in with `huggingface-cli login` for gated repos.\n"
            "  - Weights are cached under $HF_HOME (default ~/.cache/huggingface) or $HF_HUB_CACHE;\n"
            "    set HF_HUB_OFFLINE=1 to use only what is already cached.\n"
            "  - Or pass a local folder (--model /path/to/checkpoint), or run without weights: --model tiny"
        ) from exc


def _load_lm(info: loaders.CheckpointInfo, device: torch.device, dtype: torch.dtype) -> tuple[LMModel, bool]:
    """The LM, and whether its weights are PersonaPlex's (a depformer with more steps than the
    config's `dep_q`: the user-codebook steps are dropped, see agent/models/personaplex.py)."""
    config = copy.deepcopy(info.lm_config or KYUTAI_LM_KWARGS)
    if personaplex.checkpoint_steps(info) <= config["dep_q"]:
        return info.get_moshi(device=device, dtype=dtype), False
    return personaplex.load_lm(info, config, device, dtype), True


def _load_error(spec: str, exc: Exception) -> ModelLoadError:
    if "condition_provider" in str(exc) or "fuser" in str(exc):
        return ModelLoadError(f"{spec}: the conditioner weights (speaker/emotion) do not match config.json's "
                              f"'conditioners': {str(exc)[:600]}")
    return ModelLoadError(f"{spec}: the weights do not match the config: {str(exc)[:600]}")


def load_checkpoint(spec: str, device: torch.device, dtype: torch.dtype,
                    context: int | None = None) -> LoadedModel:
    info = personaplex.hub_checkpoint_info(spec) if spec == personaplex.PERSONAPLEX_REPO else checkpoint_info(spec)
    personaplex.agent_steps_only(info)
    if context is not None:
        info.lm_config = dict(info.lm_config or KYUTAI_LM_KWARGS, context=context)
    # Before loading: moshi's loader writes runtime entries (device, output_dim) into the nested dicts.
    lm_config = copy.deepcopy(info.lm_config or KYUTAI_LM_KWARGS)
    try:
        mimi = info.get_mimi(device=device)
        lm, is_personaplex = _load_lm(info, device, dtype)
        tokenizer = info.get_text_tokenizer()
    except _LOAD_ERRORS as exc:
        raise _load_error(spec, exc) from exc
    if tokenizer.vocab_size() < lm.text_card:
        raise ModelLoadError(f"{spec}: tokenizer has {tokenizer.vocab_size()} pieces, the LM expects {lm.text_card}")
    model_id = info.model_id or {}
    return LoadedModel(Path(spec).name if Path(spec).is_dir() else spec, mimi, lm, tokenizer, device, dtype,
                       # fine-tuned from a random model (tests, pipeline dry runs): still noise
                       random_weights=model_id.get("base") in RANDOM_BASES, lm_gen_config=dict(info.lm_gen_config),
                       lm_config=lm_config,
                       mimi_config=info.mimi_config, tokenizer_path=Path(info.tokenizer),
                       takes_prompts=is_personaplex, lm_weights=Path(info.moshi_weights),
                       preset_voices=(personaplex.preset_voices(Path(info.moshi_weights).parent)
                                      if is_personaplex else {}),
                       weights_licence=model_id.get("weights_licence"))


def checkpoint_mimi(spec: str, device: torch.device) -> tuple[MimiModel, dict | None]:
    """Only the codec of a checkpoint (and its config, None for Kyutai's default)."""
    info = checkpoint_info(spec)
    try:
        return info.get_mimi(device=device), info.mimi_config
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"{spec}: cannot load its Mimi codec: {str(exc)[:600]}") from exc
