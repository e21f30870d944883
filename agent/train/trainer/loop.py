"""The training loop: build the model, read the shards, resume from the last checkpoint, step, evaluate,
checkpoint (see the package docstring for what trains and how runs resume)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from agent.errors import ModelLoadError
from agent.models import resolve_dtype
from agent.train.common import Report, UsageError, atomic_write_json, read_manifest
from agent.train.records import TokenRecord
from agent.train.tokens import INFO as TOKENS_INFO
from agent.train.tokens import file_digest
from agent.train.trainer.checkpoints import (
    CHECKPOINTS,
    STATE_FILE,
    latest_checkpoint,
    load_trainable,
    optimizer_state,
    restore_state,
    save_checkpoint,
)
from agent.train.trainer.config import TrainConfig
from agent.train.trainer.distributed import Dist, fsdp_shard, init_distributed
from agent.train.trainer.loss import LossModule
from agent.train.trainer.metrics import Console, MetricsLog
from agent.train.trainer.model import TrainModel, build_train_model, trainable_state
from agent.train.trainer.prompting import build_prompts, prompt_builder
from agent.train.trainer.windows import Windows, split_records

RUN_FILE = "run.json"


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


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """moshi-finetune's schedule: OneCycleLR, a `pct_start` warm-up then cosine down. OneCycleLR divides by
    its warm-up length minus one step, so the warm-up is at least 2 steps, and a run of under 3 steps keeps
    a constant rate."""
    total = config.max_steps
    if total < 3:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    pct = min(max(config.pct_start, 2 / total), (total - 1) / total)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total, pct_start=pct)


def run_train(config: TrainConfig) -> TrainResult:
    group, device = init_distributed(config.device)
    try:
        return _run(config, group, device)
    finally:
        if group.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _open_run_folder(config: TrainConfig, group: Dist) -> Path:
    """The run folder, emptied with --force; refused when it holds a run with other settings."""
    out = Path(config.out)
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
    return out


def build_windows(config: TrainConfig, model: TrainModel, info: dict, records: list[TokenRecord]
                  ) -> tuple[list[TokenRecord], list[TokenRecord], Windows, Windows | None]:
    """(train records, eval records, their windows); UsageError when there is nothing to train on."""
    frames = max(1, int(round(config.duration_sec * info["frame_rate"])))
    if frames > model.lm.context:
        raise UsageError(f"duration_sec {config.duration_sec} is {frames} frames, beyond the model's context "
                         f"of {model.lm.context}")
    train_records, eval_records = split_records(records, config.eval_fraction)
    if not train_records:
        raise UsageError(f"{config.inp} has no token shards to train on")
    root = Path(config.inp).parent
    prompts = _prompts(config, model, info, train_records + eval_records, frames) if config.prompts else None
    if prompts is not None:
        train_records = [r for r in train_records if r.id in prompts]
        eval_records = [r for r in eval_records if r.id in prompts]
        if not train_records:
            raise UsageError(f"{config.inp}: no dialogue has a usable prompt (see the notes)")
    train_data = Windows(train_records, root, frames, config.data_seed, model.lm.zero_token_id, prompts)
    eval_data = (Windows(eval_records, root, frames, config.data_seed, model.lm.zero_token_id, prompts)
                 if eval_records else None)
    return train_records, eval_records, train_data, eval_data


def _prompts(config: TrainConfig, model: TrainModel, info: dict, records: list[TokenRecord], frames: int
             ) -> dict[str, torch.Tensor]:
    """Every dialogue's prompt codes, built once; dialogues with an unusable prompt are left out (a note each)."""
    builder = prompt_builder(model, info["num_codebooks"])
    prompts, refused = build_prompts(builder, records, Path(config.inp).parent)
    for record_id, reason in refused.items():
        model.notes.append(f"prompts: {record_id} left out: {reason}")
    longest = max((p.shape[1] for p in prompts.values()), default=0)
    if longest + frames > model.lm.context:
        raise UsageError(f"a prompt of {longest} frames plus a window of {frames} exceeds the model's context of "
                         f"{model.lm.context}: lower duration_sec")
    with_voice = sum(1 for r in records if r.id in prompts and r.voice_prompt)
    with_text = sum(1 for r in records if r.id in prompts and r.persona)
    model.notes.append(f"prompts: {len(prompts)} dialogues ({with_voice} with a voice clip, {with_text} with a "
                       f"persona), prompt frames mean {np.mean([p.shape[1] for p in prompts.values()] or [0]):.0f}, "
                       f"max {longest}; loss masked over them")
    return prompts


