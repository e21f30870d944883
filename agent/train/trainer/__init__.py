"""Stage 7, train: LoRA fine-tuning of Moshi on the token shards (stage 6) -> <out>/checkpoints/step-N/.

What trains (everything else stays the base model's weights):
- moshi's own LoRA (`moshi.modules.lora.replace_all_linear_with_lora`, every Linear, as Kyutai's loader
  rebuilds it from config.json's "lora"/"lora_rank"/"lora_scaling"); A Kaiming-uniform, B zero, so step 0
  is exactly the base model;
- the text vocabulary layers (`text_emb`, `depformer_text_emb`, `text_linear`) when `train_text_embeddings`:
  a new Telugu tokenizer (stage 5) resizes them first (agent.train.tokenizer.resize_text_vocab);
- the speaker/emotion LUT conditioners (assets/catalogue.json), added to a base without them with a zero
  output projection (again: step 0 is the base model), fed through `ConditionAttributes` and
  `condition_provider.prepare_and_provide`, the path the engine uses at inference.

Loss: moshi-finetune's: cross-entropy on the text stream (padding and end-of-padding weighted by
`text_padding_weight`) plus on the agent's 8 codebooks (the first, semantic one weighted by
`first_codebook_weight_multiplier`); the user's codebooks are input only. With `prompts` (a PersonaPlex
base), each window follows its dialogue's voice + text prompt (trainer/prompting.py), which is input only too.

Runs are exact to resume: the data order is a pure function of (data_seed, step), and a checkpoint holds
the trainable weights, the optimizer and scheduler state and the RNG state; a killed run restarted with
the same command continues from its last checkpoint and ends where an uninterrupted run ends.
Several processes: `torchrun --nproc_per_node N -m agent.train train ...` (DDP; gloo on CPU, NCCL on
GPUs; `fsdp: true` shards the 7B across GPUs instead). Logs: <out>/metrics.csv, and TensorBoard event
files when the `tensorboard` package is installed.
"""

from importlib import import_module

# name -> the module that defines it; imported on first use, so reading TrainConfig loads no torch.
_EXPORTS = {
    "CHECKPOINTS": "checkpoints", "STATE_FILE": "checkpoints", "TRAINABLE_FILE": "checkpoints",
    "checkpoint_dirs": "checkpoints", "latest_checkpoint": "checkpoints", "load_trainable": "checkpoints",
    "TrainConfig": "config",
    "RUN_FILE": "loop", "TrainResult": "loop", "run_train": "loop",
    "LossModule": "loss", "masked_cross_entropy": "loss",
    "METRICS_FILE": "metrics",
    "LORA_KEYS": "model", "TrainModel": "model", "build_train_model": "model", "is_trainable": "model",
    "trainable_state": "model",
    "Batch": "windows", "Windows": "windows", "split_records": "windows",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
