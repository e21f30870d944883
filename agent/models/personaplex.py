"""NVIDIA PersonaPlex checkpoints on stock `moshi==0.2.13` (no fork).

PersonaPlex is Moshi 7B fine-tuned to take a voice prompt and a text prompt per conversation
(agent/engine/prompts.py builds them). Its weights differ from Moshiko's in one way that matters here:
its depformer has 16 steps (0-7 the agent's codebooks, 8-15 the user's), while stock moshi's LMGen
needs `dep_q = 8` (with 16 it would expect no user codebooks at all). The depformer is causal over
its steps, so dropping steps 8-15 leaves the agent's codebooks exactly as they were:

- `depformer_in.i`, `linears.i`, `depformer.layers.*.gating.i`, `...self_attn.in_projs.i` /
  `out_projs.i` for i >= 8 and `depformer_emb.i` for i >= 7 are dropped;
- the stacked form (`self_attn.in_proj_weight` [16·3·d, d], `out_proj.weight` [16·d, d]) keeps the
  rows of the first 8 steps.

The number of steps is read from the weights (`depformer_steps`), never from a name, so a local
folder in Kyutai's layout holding PersonaPlex weights is recognised too. Every conversion between the
two layouts lives here: trimming on load (`load_lm`), stacking for the tiny fixture
(`stack_depformer_projections`), restoring the dropped steps on export (`restore_depformer`).

Files of the gated hub repo `nvidia/personaplex-7b-v1` (licence accepted on the hub, `HF_TOKEN`):
the LM, Mimi (same file as Moshiko's), the text tokenizer and `voices.tgz` (preset voices). Its
`config.json` is not Kyutai's LM config (their server never reads it), so Moshiko's geometry is used.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from pathlib import Path

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel

from agent.errors import ModelLoadError
from agent.models.checkpoint import VOICES_DIR

log = logging.getLogger(__name__)

PERSONAPLEX_REPO = "nvidia/personaplex-7b-v1"
LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
VOICES_ARCHIVE = "voices.tgz"
VOICE_SUFFIXES = (".pt", ".wav")

_LAYER = r"depformer\.layers\.\d+"
# Per-step weights of the depformer: (pattern, how many steps the list holds for dep_q steps)
_PER_STEP = [
    (re.compile(r"^depformer_in\.(\d+)\."), 0),
    (re.compile(r"^linears\.(\d+)\."), 0),
    (re.compile(r"^depformer_emb\.(\d+)\."), -1),  # one embedding per step after the first
    (re.compile(rf"^{_LAYER}\.gating\.(\d+)\."), 0),
    (re.compile(rf"^{_LAYER}\.self_attn\.(?:in|out)_projs\.(\d+)\."), 0),
]
# The attention projections per step, as stock moshi names them, and stacked, as PersonaPlex's files hold them
_PER_STEP_PROJ = re.compile(rf"^({_LAYER}\.self_attn)\.(in|out)_projs\.(\d+)\.weight$")
_STACKED = re.compile(rf"^{_LAYER}\.self_attn\.(?:in_proj_weight|out_proj\.weight)$")


def _stacked_name(per_step: re.Match) -> str:
    """The stacked tensor a `_PER_STEP_PROJ` match belongs to."""
    return f"{per_step.group(1)}.{'in_proj_weight' if per_step.group(2) == 'in' else 'out_proj.weight'}"


def depformer_steps(keys) -> int:
    """How many depformer steps a checkpoint's weights carry (its `linears.i` output heads)."""
    steps = [int(m.group(1)) for k in keys if (m := _PER_STEP[1][0].match(k))]
    return max(steps) + 1 if steps else 0


