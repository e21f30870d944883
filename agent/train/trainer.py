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
`first_codebook_weight_multiplier`); the user's codebooks are input only.

Runs are exact to resume: the data order is a pure function of (data_seed, step), and a checkpoint holds
the trainable weights, the optimizer and scheduler state and the RNG state; a killed run restarted with
the same command continues from its last checkpoint and ends where an uninterrupted run ends.
Several processes: `torchrun --nproc_per_node N -m agent.train train ...` (DDP; gloo on CPU, NCCL on
GPUs; `fsdp: true` shards the 7B across GPUs instead). Logs: <out>/metrics.csv, and TensorBoard event
files when the `tensorboard` package is installed.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece
import torch
import torch.distributed as dist
import torch.nn.functional as F
from moshi.conditioners import ConditionAttributes
from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.modules.lora import LoRALinear, replace_all_linear_with_lora, replace_lora_with_linear
from moshi.modules.transformer import StreamingTransformer
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from agent.config import ModelConfig
from agent.models import LoadedModel, ModelLoadError, load_model, resolve_dtype, voice_conditioners
from agent.train.common import Report, UsageError, atomic_write_json, read_manifest
from agent.train.records import TokenRecord
from agent.train.tokens import INFO as TOKENS_INFO
from agent.train.tokens import file_digest

RUN_FILE, METRICS_FILE, CHECKPOINTS = "run.json", "metrics.csv", "checkpoints"
TRAINABLE_FILE, STATE_FILE = "trainable.safetensors", "state.pt"
LORA_KEYS = ("lora", "lora_rank", "lora_scaling", "lora_name")
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
    lora_rank: int = 64
    lora_scaling: float = 2.0
    train_text_embeddings: bool = True
    add_conditioners: bool = True  # give a base without speaker/emotion conditioners new ones
    train_conditioners: bool = True
    use_conditions: bool = True  # feed each shard's speaker/emotion; False: train unconditioned
    conditioner_dim: int = 128
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


# ---------------------------------------------------------------------------------------------
# The model to train
# ---------------------------------------------------------------------------------------------

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
        from agent.train.tokenizer import resize_text_vocab
        new_sp = sentencepiece.SentencePieceProcessor(str(tokenizer_path))
        stats = resize_text_vocab(lm, base.tokenizer, new_sp)
        lm_config["text_card"] = lm.text_card
        notes.append(f"text vocabulary {stats.get('old_card')} -> {stats.get('new_card')} pieces "
                     f"({stats.get('copied')} rows copied, {stats.get('composed')} composed from old pieces)")
    lm.train()
    for module in lm.modules():
        if isinstance(module, StreamingTransformer):
            module.checkpointing = config.gradient_checkpointing
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.data_seed)
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


def is_trainable(name: str, config: TrainConfig, lm: LMModel) -> bool:
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


# ---------------------------------------------------------------------------------------------
# Data: fixed-length windows of the token shards, in an order that depends only on (seed, step)
# ---------------------------------------------------------------------------------------------

class Windows:
    """Every `frames`-long window of the shards of one split; sample k of the run is a pure function of k."""

    def __init__(self, records: list[TokenRecord], root: Path, frames: int, seed: int, zero_token: int):
        self.records, self.root, self.frames, self.seed, self.zero = records, root, frames, seed, zero_token
        self.index = [(r, start) for r in range(len(records)) for start in range(0, records[r].frames, frames)]
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, r: int) -> dict[str, torch.Tensor]:
        if r not in self._cache:
            self._cache[r] = load_file(str(self.root / self.records[r].path))
        return self._cache[r]

    def sample(self, k: int) -> int:
        epoch, position = divmod(k, len(self.index))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.index)))
        return int(self._order[1][position])

    def window(self, i: int) -> tuple[torch.Tensor, dict[str, str | None]]:
        """codes [1 + 2K, frames] (text, agent, user), past-the-end frames = zero_token (no loss, no input)."""
        r, start = self.index[i]
        shard = self._shard(r)
        text, audio = shard["text"][start:start + self.frames], shard["audio"][:, start:start + self.frames]
        codes = torch.full((1 + audio.shape[0], self.frames), self.zero, dtype=torch.long)
        codes[0, :text.shape[0]] = text.long()
        codes[1:, :audio.shape[1]] = audio.long()
        return codes, self.records[r].conditions

    def batch(self, ks: list[int]) -> tuple[torch.Tensor, list[dict[str, str | None]]]:
        items = [self.window(self.sample(k)) for k in ks]
        return torch.stack([c for c, _ in items]), [cond for _, cond in items]


