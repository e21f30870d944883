"""Model loading: turn `--model` into Mimi + Moshi LM + text tokenizer.

`--model` is one of
- a Hugging Face repo id in Kyutai's layout (`kyutai/moshiko-pytorch-bf16`, `kyutai/moshika-pytorch-bf16`);
- a local folder with the same files (config.json, safetensors, sentencepiece model);
- `tiny`: a small Moshi and Mimi with random, seeded weights, built from the `moshi` package's own
  classes so the real streaming code runs on a CPU (the voice is noise: nothing is trained);
- `moshi-7b-random`: the full 7B architecture and full Mimi with random weights, for benchmarks;
- NVIDIA's PersonaPlex (`nvidia/personaplex-7b-v1`, gated) or a local folder with its weights: told
  apart by its 16-step depformer, loaded on stock moshi by agent/models/personaplex.py, with its preset voices;
- `tiny-personaplex`: a tiny random checkpoint in PersonaPlex's layout (16-step depformer, preset
  voices), written to a folder and loaded through the same code as the real one (tests, benchmarks).
- `telugu-tiny`: the toy trained on this CPU on synthetic espeak-ng Telugu dialogues
  (`python -m agent.train telugu-tiny`), shipped in assets/models/telugu-tiny/.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from safetensors.torch import save_file

from agent import ASSETS
from agent.config import (
    DEFAULT_GPU_MODEL,
    RANDOM_7B_MODEL,
    TELUGU_TINY_MODEL,
    TINY_MODEL,
    TINY_PERSONAPLEX_MODEL,
    ModelConfig,
)
from agent.errors import ModelLoadError
from agent.models import personaplex
from agent.voices import EMOTION, SPEAKER, load_catalogue

log = logging.getLogger(__name__)

TOKENIZER_CORPUS = ASSETS / "telugu_sentences.txt"
TEXT_PADDING_ID = 3  # Moshi's "no word" token; 0 is its end-of-padding marker
TELUGU_TINY_DIR = ASSETS / "models" / TELUGU_TINY_MODEL
TELUGU_TINY_NOTE = ("a toy trained on this project's CPU on synthetic espeak-ng Telugu dialogues, not a Telugu Moshi: "
                    "a muffled robotic voice whose words are not intelligible, a few dozen sentences, "
                    "no understanding. It exists to show that the training "
                    "pipeline teaches full-duplex behaviour (silent while you speak, answering when you stop) and "
                    "to give the CPU demo a voice that speaks.")




@dataclass
class LoadedModel:
    """Everything the engine needs from a checkpoint."""

    name: str
    mimi: MimiModel
    lm: LMModel
    tokenizer: sentencepiece.SentencePieceProcessor | None
    device: torch.device
    dtype: torch.dtype
    random_weights: bool  # True: no trained weights are loaded, the voice is random noise
    lm_gen_config: dict = field(default_factory=dict)
    # How it was built, so training can rebuild and export it in Kyutai's folder layout:
    lm_config: dict = field(default_factory=dict)  # LMModel kwargs as config.json holds them
    mimi_config: dict | None = None  # None: Kyutai's default Mimi
    tokenizer_path: Path | None = None
    # PersonaPlex-style models take a voice prompt and a text prompt per call (agent/engine/prompts.py)
    takes_prompts: bool = False
    preset_voices: dict[str, Path] = field(default_factory=dict)  # name -> voices/NAME.pt|.wav
    lm_weights: Path | None = None  # the LM file as loaded (export puts PersonaPlex's dropped steps back from it)
    toy_note: str | None = None  # set for toy models trained here: what the page must say about them
    weights_licence: str | None = None  # as the folder's config.json (model_id) states it; None: not stated

    @property
    def description(self) -> str:
        params = sum(p.numel() for p in self.lm.parameters())
        kind = "RANDOM WEIGHTS (not a trained speech model: the voice is noise)" if self.random_weights else \
            "TOY trained on synthetic espeak-ng speech" if self.toy_note else "trained"
        return (f"{self.name} · {params / 1e6:.1f} M LM params · "
                f"{self.device.type} {str(self.dtype).removeprefix('torch.')} · {kind}")

    @property
    def condition_values(self) -> dict[str, list[str]]:
        """Categorical conditioners the LM really has (e.g. speaker, emotion), with their trained values."""
        provider = self.lm.condition_provider
        out: dict[str, list[str]] = {}
        for name, conditioner in (provider.conditioners.items() if provider is not None else []):
            values = getattr(getattr(conditioner, "tokenizer", None), "possible_values", None)
            if values is not None:
                out[name] = list(values)
        return out

    def decode_text(self, token: int) -> str:
        """The text piece for a sampled text token, '' for padding; '▁' becomes a space."""
        if token in (0, TEXT_PADDING_ID) or token < 0 or self.tokenizer is None:
            return ""
        if token >= self.tokenizer.vocab_size() or self.tokenizer.is_control(token) or self.tokenizer.is_unknown(token):
            return ""
        return self.tokenizer.id_to_piece(token).replace("▁", " ")


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown --dtype {dtype!r}: use bf16, fp16 or fp32") from None


def default_model_name(device: torch.device) -> str:
    return DEFAULT_GPU_MODEL if device.type == "cuda" else TINY_MODEL


# ---------------------------------------------------------------------------------------------
# Tiny and random-weight models
# ---------------------------------------------------------------------------------------------

def tiny_tokenizer_path(cache_dir: Path | None = None) -> Path:
    """A small SentencePiece model trained on the Telugu sentences in assets/ (cached by content hash)."""
    corpus = TOKENIZER_CORPUS.read_bytes()
    digest = hashlib.sha256(corpus).hexdigest()[:12]
    cache_dir = cache_dir or Path(os.environ.get("AGENT_CACHE", Path.home() / ".cache" / "telugu-voice-agent"))
    path = cache_dir / f"tiny-spm-{digest}.model"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_prefix = path.with_suffix(f".tmp{os.getpid()}")
        sentencepiece.SentencePieceTrainer.train(
            input=str(TOKENIZER_CORPUS), model_prefix=str(tmp_prefix), vocab_size=400,
            hard_vocab_limit=False, character_coverage=1.0, model_type="unigram",
            unk_id=0, bos_id=1, eos_id=2, pad_id=TEXT_PADDING_ID, num_threads=1,
            minloglevel=2, seed_sentencepiece_size=10000, shuffle_input_sentence=False,
        )
        os.replace(f"{tmp_prefix}.model", path)
        Path(f"{tmp_prefix}.vocab").unlink(missing_ok=True)
    return path


def tiny_mimi_config() -> dict:
    """Full Mimi framing (24 kHz, 12.5 Hz, same strides) with narrow layers."""
    cfg = copy.deepcopy(loaders._mimi_config)
    cfg["seanet"].update(dimension=64, n_filters=8)
    cfg["quantizer"].update(dimension=32, n_q=8, bins=256, input_dimension=64, output_dimension=64)
    cfg["transformer"].update(d_model=64, num_heads=2, num_layers=1, dim_feedforward=128,
                              input_dimension=64, output_dimensions=[64], context=50)
    return cfg


def voice_conditioners(lut_dim: int = 16) -> dict:
    """LM config entries for categorical speaker and emotion conditioning, summed into the input
    embedding, with the catalogue's ids as the trained values."""
    catalogue = load_catalogue()
    values = {SPEAKER: [v.id for v in catalogue.voices], EMOTION: [e.id for e in catalogue.emotions]}
    return {
        "conditioners": {name: {"type": "lut", "lut": {"n_bins": len(ids), "dim": lut_dim, "tokenizer": "noop",
                                                        "possible_values": ids}}
                         for name, ids in values.items()},
        "fuser": {"sum": [SPEAKER, EMOTION]},
    }


