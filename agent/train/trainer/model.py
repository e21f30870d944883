"""The model to train: the base with the new text vocabulary, the speaker/emotion conditioners and a LoRA,
its trainable parameters marked (everything else stays the base model's weights)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece
import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.modules.lora import LoRALinear, replace_all_linear_with_lora, replace_lora_with_linear
from moshi.modules.transformer import StreamingTransformer

from agent.config import ModelConfig
from agent.errors import ModelLoadError
from agent.models import LoadedModel, load_model, voice_conditioners
from agent.train.common import UsageError
from agent.train.tokens import file_digest
from agent.train.trainer.config import TrainConfig

LORA_KEYS = ("lora", "lora_rank", "lora_scaling", "lora_name")


@dataclass
class TrainModel:
    lm: LMModel
    lm_config: dict  # config.json entries of the trained architecture (without LoRA keys)
    base: LoadedModel  # mimi, tokenizer paths etc. of the base
    tokenizer_path: Path
    notes: list[str] = field(default_factory=list)


def _fuse_existing_lora(lm: LMModel) -> bool:
    """A base that is itself an unfused export: fold its LoRA in, so a new LoRA wraps plain Linears."""
    if not any(isinstance(m, LoRALinear) for m in lm.modules()):
        return False
    replace_lora_with_linear(lm)
    return True


def _add_conditioners(lm: LMModel, lm_config: dict, dim: int, device: torch.device, dtype: torch.dtype) -> LMModel:
    conditioned = copy.deepcopy(lm_config) | voice_conditioners(lut_dim=dim)
    new = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(conditioned), device=device, dtype=dtype)
    result = new.load_state_dict(lm.state_dict(), strict=False)
    stray = [k for k in result.missing_keys if not k.startswith(("condition_provider.", "fuser."))]
    if stray or result.unexpected_keys:
        raise UsageError(f"adding conditioners changed other weights: missing {stray[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    for conditioner in new.condition_provider.conditioners.values():
        torch.nn.init.zeros_(conditioner.output_proj.weight)  # starts as the base model, learns from there
    lm_config.clear()
    lm_config.update(conditioned)
    return new


def build_train_model(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> TrainModel:
    """The base model with the vocabulary, conditioners and LoRA the config asks for, trainable parts set."""
    try:
        base = load_model(ModelConfig(model=config.model, device=str(device), dtype=str(dtype).removeprefix("torch."),
                                      seed=config.seed))
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from exc
    lm, lm_config, notes = base.lm, {k: v for k, v in base.lm_config.items() if k not in LORA_KEYS}, []
    if _fuse_existing_lora(lm):
        notes.append("the base carried an unfused LoRA: fused before adding a new one")
    if config.add_conditioners and lm.condition_provider is None:
        lm = _add_conditioners(lm, lm_config, config.conditioner_dim, device, dtype)
        notes.append("added speaker/emotion conditioners (zero-initialised) to a base without them")
    tokenizer_path = Path(config.tokenizer) if config.tokenizer else base.tokenizer_path
    if tokenizer_path is None or not tokenizer_path.is_file():
        raise UsageError(f"no tokenizer: {config.model} has none, pass --tokenizer (stage 5's tokenizer.model)")
    if base.tokenizer_path is None or file_digest(tokenizer_path) != file_digest(base.tokenizer_path):
        notes.append(_swap_text_vocab(lm, base, tokenizer_path, config))
        lm_config["text_card"] = lm.text_card
    elif config.text_vocab_init == "reinit":
        raise UsageError("text_vocab_init 'reinit' re-initialises the text layers for a new tokenizer, but "
                         f"{tokenizer_path} is the base's own: pass stage 5's --tokenizer")
    lm.train()
    for module in lm.modules():
        if isinstance(module, StreamingTransformer):
            module.checkpointing = config.gradient_checkpointing
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.data_seed)
        if config.lora_rank > 0:  # 0: full fine-tuning, every weight of the LM trains
            replace_all_linear_with_lora(lm, config.lora_rank, config.lora_scaling)
        for module in lm.modules():
            if isinstance(module, LoRALinear):
                torch.nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
                torch.nn.init.zeros_(module.lora_B.weight)
    for name, param in lm.named_parameters():
        param.requires_grad = is_trainable(name, config, lm)
        if param.requires_grad:
            param.data = param.data.float()  # fp32 master weights; the frozen base stays in `dtype`
    return TrainModel(lm, lm_config, base, tokenizer_path, notes)


def _swap_text_vocab(lm: LMModel, base: LoadedModel, tokenizer_path: Path, config: TrainConfig) -> str:
    """The text layers sized for the run's tokenizer (resized or re-initialised); returns the run's note."""
    from agent.train.tokenizer import reinit_text_vocab, resize_text_vocab
    new_sp = sentencepiece.SentencePieceProcessor(str(tokenizer_path))
    if config.text_vocab_init == "reinit":
        if not config.train_text_embeddings:
            raise UsageError("text_vocab_init 'reinit' leaves the text layers random: set train_text_embeddings")
        stats = reinit_text_vocab(lm, new_sp, seed=config.data_seed)
        return (f"text vocabulary {stats['old_card']} -> {stats['new_card']} pieces: text_emb, depformer_text_emb "
                "and text_linear re-initialised (Human-1)")
    if config.text_vocab_init != "resize":
        raise UsageError(f"text_vocab_init must be 'resize' or 'reinit', not {config.text_vocab_init!r}")
    stats = resize_text_vocab(lm, base.tokenizer, new_sp)
    return (f"text vocabulary {stats.get('old_card')} -> {stats.get('new_card')} pieces "
            f"({stats.get('copied')} rows copied, {stats.get('composed')} composed from old pieces)")


def is_trainable(name: str, config: TrainConfig, lm: LMModel) -> bool:
    if config.lora_rank == 0 and not name.startswith("condition_provider."):
        return True  # full fine-tuning
    if ".lora_A." in name or ".lora_B." in name:
        return not name.startswith("condition_provider.") or config.train_conditioners
    if config.train_text_embeddings and name.split(".")[0] in ("text_emb", "depformer_text_emb", "text_linear"):
        return True
    return config.train_conditioners and name.startswith("condition_provider.")


def trainable_state(lm: LMModel) -> dict[str, torch.Tensor]:
    """Full fp32 copies of the trainable parameters (gathered from every process when sharded by FSDP)."""
    from torch.distributed.tensor import DTensor
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().contiguous()
            for n, p in lm.named_parameters() if p.requires_grad}