def split_records(records: list[TokenRecord], eval_fraction: float) -> tuple[list[TokenRecord], list[TokenRecord]]:
    def held_out(record: TokenRecord) -> bool:
        return int(hashlib.sha1(record.id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < eval_fraction
    train = [r for r in records if not held_out(r)]
    evals = [r for r in records if held_out(r)]
    if not train:  # a tiny corpus: train on everything rather than nothing
        train, evals = records, []
    return train, evals


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """moshi-finetune's compute_loss_with_mask: a weighted mean over valid positions."""
    target = torch.where(mask, target, torch.zeros_like(target))
    weights = weights * mask.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), reduction="none")
    loss = torch.where(weights.reshape(-1) > 0, loss * weights.reshape(-1), torch.zeros_like(loss))
    return loss.sum() / weights.sum().clamp_min(1e-6)


class LossModule(torch.nn.Module):
    """LM + conditioning + loss in one forward, so DDP/FSDP see every trainable parameter in their forward."""

    def __init__(self, lm: LMModel, config: TrainConfig):
        super().__init__()
        self.lm, self.config = lm, config

    def forward(self, codes: torch.Tensor, conditions: list[dict[str, str | None]]) -> dict[str, torch.Tensor]:
        lm, config = self.lm, self.config
        condition_tensors = None
        if lm.condition_provider is not None:
            names = list(lm.condition_provider.conditioners)
            attrs = [ConditionAttributes(text={n: (c.get(n) if config.use_conditions else None) for n in names})
                     for c in conditions]
            condition_tensors = lm.condition_provider.prepare_and_provide(attrs)
        out = lm(codes, condition_tensors)
        text_target = codes[:, :lm.audio_offset]
        text_weights = torch.ones_like(text_target, dtype=torch.float32)
        padding = (text_target == lm.text_padding_token_id) | (text_target == lm.end_of_text_padding_id)
        text_weights[padding] = config.text_padding_weight
        text_loss = masked_cross_entropy(out.text_logits, text_target, out.text_mask, text_weights)
        audio_target = codes[:, lm.audio_offset:lm.audio_offset + lm.dep_q]
        audio_weights = torch.ones_like(audio_target, dtype=torch.float32)
        audio_weights[:, 0] *= config.first_codebook_weight_multiplier
        audio_loss = masked_cross_entropy(out.logits, audio_target, out.mask, audio_weights)
        return {"loss": text_loss + audio_loss, "text_loss": text_loss.detach(), "audio_loss": audio_loss.detach()}


# ---------------------------------------------------------------------------------------------
# Processes, checkpoints, logs
# ---------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device_pref: str | None) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device_pref not in ("cpu",)
    if world == 1:
        device = torch.device(device_pref or ("cuda" if use_cuda else "cpu"))
        return Dist(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank), device


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    found = []
    for path in (out / CHECKPOINTS).glob("step-*"):
        if path.is_dir() and (path / STATE_FILE).is_file() and (path / TRAINABLE_FILE).is_file():
            found.append((int(path.name.removeprefix("step-")), path))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1][1] if dirs else None


class MetricsLog:
    """metrics.csv (always) and TensorBoard (when installed), written by the main process."""

    FIELDS = ["step", "split", "loss", "text_loss", "audio_loss", "lr", "grad_norm", "frames_per_s", "seconds"]

    def __init__(self, out: Path, enabled: bool, resume_step: int):
        self.path, self.enabled, self.writer = out / METRICS_FILE, enabled, None
        if not enabled:
            return
        rows = []
        if self.path.is_file() and resume_step > 0:  # drop rows past the checkpoint: they will be redone
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            pass  # CSV only

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})
        if self.writer is not None:
            for key in ("loss", "text_loss", "audio_loss", "lr", "grad_norm"):
                if row.get(key) not in (None, ""):
                    self.writer.add_scalar(f"{row['split']}/{key}", float(row[key]), int(row["step"]))
            self.writer.flush()


def _optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    if not sharded:
        return optimizer.state_dict()  # DDP replicas are identical: the main process's state is the state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))