def tiny_lm_kwargs(text_card: int, card: int = 256, conditioned: bool = True) -> dict:
    """Moshi's real geometry (8 agent + 8 user codebooks, same delays) at a tiny width, with the
    speaker/emotion conditioners our fine-tuned models carry."""
    kw = copy.deepcopy(loaders._lm_kwargs)
    kw.update(dim=64, num_heads=4, num_layers=2, hidden_scale=2.0, context=250, text_card=text_card,
              card=card, depformer_dim=32, depformer_dim_feedforward=64, depformer_num_heads=2,
              depformer_num_layers=1)
    if conditioned:
        kw.update(voice_conditioners())
    return kw


def _seeded(seed: int):
    torch.manual_seed(seed)


def _varied_audio(n_frames: int, seed: int) -> torch.Tensor:
    """Deterministic audio whose tone, level and noise change every frame."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames * 1920) / 24_000
    level = np.repeat(rng.uniform(0.05, 0.8, n_frames), 1920)
    freq = np.repeat(rng.uniform(80, 3000, n_frames), 1920)
    x = np.clip(level * (np.sin(2 * np.pi * freq * t) + 0.5 * rng.standard_normal(t.size)), -1, 1)
    return torch.from_numpy(x.astype(np.float32))[None, None]


@functools.cache
def _fitted_codebooks(seed: int) -> dict[str, torch.Tensor]:
    """Mimi's codebooks are filled by k-means during training; untrained they are all zero, so every
    input would encode to code 0 and the model could not hear its caller. Fit them once with moshi's
    own k-means initialisation on the encoder's latents of varied audio."""
    with torch.random.fork_rng():  # leaves the caller's RNG alone, cached or not
        mimi = loaders.get_mimi(None, tiny_mimi_config(), device="cpu", num_codebooks=8)
        torch.manual_seed(seed)
        mimi.load_state_dict(_random_mimi_state(seed))
        quantizer = mimi.quantizer
        with torch.no_grad():
            latent = mimi._encode_to_unquantized_latent(_varied_audio(400, seed=99))
            for rvq in (quantizer.rvq_first, quantizer.rvq_rest):
                rvq.q_dropout = False
            quantizer.train()
            for _ in range(len(quantizer.rvq_rest.vq.layers) + 1):  # each pass initialises one more level
                quantizer(latent, mimi.frame_rate)
            quantizer.eval()
    return {k: v.clone() for k, v in quantizer.state_dict().items()}


