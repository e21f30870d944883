"""Models built here from moshi's own classes with random, seeded weights: the real streaming code on a
CPU (`tiny`), the full 7B architecture for speed and memory figures (`moshi-7b-random`), and a tiny
folder in PersonaPlex's layout that loads through the real PersonaPlex code (`tiny-personaplex`).
Their voice is noise: nothing is trained.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import sentencepiece
import soundfile
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel

from agent import ASSETS
from agent.config import RANDOM_7B_MODEL, TINY_MODEL, ModelConfig
from agent.models import personaplex
from agent.models.checkpoint import VOICES_DIR, CheckpointFiles, staged_folder, write_checkpoint
from agent.models.kyutai import KYUTAI_LM_KWARGS, KYUTAI_MIMI_CONFIG
from agent.models.loaded import TEXT_PADDING_ID, LoadedModel
from agent.voices import EMOTION, SPEAKER, load_catalogue

TOKENIZER_CORPUS = ASSETS / "telugu_sentences.txt"
TINY_PRESET_VOICES = {"NATF0": (220.0, 1), "NATF1": (260.0, 2), "NATM0": (110.0, 3), "NATM1": (130.0, 4)}
TINY_PRESET_SECONDS = 1.2


def _cache_dir(cache_dir: Path | None) -> Path:
    return cache_dir or Path(os.environ.get("AGENT_CACHE", Path.home() / ".cache" / "telugu-voice-agent"))


def tiny_tokenizer_path(cache_dir: Path | None = None, corpus: Path = TOKENIZER_CORPUS) -> Path:
    """A small SentencePiece model trained on `corpus` (the Telugu sentences in assets/), cached by its
    content hash: trained once per corpus."""
    text = corpus.read_bytes()
    digest = hashlib.sha256(text).hexdigest()[:12]
    path = _cache_dir(cache_dir) / f"tiny-spm-{digest}.model"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_prefix = path.with_suffix(f".tmp{os.getpid()}")
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(tmp_prefix), vocab_size=400,
            hard_vocab_limit=False, character_coverage=1.0, model_type="unigram",
            unk_id=0, bos_id=1, eos_id=2, pad_id=TEXT_PADDING_ID, num_threads=1,
            minloglevel=2, seed_sentencepiece_size=10000, shuffle_input_sentence=False,
        )
        os.replace(f"{tmp_prefix}.model", path)
        Path(f"{tmp_prefix}.vocab").unlink(missing_ok=True)
    return path


def tiny_mimi_config() -> dict:
    """Full Mimi framing (24 kHz, 12.5 Hz, same strides) with narrow layers."""
    cfg = copy.deepcopy(KYUTAI_MIMI_CONFIG)
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
    kw = copy.deepcopy(KYUTAI_LM_KWARGS)
    kw.update(dim=64, num_heads=4, num_layers=2, hidden_scale=2.0, context=250, text_card=text_card,
              card=card, depformer_dim=32, depformer_dim_feedforward=64, depformer_num_heads=2,
              depformer_num_layers=1)
    if conditioned:
        kw.update(voice_conditioners())
    return kw


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
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, tiny_mimi_config(), device="cpu", num_codebooks=8)
    return {k: v.clone() for k, v in mimi.state_dict().items()}


def tiny_mimi(device: torch.device, seed: int) -> MimiModel:
    """The tiny Mimi: random weights drawn from `seed`, codebooks fitted by k-means (see above).
    Constructing it draws from the global RNG, and the LM built next depends on that draw for its
    seeded weights."""
    mimi = loaders.get_mimi(None, tiny_mimi_config(), device=device, num_codebooks=8)
    mimi.load_state_dict(_random_mimi_state(seed))
    mimi.quantizer.load_state_dict(_fitted_codebooks(seed))
    return mimi


def build_tiny(device: torch.device, dtype: torch.dtype, seed: int = ModelConfig.seed,
               context: int | None = None) -> LoadedModel:
    tokenizer = sentencepiece.SentencePieceProcessor(str(tiny_tokenizer_path()))
    lm_kwargs = tiny_lm_kwargs(text_card=tokenizer.vocab_size())
    if context is not None:
        lm_kwargs["context"] = context
    torch.manual_seed(seed)
    mimi = tiny_mimi(device, seed)
    lm = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(lm_kwargs), device=device, dtype=dtype)
    return LoadedModel(TINY_MODEL, mimi, lm, tokenizer, device, dtype, random_weights=True,
                       lm_config=lm_kwargs, mimi_config=tiny_mimi_config(), tokenizer_path=tiny_tokenizer_path())


def build_random_7b(device: torch.device, dtype: torch.dtype, seed: int = ModelConfig.seed,
                    context: int | None = None) -> LoadedModel:
    """The full Moshi 7B architecture (plus our speaker/emotion conditioners) with random weights:
    for speed and memory figures only."""
    lm_kwargs = copy.deepcopy(KYUTAI_LM_KWARGS) | voice_conditioners(lut_dim=128)
    if context is not None:
        lm_kwargs["context"] = context
    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None, copy.deepcopy(KYUTAI_MIMI_CONFIG), device=device, num_codebooks=8)
    lm = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(lm_kwargs), device=device, dtype=dtype)
    return LoadedModel(RANDOM_7B_MODEL, mimi, lm, None, device, dtype, random_weights=True, lm_config=lm_kwargs)


def _write_tone_voices(folder: Path) -> None:
    """Preset voices under PersonaPlex's names: harmonic tones with a little noise, not people."""
    folder.mkdir(exist_ok=True)
    t = np.arange(int(TINY_PRESET_SECONDS * 24_000)) / 24_000
    for name, (pitch, voice_seed) in TINY_PRESET_VOICES.items():
        rng = np.random.default_rng(voice_seed)
        wave = sum(np.sin(2 * np.pi * pitch * h * t) / h for h in (1, 2, 3)) * (0.3 + 0.2 * np.sin(2 * np.pi * 3 * t))
        wave = wave + 0.02 * rng.standard_normal(t.size)
        soundfile.write(str(folder / f"{name}.wav"), wave.astype(np.float32), 24_000)