@dataclass
class _Setup:
    """What a run trains on: the model and its data, read and checked before the first step."""

    out: Path
    model: TrainModel
    dtype: torch.dtype
    report: Console
    train_data: Windows
    eval_data: Windows | None


@dataclass
class _Optim:
    """The model as the steps see it (wrapped for several processes), its optimizer and where it resumes."""

    module: LossModule
    wrapped: torch.nn.Module
    sharded: bool
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int
    resume: Path | None


def _setup(config: TrainConfig, group: Dist, device: torch.device) -> _Setup:
    if config.batch_size % group.world:
        raise UsageError(f"batch_size {config.batch_size} must be a multiple of the {group.world} processes")
    out = _open_run_folder(config, group)
    try:
        dtype = resolve_dtype(config.dtype, device)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from exc
    if config.prompts and config.add_conditioners:
        raise UsageError("prompts: a prompted run conditions the voice and persona by prompts, not LUT conditioners; "
                         "pass --no-add-conditioners (assets/train/personaplex_prompted.json sets it)")
    torch.manual_seed(config.data_seed)
    model = build_train_model(config, device, dtype)
    info = _check_tokens(config, model)
    report = Console(config.quiet or not group.main)
    manifest_report = Report("train", out, quiet=config.quiet or not group.main)
    records = read_manifest(Path(config.inp), TokenRecord, manifest_report)
    train_records, eval_records, train_data, eval_data = build_windows(config, model, info, records)
    for note in model.notes:
        report.say(f"note: {note}")
    if group.main:
        atomic_write_json(out / RUN_FILE, {"fingerprint": config.fingerprint(), "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "lm_config": model.lm_config, "tokenizer": str(model.tokenizer_path), "base": config.model,
            "mimi_config": model.base.mimi_config, "train_dialogues": len(train_records),
            "eval_dialogues": len(eval_records), "windows": len(train_data), "processes": group.world,
            "trainable_params": sum(p.numel() for p in model.lm.parameters() if p.requires_grad),
            "licences": sorted({lic for r in records for lic in r.licences}), "notes": model.notes})
    return _Setup(out, model, dtype, report, train_data, eval_data)


def _optimiser(config: TrainConfig, setup: _Setup, group: Dist, device: torch.device) -> _Optim:
    """The loss module wrapped for the processes, AdamW and its schedule, resumed from the last checkpoint."""
    model, state = setup.model, None
    resume = latest_checkpoint(setup.out)
    if resume is not None:  # weights go in before sharding; optimizer state after the optimizer exists
        load_trainable(model.lm, resume)
        state = torch.load(resume / STATE_FILE, map_location="cpu", weights_only=False)
    module = LossModule(model.lm, config)
    wrapped: torch.nn.Module = module
    sharded = group.world > 1 and config.fsdp
    if sharded:
        fsdp_shard(module, device, group.world, setup.dtype)
    elif group.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, config)
    step = 0
    if state is not None:
        step = restore_state(state, module, optimizer, scheduler, sharded)
        setup.report.say(f"resuming from {resume} (step {step})")
    return _Optim(module, wrapped, sharded, params, optimizer, scheduler, step, resume)


def _train_step(config: TrainConfig, setup: _Setup, opt: _Optim, group: Dist, device: torch.device,
                autocast) -> tuple[dict[str, torch.Tensor], float, torch.Tensor, int]:
    """One optimizer step on this process's share of batch `opt.step` (then counted): the losses averaged
    over the processes, the learning rate it used, the gradient norm and the conversation frames seen."""
    per_rank = config.batch_size // group.world
    first = opt.step * config.batch_size + group.rank * per_rank
    batch = setup.train_data.batch(list(range(first, first + per_rank)))
    codes = batch.codes.to(device)
    with autocast:
        losses = opt.wrapped(codes, batch.conditions, batch.prompt_frames.to(device))
    loss, values = pooled_loss(losses, group.world)
    opt.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(opt.params, config.max_norm)
    opt.optimizer.step()
    lr = opt.scheduler.get_last_lr()[0]
    opt.scheduler.step()
    opt.step += 1
    frames = codes.shape[0] * codes.shape[-1] - int(batch.prompt_frames.sum())
    return values, lr, grad_norm, frames