def _save_checkpoint(out: Path, step: int, weights: dict[str, torch.Tensor], optim_state: dict, scheduler,
                     keep: int) -> Path:
    final = out / CHECKPOINTS / f"step-{step:06d}"
    tmp = out / CHECKPOINTS / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / TRAINABLE_FILE))
    torch.save({"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a kill leaves either the old checkpoint set or the new one, never half of one
    for _, old in checkpoint_dirs(out)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainable(lm: LMModel, path: Path) -> None:
    state = load_file(str(path / TRAINABLE_FILE))
    params = dict(lm.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise UsageError(f"checkpoint {path} does not fit this model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))


def _check_tokens(config: TrainConfig, model: TrainModel) -> dict:
    info_path = Path(config.inp).parent / TOKENS_INFO
    if not info_path.is_file():
        raise UsageError(f"{info_path} is missing: run the tokens stage first")
    info = json.loads(info_path.read_text())
    if info["tokenizer_sha"] != file_digest(model.tokenizer_path):
        raise UsageError(f"the shards were made with tokenizer {info['tokenizer']}, this run uses "
                         f"{model.tokenizer_path}: pass the same --tokenizer to both stages")
    if info["num_codebooks"] < model.lm.dep_q:
        raise UsageError(f"shards hold {info['num_codebooks']} codebooks per side, the model needs {model.lm.dep_q}")
    if info["model"] != config.model and not Path(config.model).is_dir():
        model.notes.append(f"the shards were encoded with {info['model']}'s Mimi, training {config.model}")
    return info


@dataclass
class TrainResult:
    out: Path
    step: int
    checkpoint: Path | None
    last_loss: float | None
    eval_loss: float | None
    notes: list[str]

    def line(self) -> str:
        loss = "-" if self.last_loss is None else f"{self.last_loss:.4f}"
        ev = "-" if self.eval_loss is None else f"{self.eval_loss:.4f}"
        return f"train: step {self.step}, loss {loss}, eval loss {ev}, checkpoint {self.checkpoint} -> {self.out}"


def run_train(config: TrainConfig) -> TrainResult:
    group, device = init_distributed(config.device)
    try:
        return _run(config, group, device)
    finally:
        if group.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(config: TrainConfig, group: Dist, device: torch.device) -> TrainResult:
    out = Path(config.out)
    if config.batch_size % group.world:
        raise UsageError(f"batch_size {config.batch_size} must be a multiple of the {group.world} processes")
    if group.main:
        if config.force:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
            (out / RUN_FILE).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    group.barrier()
    run_file = out / RUN_FILE
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous.get("fingerprint") != config.fingerprint():
            raise UsageError(f"{out} holds a run with other settings ({previous.get('config')}); "
                             "use another --out, or --force to start over")
    try:
        dtype = resolve_dtype(config.dtype, device)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from exc
    torch.manual_seed(config.data_seed)
    model = build_train_model(config, device, dtype)
    info = _check_tokens(config, model)
    report = Console(config.quiet or not group.main)
    for note in model.notes:
        report.say(f"note: {note}")
    manifest_report = Report("train", out, quiet=config.quiet or not group.main)
    records = read_manifest(Path(config.inp), TokenRecord, manifest_report)
    frames = max(1, int(round(config.duration_sec * info["frame_rate"])))
    if frames > model.lm.context:
        raise UsageError(f"duration_sec {config.duration_sec} is {frames} frames, beyond the model's context "
                         f"of {model.lm.context}")
    train_records, eval_records = split_records(records, config.eval_fraction)
    if not train_records:
        raise UsageError(f"{config.inp} has no token shards to train on")
    root = Path(config.inp).parent
    train_data = Windows(train_records, root, frames, config.data_seed, model.lm.zero_token_id)
    eval_data = Windows(eval_records, root, frames, config.data_seed, model.lm.zero_token_id) if eval_records else None
    if group.main:
        atomic_write_json(run_file, {"fingerprint": config.fingerprint(), "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "lm_config": model.lm_config, "tokenizer": str(model.tokenizer_path), "base": config.model,
            "mimi_config": model.base.mimi_config, "train_dialogues": len(train_records),
            "eval_dialogues": len(eval_records), "windows": len(train_data),
            "trainable_params": sum(p.numel() for p in model.lm.parameters() if p.requires_grad),
            "licences": sorted({lic for r in records for lic in r.licences}), "notes": model.notes})

    step, state = 0, None
    resume = latest_checkpoint(out)
    if resume is not None:  # weights go in before sharding; optimizer state after the optimizer exists
        load_trainable(model.lm, resume)
        state = torch.load(resume / STATE_FILE, map_location="cpu", weights_only=False)
    module = LossModule(model.lm, config)
    wrapped: torch.nn.Module = module
    sharded = group.world > 1 and config.fsdp
    if sharded:
        _fsdp(module, device, group.world, dtype)
    elif group.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.max_steps,
                                                    pct_start=config.pct_start)
    if state is not None:
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(module, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step = int(state["step"])
        report.say(f"resuming from {resume} (step {step})")
    log = MetricsLog(out, group.main, step)
    autocast = (torch.autocast(device_type="cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32
                else nullcontext())
    per_rank = config.batch_size // group.world
    last_loss = eval_loss = None
    checkpoint = resume
    started, frames_done = time.monotonic(), 0
    bar = tqdm(total=config.max_steps, initial=step, desc="train", unit="step", file=sys.stderr,
               disable=report.quiet, dynamic_ncols=True, mininterval=0.5)
    while step < config.max_steps:
        ks = list(range(step * config.batch_size + group.rank * per_rank,
                        step * config.batch_size + (group.rank + 1) * per_rank))
        codes, conditions = train_data.batch(ks)
        codes = codes.to(device)
        with autocast:
            losses = wrapped(codes, conditions)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_norm)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        bar.update(1)
        frames_done += codes.shape[0] * codes.shape[-1]
        values = {k: v.detach() for k, v in losses.items()}
        if group.world > 1:
            for v in values.values():
                dist.all_reduce(v)
                v /= group.world
        last_loss = float(values["loss"])
        if step % config.log_every == 0 or step == config.max_steps or step == 1:
            elapsed = time.monotonic() - started
            log.write({"step": step, "split": "train", "loss": f"{last_loss:.6f}",
                       "text_loss": f"{float(values['text_loss']):.6f}",
                       "audio_loss": f"{float(values['audio_loss']):.6f}", "lr": f"{lr:.3e}",
                       "grad_norm": f"{float(grad_norm):.4f}",
                       "frames_per_s": f"{frames_done * group.world / max(elapsed, 1e-9):.1f}",
                       "seconds": f"{elapsed:.1f}"})
            report.say(f"step {step}/{config.max_steps} loss {last_loss:.4f} (text {float(values['text_loss']):.4f}, "
                       f"audio {float(values['audio_loss']):.4f}) lr {lr:.2e}")
        if eval_data is not None and (step % config.eval_every == 0 or step == config.max_steps):
            eval_loss = evaluate(wrapped, eval_data, config, per_rank, group, device, autocast)
            log.write({"step": step, "split": "eval", "loss": f"{eval_loss:.6f}"})
            report.say(f"step {step} eval loss {eval_loss:.4f}")
        if step % config.checkpoint_every == 0 or step == config.max_steps or step == config.stop_after:
            # Every process takes part in gathering sharded tensors; the main one writes.
            weights, optim_state = trainable_state(model.lm), _optimizer_state(module, optimizer, sharded)
            if group.main:
                checkpoint = _save_checkpoint(out, step, weights, optim_state, scheduler, config.keep_checkpoints)
            group.barrier()
        if config.stop_after is not None and step >= config.stop_after:
            break
    bar.close()
    return TrainResult(out, step, checkpoint, last_loss, eval_loss, model.notes)


def evaluate(wrapped: torch.nn.Module, data: Windows, config: TrainConfig, per_rank: int, group: Dist,
             device: torch.device, autocast) -> float:
    """Mean loss over the first eval_batches batches of held-out windows (the same ones every time)."""
    total = torch.zeros(2, device=device)
    n = min(len(data), config.eval_batches * config.batch_size)
    with torch.no_grad(), autocast:
        for first in range(0, n, config.batch_size):
            ks = [k for k in range(first + group.rank * per_rank, first + (group.rank + 1) * per_rank) if k < n]
            if ks:
                codes, conditions = data.batch(ks)
                total[0] += wrapped(codes.to(device), conditions)["loss"].float() * len(ks)
                total[1] += len(ks)
    if group.world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp_min(1))


def _fsdp(module: torch.nn.Module, device: torch.device, world: int, dtype: torch.dtype) -> None:
    """Shard parameters, gradients and optimizer state over the processes (FSDP2, in place): the 7B's
    frozen bf16 weights fit once per GPU, not once per process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    # One all-gather dtype per group: fp32 trainable and bf16 frozen weights are gathered in `dtype`.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # fully_shard swaps the class of the module it wraps, which moshi's streaming modules do not allow;
    # their LoRA-wrapped Linears (nearly all the weights) are plain modules, so they are the units.
    for linear in [m for m in module.modules() if isinstance(m, LoRALinear)]:
        fully_shard(linear, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


class Console:
    """Progress lines on stderr from the main process only."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def say(self, line: str) -> None:
        if not self.quiet:
            tqdm.write(line, file=sys.stderr)  # above the progress bar, not through it