def weight_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, without reading the tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def trim_depformer(state: dict[str, torch.Tensor], dep_q: int) -> dict[str, torch.Tensor]:
    """PersonaPlex's 16-step depformer weights cut to the first `dep_q` steps (the agent's)."""
    steps = depformer_steps(state)
    if steps <= dep_q:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        kept = True
        for pattern, shift in _PER_STEP:
            m = pattern.match(key)
            if m:
                kept = int(m.group(1)) < dep_q + shift
                break
        if not kept:
            continue
        if _STACKED.match(key):
            value = value[: value.shape[0] // steps * dep_q]
        out[key] = value
    return out


def restore_depformer(trained: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `trim_depformer` for a fine-tune: the trained weights (the agent's `dep_q` steps,
    per-step projections as stock moshi names them) with the original checkpoint's dropped user-codebook
    steps put back, in the original's layout (stacked projections stay stacked). The result loads as
    PersonaPlex again, here (trimmed back to exactly the trained model) and in NVIDIA's own code."""
    steps = depformer_steps(original)
    kept = depformer_steps(trained)
    if steps <= kept:
        return dict(trained)
    out: dict[str, torch.Tensor] = {}
    per_step: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in trained.items():
        m = _PER_STEP_PROJ.match(key)
        stacked = _stacked_name(m) if m else None
        if stacked is not None and stacked in original:
            per_step.setdefault(stacked, {})[int(m.group(3))] = value
        else:
            out[key] = value
    for key, value in original.items():
        if _STACKED.match(key):
            rows = value.shape[0] // steps
            head = (torch.cat([per_step[key][i] for i in range(kept)]) if key in per_step
                    else trained[key][: rows * kept])
            out[key] = torch.cat([head, value[rows * kept:].to(head.dtype)])
            continue
        for pattern, shift in _PER_STEP:
            m = pattern.match(key)
            if m and int(m.group(1)) >= kept + shift:
                out[key] = value  # a user-codebook step: training never saw it, so the original's
                break
    return out


def load_lm_state(path: Path, dep_q: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return trim_depformer(load_file(str(path), device=str(device)), dep_q)


def stack_depformer_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The depformer's per-step attention projections in the stacked form PersonaPlex's files use."""
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, value in state.items():
        m = _PER_STEP_PROJ.match(key)
        if m:
            stacks.setdefault(_stacked_name(m), []).append((int(m.group(3)), value))
        else:
            out[key] = value.contiguous()
    for name, parts in stacks.items():
        out[name] = torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])]).contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Loading on stock moshi
# ---------------------------------------------------------------------------------------------

def checkpoint_steps(info: loaders.CheckpointInfo) -> int:
    """The depformer steps a checkpoint's LM file carries (0 when it is not safetensors)."""
    weights = Path(info.moshi_weights)
    return depformer_steps(weight_keys(weights)) if weights.suffix == ".safetensors" else 0


def agent_steps_only(info: loaders.CheckpointInfo) -> None:
    """A config written for PersonaPlex's fork (`dep_q = n_q`: the user's codebooks predicted too)
    would make stock moshi expect no user codebooks: keep the agent's half (the weights are trimmed)."""
    config = info.lm_config
    if config and config.get("dep_q") == config.get("n_q") and checkpoint_steps(info) == config["dep_q"]:
        log.info("%s: the depformer predicts the user's codebooks too; loading the agent's %d steps",
                 info.moshi_weights, config["n_q"] // 2)
        info.lm_config = dict(config, dep_q=config["n_q"] // 2)


def load_lm(info: loaders.CheckpointInfo, config: dict, device: torch.device, dtype: torch.dtype) -> LMModel:
    """PersonaPlex's LM on stock moshi: its weights trimmed to `config`'s `dep_q` steps."""
    if info.lora_weights is not None:
        raise ModelLoadError("LoRA adapters on a PersonaPlex checkpoint are not supported; fuse them first")
    state = load_lm_state(Path(info.moshi_weights), config["dep_q"], device)
    for key, value in state.items():  # as moshi's loader: conditioners stay float32
        if value.dtype.is_floating_point and not key.startswith(("condition_provider.", "fuser.")):
            state[key] = value.to(dtype)
    lm = loaders.get_moshi_lm(None, lm_kwargs=config, device=torch.device("meta"), dtype=dtype)
    lm.load_state_dict(state, assign=True)
    return lm.eval()


# ---------------------------------------------------------------------------------------------
# The hub repo (gated) and its preset voices
# ---------------------------------------------------------------------------------------------

def hub_files(repo: str = PERSONAPLEX_REPO) -> dict[str, Path]:
    """Download (or find in the HF cache) the LM, Mimi, tokenizer and preset voices of the repo."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    token_hint = ("  HF_TOKEN is not set: create a read token at https://huggingface.co/settings/tokens and "
                  "`export HF_TOKEN=...` (or `huggingface-cli login`)."
                  if not (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")) else
                  "  HF_TOKEN is set: check that this token's account has accepted the licence.")
    files = {}
    try:
        for role, name in (("lm", LM_FILE), ("mimi", MIMI_FILE), ("tokenizer", TOKENIZER_FILE)):
            files[role] = Path(hf_hub_download(repo, name))
    except GatedRepoError as exc:
        raise ModelLoadError(
            f"{repo} is gated: accept the NVIDIA Open Model License at https://huggingface.co/{repo} "
            f"while logged in, then retry.\n{token_hint}") from exc
    except RepositoryNotFoundError as exc:  # the hub answers 401 as "not found" to anonymous callers
        raise ModelLoadError(f"{repo}: not found or not allowed ({exc.__class__.__name__}).\n{token_hint}") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"{repo}: not in the Hugging Face cache and the hub cannot be reached (HF_HUB_OFFLINE or no "
            f"network). Download it once with internet, or pass a local folder with --model.") from exc
    try:
        files["voices"] = Path(hf_hub_download(repo, VOICES_ARCHIVE))
    except Exception as exc:  # the model still works with the catalogue's own WAV voices
        log.warning("%s: no preset voices (%s: %s)", repo, type(exc).__name__, exc)
    return files


def hub_checkpoint_info(repo: str = PERSONAPLEX_REPO) -> loaders.CheckpointInfo:
    """The gated hub repo's files, with Moshiko's LM geometry (its config.json is not an LM config)."""
    files = hub_files(repo)
    info = loaders.CheckpointInfo(moshi_weights=files["lm"], mimi_weights=files["mimi"], tokenizer=files["tokenizer"],
                                  lm_config=None)
    if "voices" in files:
        preset_voices(files["voices"].parent)  # unpack beside the archive once
    return info


def preset_voices(folder: Path) -> dict[str, Path]:
    """Preset voices beside a checkpoint: `voices/NAME.pt|.wav`, unpacked from `voices.tgz` once.
    Names are the file stems (`NATF2`); a `.pt` wins over a `.wav` of the same name."""
    folder = Path(folder)
    voices_dir = folder / VOICES_DIR
    archive = folder / VOICES_ARCHIVE
    if not voices_dir.is_dir() and archive.is_file():
        _unpack(archive, folder)
    if not voices_dir.is_dir():
        return {}
    found: dict[str, Path] = {}
    for suffix in reversed(VOICE_SUFFIXES):
        for path in sorted(voices_dir.glob(f"*{suffix}")):
            found[path.stem] = path
    return dict(sorted(found.items()))


def _unpack(archive: Path, into: Path) -> None:
    """Unpack only plain files under voices/ (a hostile archive cannot write elsewhere)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and Path(m.name).parts[:1] == (VOICES_DIR,) and ".." not in Path(m.name).parts]
        tar.extractall(path=into, members=members)