@functools.cache
def _random_mimi_state(seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        _seeded(seed)
        mimi = loaders.get_mimi(None, tiny_mimi_config(), device="cpu", num_codebooks=8)
    return {k: v.clone() for k, v in mimi.state_dict().items()}


def _tiny_mimi(device: torch.device, seed: int) -> MimiModel:
    """The tiny Mimi: random weights drawn from `seed`, codebooks fitted by k-means (see above).
    It draws from the global RNG as building it always did, so the LM built next keeps its weights."""
    mimi = loaders.get_mimi(None, tiny_mimi_config(), device=device, num_codebooks=8)
    mimi.load_state_dict(_random_mimi_state(seed))
    mimi.quantizer.load_state_dict(_fitted_codebooks(seed))
    return mimi


def build_tiny(device: torch.device, dtype: torch.dtype, seed: int = 42424242,
               context: int | None = None) -> LoadedModel:
    tokenizer = sentencepiece.SentencePieceProcessor(str(tiny_tokenizer_path()))
    lm_kwargs = tiny_lm_kwargs(text_card=tokenizer.vocab_size())
    if context is not None:
        lm_kwargs["context"] = context
    _seeded(seed)
    mimi = _tiny_mimi(device, seed)
    lm = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(lm_kwargs), device=device, dtype=dtype)
    return LoadedModel(TINY_MODEL, mimi, lm, tokenizer, device, dtype, random_weights=True,
                       lm_config=lm_kwargs, mimi_config=tiny_mimi_config(), tokenizer_path=tiny_tokenizer_path())


def build_random_7b(device: torch.device, dtype: torch.dtype, seed: int = 42424242,
                    context: int | None = None) -> LoadedModel:
    """The full Moshi 7B architecture (plus our speaker/emotion conditioners) with random weights:
    for speed and memory figures only."""
    lm_kwargs = copy.deepcopy(loaders._lm_kwargs) | voice_conditioners(lut_dim=128)
    if context is not None:
        lm_kwargs["context"] = context
    _seeded(seed)
    mimi = loaders.get_mimi(None, copy.deepcopy(loaders._mimi_config), device=device, num_codebooks=8)
    lm = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(lm_kwargs), device=device, dtype=dtype)
    return LoadedModel(RANDOM_7B_MODEL, mimi, lm, None, device, dtype, random_weights=True, lm_config=lm_kwargs)