def pooled_loss(losses: dict[str, torch.Tensor], world: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to backpropagate, and the losses to report, as one process computes them over the whole
    batch: each process's weighted sums divided by the weights of every process, not a mean of per-process
    means (which differ whenever processes hold different amounts of padding or text). DDP and FSDP average
    gradients over the processes, hence the factor `world`."""
    if world == 1:
        return losses["loss"], {k: losses[k].detach() for k in ("loss", "text_loss", "audio_loss")}
    weights = torch.stack([losses["text_weight"], losses["audio_weight"]]).detach().float()
    dist.all_reduce(weights)
    weights = weights.clamp_min(1e-6)
    text, audio = losses["text_sum"] / weights[0], losses["audio_sum"] / weights[1]
    reported = torch.stack([text.detach(), audio.detach()])
    dist.all_reduce(reported)
    return (text + audio) * world, {"loss": reported.sum(), "text_loss": reported[0], "audio_loss": reported[1]}


def _run(config: TrainConfig, group: Dist, device: torch.device) -> TrainResult:
    setup = _setup(config, group, device)
    opt = _optimiser(config, setup, group, device)
    report, step = setup.report, opt.step
    log = MetricsLog(setup.out, group.main, step)
    autocast = (torch.autocast(device_type="cuda", dtype=setup.dtype)
                if device.type == "cuda" and setup.dtype != torch.float32 else nullcontext())
    per_rank = config.batch_size // group.world
    last_loss = eval_loss = None
    checkpoint = opt.resume
    started, frames_done = time.monotonic(), 0
    bar = tqdm(total=config.max_steps, initial=step, desc="train", unit="step", file=sys.stderr,
               disable=report.quiet, dynamic_ncols=True, mininterval=0.5)
    while opt.step < config.max_steps:
        values, lr, grad_norm, frames = _train_step(config, setup, opt, group, device, autocast)
        step = opt.step
        bar.update(1)
        frames_done += frames
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
        if setup.eval_data is not None and (step % config.eval_every == 0 or step == config.max_steps):
            eval_loss = evaluate(opt.wrapped, setup.eval_data, config, per_rank, group, device, autocast)
            log.write({"step": step, "split": "eval", "loss": f"{eval_loss:.6f}"})
            report.say(f"step {step} eval loss {eval_loss:.4f}")
        if step % config.checkpoint_every == 0 or step == config.max_steps or step == config.stop_after:
            # Every process takes part in gathering sharded tensors; the main one writes.
            weights = trainable_state(setup.model.lm)
            optim_state = optimizer_state(opt.module, opt.optimizer, opt.sharded)
            if group.main:
                checkpoint = save_checkpoint(setup.out, step, weights, optim_state, opt.scheduler,
                                             config.keep_checkpoints)
            group.barrier()
        if config.stop_after is not None and step >= config.stop_after:
            break
    bar.close()
    return TrainResult(setup.out, step, checkpoint, last_loss, eval_loss, setup.model.notes)


def evaluate(wrapped: torch.nn.Module, data: Windows, config: TrainConfig, per_rank: int, group: Dist,
             device: torch.device, autocast) -> float:
    """The loss over the first eval_batches batches of held-out windows (the same ones every time), pooled
    over windows and processes as pooled_loss pools a training batch."""
    total = torch.zeros(4, device=device)  # text sum, text weight, audio sum, audio weight
    n = min(len(data), config.eval_batches * config.batch_size)
    with torch.no_grad(), autocast:
        for first in range(0, n, config.batch_size):
            ks = [k for k in range(first + group.rank * per_rank, first + (group.rank + 1) * per_rank) if k < n]
            if ks:
                batch = data.batch(ks)
                out = wrapped(batch.codes.to(device), batch.conditions, batch.prompt_frames.to(device))
                total += torch.stack([out[k].float() for k in ("text_sum", "text_weight", "audio_sum",
                                                                 "audio_weight")])
    if group.world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp_min(1e-6) + total[2] / total[3].clamp_min(1e-6))

