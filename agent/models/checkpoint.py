"""Checkpoint folders in Kyutai's layout: the one reader and the one writer.

    config.json         LMModel kwargs + moshi_name/mimi_name/tokenizer_name (+ mimi_config_name,
                        model_id: provenance, lm_gen_config, and LoRA entries when there is an adapter)
    model.safetensors   the LM          lora.safetensors   an unfused LoRA adapter, if any
    mimi.safetensors    the codec       mimi_config.json   its config, when it is not Kyutai's default
    tokenizer.model     the text tokenizer (SentencePiece)
    voices/             preset voices (PersonaPlex-style models)

Both `load_model` and `moshi.run_inference` read such a folder. The test fixtures, the toy's base and
`python -m agent.train export` all write it through `write_checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from moshi.models import loaders
from safetensors.torch import save_file

from agent.config import RANDOM_7B_MODEL, TINY_MODEL, TINY_PERSONAPLEX_MODEL
from agent.errors import ModelLoadError
from agent.models.loaded import LoadedModel

CONFIG_FILE = "config.json"
LM_FILE = "model.safetensors"
LORA_FILE = "lora.safetensors"
MIMI_FILE = "mimi.safetensors"
MIMI_CONFIG_FILE = "mimi_config.json"
TOKENIZER_FILE = "tokenizer.model"
VOICES_DIR = "voices"
# A folder whose model_id names one of these as its base was trained from random weights: still noise.
RANDOM_BASES = (TINY_MODEL, TINY_PERSONAPLEX_MODEL, RANDOM_7B_MODEL)


@dataclass
class CheckpointFiles:
    """What one checkpoint folder holds."""

    lm: dict[str, torch.Tensor]
    mimi: dict[str, torch.Tensor]
    tokenizer: Path  # a SentencePiece model file, copied in
    lm_config: dict  # LMModel kwargs (and LoRA entries naming LORA_FILE when `lora` is set)
    mimi_config: dict | None = None  # None: Kyutai's default Mimi
    model_id: dict | None = None  # provenance: base, weights_licence, ...
    lm_gen_config: dict | None = None  # sampling defaults, as Kyutai's config.json carries them
    lora: dict[str, torch.Tensor] | None = None
    voices: dict[str, Path] = field(default_factory=dict)  # preset voices, copied to voices/


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def write_checkpoint(folder: Path, files: CheckpointFiles) -> Path:
    """Write `files` into `folder` (created if missing). config.json comes last, so a folder that has
    one is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    if files.voices:
        (folder / VOICES_DIR).mkdir(exist_ok=True)
    for path in files.voices.values():
        shutil.copyfile(path, folder / VOICES_DIR / path.name)
    _save(files.lm, folder / LM_FILE)
    if files.lora is not None:
        _save(files.lora, folder / LORA_FILE)
    _save(files.mimi, folder / MIMI_FILE)
    shutil.copyfile(files.tokenizer, folder / TOKENIZER_FILE)
    config = dict(files.lm_config, moshi_name=LM_FILE, mimi_name=MIMI_FILE, tokenizer_name=TOKENIZER_FILE)
    if files.model_id:
        config["model_id"] = files.model_id
    if files.mimi_config is not None:
        (folder / MIMI_CONFIG_FILE).write_text(json.dumps(files.mimi_config, indent=1))
        config["mimi_config_name"] = MIMI_CONFIG_FILE
    if files.lm_gen_config:
        config["lm_gen_config"] = files.lm_gen_config
    (folder / CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder


@contextlib.contextmanager
def staged_folder(folder: Path, replace: bool) -> Iterator[Path]:
    """A fresh hidden sibling to write into, renamed to `folder` in one step at the end, so no reader
    sees a half-written folder. `replace`: an existing `folder` is removed first; otherwise an existing
    non-empty one (another process wrote it first) is kept and the staged copy discarded."""
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:
        if replace:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def read_checkpoint(folder: Path) -> loaders.CheckpointInfo:
    """A local folder as Kyutai's CheckpointInfo: config.json's file names (Kyutai's defaults when it
    has none), each checked to exist."""
    config_path = folder / CONFIG_FILE
    raw = json.loads(config_path.read_text()) if config_path.exists() else {}

    def local(key: str, default: str | None) -> Path | None:
        name = raw.get(key, default)
        if name is None:
            return None
        name = str(name).removeprefix("file://")
        path = Path(name) if Path(name).is_absolute() else folder / name
        if not path.exists():
            raise ModelLoadError(f"{folder}: {key} names {name!r}, which is not in the folder")
        return path

    return loaders.CheckpointInfo.from_hf_repo(
        str(folder),
        moshi_weights=local("moshi_name", loaders.MOSHI_NAME),
        mimi_weights=local("mimi_name", loaders.MIMI_NAME),
        tokenizer=local("tokenizer_name", loaders.TEXT_TOKENIZER_NAME),
        config_path=config_path if config_path.exists() else None,
        mimi_config_path=local("mimi_config_name", None),
        lora_weights=local("lora_name", None),
    )


def write_checkpoint_folder(model: LoadedModel, folder: Path, lm_kwargs: dict, mimi_config: dict | None,
                            tokenizer_file: Path, model_id: dict | None = None) -> Path:
    """A loaded model's LM and Mimi as a checkpoint folder. `model_id`: provenance (e.g. "weights_licence")."""
    return write_checkpoint(folder, CheckpointFiles(lm=model.lm.state_dict(), mimi=model.mimi.state_dict(),
                                                    tokenizer=Path(tokenizer_file), lm_config=lm_kwargs,
                                                    mimi_config=mimi_config, model_id=model_id))