TINY_PRESET_VOICES = {"NATF0": (220.0, 1), "NATF1": (260.0, 2), "NATM0": (110.0, 3), "NATM1": (130.0, 4)}
TINY_PRESET_SECONDS = 1.2


def tiny_personaplex_folder(seed: int = ModelConfig.seed, cache_dir: Path | None = None) -> Path:
    """A tiny checkpoint in PersonaPlex's layout, written once (cached by seed): Kyutai's folder
    layout with `dep_q = 8` in config.json, weights from moshi's own classes with a **16-step**
    depformer saved in the stacked form (`self_attn.in_proj_weight`), and preset voices as WAVs
    under voices/ (PersonaPlex's names; tones, not people). Loading it runs the real PersonaPlex code."""
    cache_dir = cache_dir or Path(os.environ.get("AGENT_CACHE", Path.home() / ".cache" / "telugu-voice-agent"))
    folder = cache_dir / f"tiny-personaplex-v2-{seed}"
    if (folder / "config.json").exists():
        return folder
    tokenizer_file = tiny_tokenizer_path(cache_dir)
    text_card = sentencepiece.SentencePieceProcessor(str(tokenizer_file)).vocab_size()
    # a longer context than `tiny`'s, so English personas (many pieces in the Telugu tokenizer) fit
    config = dict(tiny_lm_kwargs(text_card=text_card, conditioned=False), context=1000)
    with torch.random.fork_rng():
        _seeded(seed)
        mimi = _tiny_mimi(torch.device("cpu"), seed)
        lm16 = loaders.get_moshi_lm(None, lm_kwargs=dict(copy.deepcopy(config), dep_q=16, depformer_context=16),
                                    device="cpu", dtype=torch.float32)
    state = _stack_depformer_projections(lm16.state_dict())
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, tmp / "model.safetensors")
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, tmp / "mimi.safetensors")
    (tmp / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    (tmp / "mimi_config.json").write_text(json.dumps(tiny_mimi_config(), indent=1))
    (tmp / "config.json").write_text(json.dumps(dict(config, moshi_name="model.safetensors",
                                                     mimi_name="mimi.safetensors",
                                                     tokenizer_name="tokenizer.model",
                                                     mimi_config_name="mimi_config.json",
                                                     model_id={"base": TINY_MODEL}), indent=1))
    (tmp / "voices").mkdir(exist_ok=True)
    t = np.arange(int(TINY_PRESET_SECONDS * 24_000)) / 24_000
    for name, (pitch, voice_seed) in TINY_PRESET_VOICES.items():
        rng = np.random.default_rng(voice_seed)
        wave = sum(np.sin(2 * np.pi * pitch * h * t) / h for h in (1, 2, 3)) * (0.3 + 0.2 * np.sin(2 * np.pi * 3 * t))
        wave = wave + 0.02 * rng.standard_normal(t.size)
        import soundfile  # light, and only needed here
        soundfile.write(str(tmp / "voices" / f"{name}.wav"), wave.astype(np.float32), 24_000)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process wrote it first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _stack_depformer_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The depformer's per-step attention projections in the stacked form PersonaPlex's files use."""
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, value in state.items():
        m = re.match(r"^(depformer\.layers\.\d+\.self_attn)\.(in|out)_projs\.(\d+)\.weight$", key)
        if m:
            name = f"{m.group(1)}.in_proj_weight" if m.group(2) == "in" else f"{m.group(1)}.out_proj.weight"
            stacks.setdefault(name, []).append((int(m.group(3)), value))
        else:
            out[key] = value.contiguous()
    for name, parts in stacks.items():
        out[name] = torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])]).contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Kyutai checkpoints: Hugging Face repos and local folders
# ---------------------------------------------------------------------------------------------

def checkpoint_info(spec: str) -> loaders.CheckpointInfo:
    """Resolve a repo id or a local folder to Kyutai's CheckpointInfo (files downloaded or found)."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return _local_checkpoint_info(folder)
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


def _local_checkpoint_info(folder: Path) -> loaders.CheckpointInfo:
    config_path = folder / "config.json"
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


def _personaplex_info(repo: str) -> loaders.CheckpointInfo:
    """The gated hub repo's files, with Moshiko's LM geometry (its config.json is not an LM config)."""
    try:
        files = personaplex.hub_files(repo)
    except personaplex.PersonaPlexError as exc:
        raise ModelLoadError(str(exc)) from exc
    info = loaders.CheckpointInfo(moshi_weights=files["lm"], mimi_weights=files["mimi"], tokenizer=files["tokenizer"],
                                  lm_config=None)
    if "voices" in files:
        personaplex.preset_voices(files["voices"].parent)  # unpack beside the archive once
    return info


def _depformer_steps(info: loaders.CheckpointInfo) -> int:
    weights = Path(info.moshi_weights)
    return personaplex.depformer_steps(personaplex.weight_keys(weights)) if weights.suffix == ".safetensors" else 0


def _agent_steps_only(info: loaders.CheckpointInfo) -> None:
    """A config written for PersonaPlex's fork (`dep_q = n_q`: the user's codebooks predicted too)
    would make stock moshi expect no user codebooks: keep the agent's half (the weights are trimmed)."""
    config = info.lm_config
    if config and config.get("dep_q") == config.get("n_q") and _depformer_steps(info) == config["dep_q"]:
        log.info("%s: the depformer predicts the user's codebooks too; loading the agent's %d steps",
                 info.moshi_weights, config["n_q"] // 2)
        info.lm_config = dict(config, dep_q=config["n_q"] // 2)


def _load_lm(info: loaders.CheckpointInfo, device: torch.device, dtype: torch.dtype) -> tuple[LMModel, bool]:
    """The LM, and whether its weights are PersonaPlex's (a depformer with more steps than the
    config's `dep_q`: the user-codebook steps are dropped, see agent/models/personaplex.py)."""
    config = copy.deepcopy(info.lm_config or loaders._lm_kwargs)
    if _depformer_steps(info) <= config["dep_q"]:
        return info.get_moshi(device=device, dtype=dtype), False
    if info.lora_weights is not None:
        raise ModelLoadError("LoRA adapters on a PersonaPlex checkpoint are not supported; fuse them first")
    state = personaplex.load_lm_state(Path(info.moshi_weights), config["dep_q"], device)
    for key, value in state.items():  # as moshi's loader: conditioners stay float32
        if value.dtype.is_floating_point and not key.startswith(("condition_provider.", "fuser.")):
            state[key] = value.to(dtype)
    lm = loaders.get_moshi_lm(None, lm_kwargs=config, device=torch.device("meta"), dtype=dtype)
    lm.load_state_dict(state, assign=True)
    return lm.eval(), True


def load_checkpoint(spec: str, device: torch.device, dtype: torch.dtype,
                    context: int | None = None) -> LoadedModel:
    info = _personaplex_info(spec) if spec == personaplex.PERSONAPLEX_REPO else checkpoint_info(spec)
    _agent_steps_only(info)
    if context is not None:
        info.lm_config = dict(info.lm_config or loaders._lm_kwargs, context=context)
    # Before loading: moshi's loader writes runtime entries (device, output_dim) into the nested dicts.
    lm_config = copy.deepcopy(info.lm_config or loaders._lm_kwargs)
    try:
        mimi = info.get_mimi(device=device)
        lm, is_personaplex = _load_lm(info, device, dtype)
        tokenizer = info.get_text_tokenizer()
    except (RuntimeError, KeyError, OSError, ValueError) as exc:
        if "condition_provider" in str(exc) or "fuser" in str(exc):
            raise ModelLoadError(
                f"{spec}: the conditioner weights (speaker/emotion) do not match config.json's 'conditioners': "
                f"{str(exc)[:600]}") from exc
        raise ModelLoadError(f"{spec}: the weights do not match the config: {str(exc)[:600]}") from exc
    if tokenizer.vocab_size() < lm.text_card:
        raise ModelLoadError(f"{spec}: tokenizer has {tokenizer.vocab_size()} pieces, the LM expects {lm.text_card}")
    # A model fine-tuned from `tiny` (tests, pipeline dry runs) started from random weights: still noise.
    from_random = (info.model_id or {}).get("base") in (TINY_MODEL, TINY_PERSONAPLEX_MODEL, RANDOM_7B_MODEL)
    return LoadedModel(Path(spec).name if Path(spec).is_dir() else spec, mimi, lm, tokenizer, device, dtype,
                       random_weights=from_random, lm_gen_config=dict(info.lm_gen_config),
                       lm_config=lm_config,
                       mimi_config=info.mimi_config, tokenizer_path=Path(info.tokenizer),
                       takes_prompts=is_personaplex, lm_weights=Path(info.moshi_weights),
                       preset_voices=(personaplex.preset_voices(Path(info.moshi_weights).parent)
                                      if is_personaplex else {}),
                       weights_licence=(info.model_id or {}).get("weights_licence"))


def load_mimi(name: str, device: torch.device, seed: int = ModelConfig.seed) -> tuple[MimiModel, dict | None]:
    """Only the codec of `--model` (and its config, None for Kyutai's default): what encoding audio
    to training tokens needs, without loading a 7B LM."""
    if name in (TINY_MODEL, TINY_PERSONAPLEX_MODEL):  # tiny-personaplex's folder holds this same Mimi
        return _tiny_mimi(device, seed), tiny_mimi_config()
    if name == RANDOM_7B_MODEL:
        return build_random_7b(device, torch.float32, seed).mimi, None
    if name == TELUGU_TINY_MODEL:
        name = str(_telugu_tiny_dir())
    info = checkpoint_info(name)
    try:
        return info.get_mimi(device=device), info.mimi_config
    except (RuntimeError, KeyError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{name}: cannot load its Mimi codec: {str(exc)[:600]}") from exc


def _telugu_tiny_dir() -> Path:
    if not (TELUGU_TINY_DIR / "config.json").is_file():
        raise ModelLoadError(f"--model {TELUGU_TINY_MODEL}: no trained weights in {TELUGU_TINY_DIR}. Train them on a "
                             "CPU (about an hour): python -m agent.train telugu-tiny --work /tmp/telugu-tiny")
    return TELUGU_TINY_DIR


def load_model(config: ModelConfig) -> LoadedModel:
    """The one entry point: `--model`, `--device`, `--dtype` in, a ready model out."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    name = config.model or default_model_name(device)
    if name == TINY_MODEL:
        model = build_tiny(device, dtype, config.seed, config.context)
    elif name == TINY_PERSONAPLEX_MODEL:
        folder = tiny_personaplex_folder(seed=config.seed)
        model = load_checkpoint(str(folder), device, dtype, config.context)
        model.name = TINY_PERSONAPLEX_MODEL
    elif name == RANDOM_7B_MODEL:
        model = build_random_7b(device, dtype, config.seed, config.context)
    elif name == TELUGU_TINY_MODEL:
        model = load_checkpoint(str(_telugu_tiny_dir()), device, dtype, config.context)
        model.name, model.toy_note = TELUGU_TINY_MODEL, TELUGU_TINY_NOTE
    else:
        model = load_checkpoint(name, device, dtype, config.context)
    if model.random_weights:
        log.warning("Model %s has RANDOM weights (or was fine-tuned from them): not a trained speech model, "
                    "so the agent's voice is noise.",
                    model.name)
    log.info("Loaded %s", model.description)
    return model


def write_checkpoint_folder(model: LoadedModel, folder: Path, lm_kwargs: dict, mimi_config: dict | None,
                            tokenizer_file: Path, model_id: dict | None = None) -> Path:
    """Save a model in Kyutai's folder layout (config.json + safetensors + tokenizer) so
    `load_model` and `moshi.run_inference` both read it. `model_id`: provenance (e.g. "weights_licence")."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.lm.state_dict().items()}, folder / "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.mimi.state_dict().items()}, folder / "mimi.safetensors")
    (folder / "tokenizer.model").write_bytes(Path(tokenizer_file).read_bytes())
    config = dict(lm_kwargs, moshi_name="model.safetensors", mimi_name="mimi.safetensors",
                  tokenizer_name="tokenizer.model")
    if model_id:
        config["model_id"] = model_id
    if mimi_config is not None:
        (folder / "mimi_config.json").write_text(json.dumps(mimi_config, indent=1))
        config["mimi_config_name"] = "mimi_config.json"
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder
