"""The training run's settings (one dataclass) and which of them define what a run computes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.config import ModelConfig

# Settings that do not change what a run computes: they may differ when a run is resumed.
NOT_IN_FINGERPRINT = ("out", "force", "quiet", "log_every", "keep_checkpoints", "stop_after")


@dataclass
class TrainConfig:
    inp: Path  # tokens' manifest.jsonl
    out: Path  # the run folder
    model: str = "tiny"  # the base: a repo id, a Kyutai folder (e.g. an earlier stage's export), or "tiny"
    tokenizer: Path | None = None  # stage 5's; must be the one the shards were made with
    seed: int = ModelConfig.seed  # the tiny base model's weights
    device: str | None = None
    dtype: str | None = None  # bf16 on CUDA, fp32 on CPU
    # what trains
    lora_rank: int = 64  # 0: no LoRA, every weight of the LM trains (full fine-tuning)
    lora_scaling: float = 2.0
    train_text_embeddings: bool = True
    # a new tokenizer's text layers: "resize" keeps the rows of pieces the old vocabulary has (and composes
    # the rest from them); "reinit" draws them afresh, as Human-1 did (tokenizer.reinit_text_vocab)
    text_vocab_init: str = "resize"
    add_conditioners: bool = True  # give a base without speaker/emotion conditioners new ones
    train_conditioners: bool = True
    use_conditions: bool = True  # feed each shard's speaker/emotion; False: train unconditioned
    conditioner_dim: int = 128
    # PersonaPlex: each dialogue's voice + text prompt (agent/engine/prompts.py's sequence) before every window,
    # loss masked over it, so the fine-tune still takes prompts; needs a base that takes them
    prompts: bool = False
    # data and steps
    duration_sec: float = 10.0  # window length (<= the model's context)
    batch_size: int = 4  # windows per optimizer step, over all processes
    max_steps: int = 1000
    data_seed: int = 0
    eval_fraction: float = 0.1  # of dialogues, chosen by a hash of their id
    eval_every: int = 100
    eval_batches: int = 4
    # optimisation: moshi-finetune's defaults
    lr: float = 1e-4
    weight_decay: float = 0.1
    pct_start: float = 0.05
    max_norm: float = 1.0
    first_codebook_weight_multiplier: float = 100.0
    text_padding_weight: float = 0.5
    gradient_checkpointing: bool = True
    fsdp: bool = False
    # bookkeeping
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    stop_after: int | None = None  # end this process after this step (a planned pause; resume later)
    force: bool = False
    quiet: bool = False

    def fingerprint(self) -> str:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
                if k not in NOT_IN_FINGERPRINT}
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