def tiny_personaplex_folder(seed: int = ModelConfig.seed, cache_dir: Path | None = None) -> Path:
    """A tiny checkpoint in PersonaPlex's layout, written once (cached by seed): Kyutai's folder
    layout with `dep_q = 8` in config.json, weights from moshi's own classes with a **16-step**
    depformer saved in the stacked form (`self_attn.in_proj_weight`), and preset voices as WAVs
    under voices/. Loading it runs the real PersonaPlex code."""
    cache_dir = _cache_dir(cache_dir)
    folder = cache_dir / f"tiny-personaplex-v2-{seed}"
    if (folder / "config.json").exists():
        return folder
    tokenizer_file = tiny_tokenizer_path(cache_dir)
    text_card = sentencepiece.SentencePieceProcessor(str(tokenizer_file)).vocab_size()
    # a longer context than `tiny`'s, so English personas (many pieces in the Telugu tokenizer) fit
    config = dict(tiny_lm_kwargs(text_card=text_card, conditioned=False), context=1000)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mimi = tiny_mimi(torch.device("cpu"), seed)
        lm16 = loaders.get_moshi_lm(None, lm_kwargs=dict(copy.deepcopy(config), dep_q=16, depformer_context=16),
                                    device="cpu", dtype=torch.float32)
    files = CheckpointFiles(lm=personaplex.stack_depformer_projections(lm16.state_dict()), mimi=mimi.state_dict(),
                            tokenizer=tokenizer_file, lm_config=config, mimi_config=tiny_mimi_config(),
                            model_id={"base": TINY_MODEL})
    with staged_folder(folder, replace=False) as tmp:
        _write_tone_voices(tmp / VOICES_DIR)
        write_checkpoint(tmp, files)
    return folder
