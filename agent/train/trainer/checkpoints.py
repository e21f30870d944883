"""Checkpoints: <out>/checkpoints/step-N/ holds the trainable weights (safetensors) and the optimizer,
scheduler and RNG state; written to a hidden folder and renamed, so a kill leaves whole checkpoints only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from moshi.models.lm import LMModel
from safetensors.torch import load_file, save_file

from agent.train.common import UsageError

CHECKPOINTS = "checkpoints"
TRAINABLE_FILE, STATE_FILE = "trainable.safetensors", "state.pt"


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    found = []
    for path in (out / CHECKPOINTS).glob("step-*"):
        if path.is_dir() and (path / STATE_FILE).is_file() and (path / TRAINABLE_FILE).is_file():
            found.append((int(path.name.removeprefix("step-")), path))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1][1] if dirs else None


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    if not sharded:
        return optimizer.state_dict()  # DDP replicas are identical: the main process's state is the state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))


def save_checkpoint(out: Path, step: int, weights: dict[str, torch.Tensor], optim_state: dict, scheduler,
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



def restore_state(state: dict, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                  sharded: bool) -> int:
    """Optimizer, scheduler and RNG state of a checkpoint (after the optimizer exists); returns its step."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(module, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])
