"""Train the tiny Mimi as a speech codec: an autoencoder on Telugu speech, on a CPU.

The tiny model's Mimi (`agent.models.tiny_mimi_config`: moshi's own classes, full framing of 24 kHz
and 12.5 Hz frames, 8 codebooks of 256, narrow layers) starts from random weights, so its voice is
noise. Here it learns to reconstruct speech: moshi's `MimiModel.forward` (encoder, split residual
quantizer with EMA codebooks, decoder) on random crops of mono speech, with an L1 waveform loss, a
multi-scale log-spectral loss and the quantizer's commitment penalty. No adversarial or distillation
losses (Mimi's paper uses both): at this size and budget they are not worth their cost, so the voice is
muffled but recognisably speech.

telugu-small's codec (`telugu_small_codec_config`, issue 22) adds what EnCodec and DAC use for
intelligible speech, each chosen by `CodecConfig`: a multi-scale mel loss (`agent.train.codec_losses`),
EnCodec's multi-scale STFT discriminator with hinge and feature-matching losses after a warm-up
(`agent.train.codec_discriminator`), and quantizer dropout (a random number of codebooks in a share of
the batches, so the first codebooks carry the most). With their defaults (off) the tiny codec trains
exactly as before.

Contract: `train_codec(CodecConfig, validation, judge=None, validation_texts=None)` -> a trained
`MimiModel` saved as `mimi.safetensors` + `mimi_config.json` in `config.out` (with validation clips: the
best snapshot, `snapshot_rank`), plus `codec.json` with its losses, judged snapshots and settings. An
interrupted run resumes from `state.pt` in `config.out` (the discriminator and its optimizer included).
`judge` is an `agent.eval.asr.Transcriber` (e.g. `load_transcriber("ctc")`): with it and the clips'
texts, snapshots are also judged, and ranked first, by character error rate.
`evaluate_codec(mimi, clips, texts=None, transcriber=None)` -> the reconstruction figures on held-out
clips (Silero speech ratio, log-spectral distance, mel-cepstral distance; CER with a transcriber).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.quantization.core_vq import EuclideanCodebook
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from agent import SAMPLE_RATE
from agent.audio.files import read_channels
from agent.train.codec_discriminator import Adversary, AdversaryConfig
from agent.train.codec_losses import MEL_FLOOR, MEL_SCALES, mel_cepstral_distance, multiscale_mel_loss

FRAME = 1920  # samples per 80 ms Mimi frame at 24 kHz
STFT_SCALES = (2048, 1024, 512, 256, 128, 64)


def codec_mimi_config(seanet_filters: int = 8, seanet_dim: int = 64) -> dict:
    """The tiny model's Mimi geometry (see agent.models.tiny_mimi_config), width as given."""
    from agent.models import tiny_mimi_config
    cfg = tiny_mimi_config()
    cfg["seanet"].update(dimension=seanet_dim, n_filters=seanet_filters)
    cfg["quantizer"].update(input_dimension=seanet_dim, output_dimension=seanet_dim)
    cfg["transformer"].update(d_model=seanet_dim, input_dimension=seanet_dim, output_dimensions=[seanet_dim])
    return cfg


def build_mimi(cfg: dict, seed: int) -> MimiModel:
    torch.manual_seed(seed)
    return loaders.get_mimi(None, cfg, device="cpu", num_codebooks=cfg["quantizer"]["n_q"])


def save_mimi(mimi: MimiModel, cfg: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, folder / "mimi.safetensors")
    (folder / "mimi_config.json").write_text(json.dumps(cfg, indent=1))


def load_mimi_folder(folder: Path) -> tuple[MimiModel, dict]:
    cfg = json.loads((folder / "mimi_config.json").read_text())
    mimi = loaders.get_mimi(None, cfg, device="cpu", num_codebooks=cfg["quantizer"]["n_q"])
    mimi.load_state_dict(load_file(folder / "mimi.safetensors"))
    return mimi.eval(), cfg


# ---------------------------------------------------------------------------------------------
# Data: every channel of every WAV as one mono signal, cropped at random
# ---------------------------------------------------------------------------------------------

def read_signals(paths: list[Path], min_rms: float = 1e-3) -> list[np.ndarray]:
    """Each channel of each file at 24 kHz; near-silent channels (a monologue's empty side) dropped."""
    out = []
    for path in paths:
        for x in read_channels(path):
            if x.size >= FRAME * 4 and float(np.sqrt(np.mean(x ** 2))) > min_rms:
                out.append(x)
    if not out:
        raise ValueError("no speech to train the codec on (every file empty or silent)")
    return out


def speech_crops(signals: list[np.ndarray], n: int, length: int, rng: np.random.Generator,
                 min_rms: float = 3e-3) -> torch.Tensor:
    """`n` crops of `length` samples, mostly speech (a few tries to avoid silent crops), [n, 1, length]."""
    batch = np.zeros((n, 1, length), np.float32)
    for i in range(n):
        for _ in range(4):
            x = signals[rng.integers(len(signals))]
            start = int(rng.integers(0, max(1, x.size - length)))
            crop = x[start:start + length]
            if float(np.sqrt(np.mean(crop ** 2))) > min_rms:
                break
        batch[i, 0, :crop.size] = crop
    return torch.from_numpy(batch)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def log_spectrum(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, device=x.device)
    spec = torch.stft(x.reshape(-1, x.shape[-1]), n_fft, hop_length=n_fft // 4, window=window,
                      return_complex=True)
    return spec.abs().clamp_min(1e-4)  # -80 dB: silence below it is not worth fitting


def emphasise(x: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Pre-emphasis, x[n] - coefficient * x[n-1] (the identity at 0)."""
    return x if coefficient == 0 else x[..., 1:] - coefficient * x[..., :-1]


def spectral_loss(out: torch.Tensor, ref: torch.Tensor, scales: tuple[int, ...] = STFT_SCALES) -> torch.Tensor:
    """Multi-scale STFT loss: log-magnitude L1 + spectral convergence, averaged over scales."""
    total = out.new_zeros(())
    for n_fft in scales:
        a, b = log_spectrum(out, n_fft), log_spectrum(ref, n_fft)
        total = (total + (a.log() - b.log()).abs().mean()
                 + torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-5))
    return total / len(scales)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def autoencode(mimi: MimiModel, x: torch.Tensor, quantize_rate: float,
               n_q: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MimiModel.forward's path (encoder, transformer, 12.5 Hz, quantizer, back, decoder), with the
    quantized latent used for a random `quantize_rate` share of the batch and the continuous latent
    for the rest, as Mimi was trained: the decoder learns from clean latents while the codebooks
    catch up. `n_q` quantizes with only the first `n_q` codebooks (quantizer dropout; moshi's own
    `set_num_codebooks`, restored after). Returns (decoded audio cut to the input's length, commitment
    penalty)."""
    (emb,) = mimi.encoder_transformer(mimi.encoder(x))
    emb = mimi.downsample(emb)
    full = mimi.quantizer.n_q
    mimi.quantizer.set_num_codebooks(n_q or full)
    try:
        q = mimi.quantizer(emb, mimi.frame_rate)
    finally:
        mimi.quantizer.set_num_codebooks(full)
    use_q = (torch.rand(x.shape[0], 1, 1) < quantize_rate).to(emb.dtype)
    emb = use_q * q.x + (1 - use_q) * emb
    (emb,) = mimi.decoder_transformer(mimi.upsample(emb))
    return mimi.decoder(emb)[..., :x.shape[-1]], q.penalty


@dataclass
class CodecConfig:
    audio: list[Path]  # WAVs (mono or stereo; every channel is a signal)
    out: Path
    steps: int = 4000
    batch_size: int = 4
    crop_frames: int = 12  # 0.96 s crops
    lr: float = 2e-3
    seanet_filters: int = 8
    seanet_dim: int = 64
    waveform_weight: float = 1.0
    spectral_weight: float = 1.0
    commit_weight: float = 1.0
    quantize_rate: float = 0.5  # share of crops that go through the quantizer (Mimi's paper: 0.5)
    # With a > 0 the spectral loss compares pre-emphasised audio (x[n] - a x[n-1], +6 dB an octave), so the
    # loud 300-1000 Hz band does not rule it and the 1-3 kHz formants count. Off by default: it delayed the
    # voice's turn into speech on the toy's data (docs/evaluation.md).
    pre_emphasis: float = 0.0
    save_every: int = 250  # steps between snapshots (each judged on the validation clips, when given)
    # With validation clips, the kept codec is the best snapshot, and training goes on past `steps` (at
    # the final learning rate, up to `extra_steps` more) until one passes: Silero hears speech in at
    # least `min_speech_ratio` of the validation speech: the decoded voice turns from murmur into speech
    # suddenly, at similar losses, so neither the loss nor a step count says when the codec is ready.
    min_speech_ratio: float = 0.8
    extra_steps: int = 4000
    # Issue 22's additions, all off by default (the tiny codec's recipe). Weights are fixed, DAC's figures:
    # mel 15, adversarial 1, feature matching 2 (../shared/notes/codec-facts.md).
    mel_weight: float = 0.0  # multi-scale log-mel L1 (codec_losses.MEL_SCALES)
    mel_scales: tuple[tuple[int, int], ...] = MEL_SCALES
    # The mel loss's clamp (codec_losses.multiscale_mel_loss). Raised to 1e-3 (so faint output where the
    # reference is digital silence costs little) the round trip got worse, not better: the recogniser
    # heard twice as many characters as were said (docs/evaluation.md). Both presets keep DAC's 1e-5.
    mel_floor: float = MEL_FLOOR
    adversarial_weight: float = 0.0  # > 0: EnCodec's multi-scale STFT discriminator, hinge loss
    feature_weight: float = 0.0  # its feature-matching L1
    adversary_start: int = 0  # steps of reconstruction losses alone before the discriminator joins (a warm-up)
    adversary_filters: int = 16
    adversary_scales: tuple[int, ...] = (2048, 1024, 512)
    adversary_lr: float = 3e-4
    quantizer_dropout: float = 0.0  # share of batches quantized with a random 1..8 codebooks (DAC: 0.5)
    # "speech": Silero's ratio decides, then LSD (the tiny codec's choice); "distance": among snapshots that
    # pass, the lowest CER (with a judge) then mel-cepstral distance wins.
    rank_by: str = "speech"
    max_cer: float = 0.2  # with a judge, a snapshot passes only at or below this CER
    seed: int = 0
    quiet: bool = False
    history: list[dict] = field(default_factory=list)
    snapshots: list[dict] = field(default_factory=list)  # every judged snapshot
    kept: dict | None = None  # the judged snapshot whose weights are in `out`


def telugu_small_codec_config(audio: list[Path], out: Path, seed: int = 0, **overrides) -> CodecConfig:
    """telugu-small's codec (issue 22): moshi's Mimi at 12.5 Hz with 8 codebooks, twice the tiny codec's
    SEANet width, DAC's fixed loss weights (mel 15, adversarial 1, feature matching 2, plus a plain
    waveform L1), EnCodec's multi-scale STFT discriminator after 1,500 steps of reconstruction alone,
    quantizer dropout in half the batches, and snapshots ranked by CER / mel-cepstral distance. About
    0.7 s a step on one core of this machine once the discriminator runs (docs/evaluation.md)."""
    settings = dict(steps=6000, extra_steps=2000, seanet_filters=16, spectral_weight=0.0, mel_weight=15.0,
                    adversarial_weight=1.0, feature_weight=2.0, adversary_start=1500, adversary_filters=8,
                    quantizer_dropout=0.5, rank_by="distance") | overrides
    return CodecConfig(audio=audio, out=out, seed=seed, **settings)


STATE_FILE = "state.pt"  # the latest weights, optimizer and random state: an interrupted run resumes from it


def dead_code_countdowns(mimi: MimiModel) -> dict[str, int]:
    """Each codebook's steps until its next dead-code check. moshi keeps this countdown outside the
    state_dict (a plain attribute, started when the codebook is first initialised), so a resumed run
    must carry it to go on exactly as an uninterrupted one would."""
    return {name: module._next_unused_check for name, module in mimi.named_modules()
            if isinstance(module, EuclideanCodebook)}


def restore_dead_code_countdowns(mimi: MimiModel, countdowns: dict[str, int]) -> None:
    for name, module in mimi.named_modules():
        if name in countdowns:
            module._next_unused_check = countdowns[name]


def snapshot_passes(snapshot: dict, config: CodecConfig) -> bool:
    """Silero hears enough speech and, where a recogniser judged it, its CER is low enough."""
    cer = snapshot.get("cer")
    return snapshot["speech_ratio"] >= config.min_speech_ratio and (cer is None or cer <= config.max_cer)


def snapshot_rank(snapshot: dict, config: CodecConfig) -> tuple:
    """Order of preference between snapshots: a passing one beats any other. By "speech" (the tiny
    codec's): then the more speech Silero hears (a ratio above 1, speech heard where there was none,
    counts as 1), then the closer spectrum. By "distance": a passing snapshot with the lower CER, then
    the lower mel-cepstral distance; among failing ones the more speech heard first."""
    passes, ratio = snapshot_passes(snapshot, config), min(snapshot["speech_ratio"], 1.0)
    if config.rank_by == "speech":
        return (passes, ratio, -snapshot["lsd_db"], -snapshot["step"])
    distance = (-snapshot.get("cer", 0.0), -snapshot.get("mcd_db", snapshot["lsd_db"]))
    return (passes, *(distance if passes else ()), ratio, *distance, -snapshot["step"])


@dataclass
class _Trainer:
    """The codec with its optimizer and schedule, and the discriminator when the config asks for one."""
    mimi: MimiModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    adversary: Adversary | None

    @classmethod
    def build(cls, config: CodecConfig, cfg: dict) -> _Trainer:
        mimi = build_mimi(cfg, config.seed)
        for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
            rvq.q_dropout = False  # moshi's own dropout draws from a generator no checkpoint saves: ours is below
        opt = torch.optim.AdamW([p for p in mimi.parameters() if p.requires_grad], lr=config.lr, betas=(0.8, 0.99),
                                weight_decay=0.0)
        warmup = max(1, config.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
            0.55 + 0.45 * math.cos(math.pi * min(1.0, s / config.steps))))  # warm up, cosine to 10%, then stay
        adversary = None
        if config.adversarial_weight > 0 or config.feature_weight > 0:
            adversary = Adversary(AdversaryConfig(config.adversary_filters, tuple(config.adversary_scales),
                                                  config.adversary_lr), config.seed)
        return cls(mimi, opt, sched, adversary)

    def step(self, config: CodecConfig, ref: torch.Tensor, rng: np.random.Generator, step: int) -> dict[str, float]:
        """One update of the codec (and before it, of the discriminator once past its warm-up)."""
        n_q = None
        if config.quantizer_dropout > 0 and rng.random() < config.quantizer_dropout:
            n_q = int(rng.integers(1, self.mimi.quantizer.n_q + 1))
        decoded, penalty = autoencode(self.mimi, ref, config.quantize_rate, n_q)
        now = {"wave": F.l1_loss(decoded, ref)}
        if config.spectral_weight:
            now["spec"] = spectral_loss(*(emphasise(x, config.pre_emphasis) for x in (decoded, ref)))
        if config.mel_weight:
            now["mel"] = multiscale_mel_loss(decoded, ref, tuple(config.mel_scales), config.mel_floor)
        now["commit"] = penalty
        loss = (config.waveform_weight * now["wave"] + config.spectral_weight * now.get("spec", 0.0)
                + config.mel_weight * now.get("mel", 0.0) + config.commit_weight * penalty)
        figures = {}
        if self.adversary is not None and step >= config.adversary_start:
            figures["disc"] = self.adversary.discriminator_step(decoded, ref)
            now["adv"], now["feat"] = self.adversary.generator_losses(decoded, ref)
            loss = loss + config.adversarial_weight * now["adv"] + config.feature_weight * now["feat"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.mimi.parameters() if p.requires_grad], 1.0)
        self.opt.step()
        self.sched.step()
        return {"loss": loss.item(), **{k: v.item() for k, v in now.items()}, **figures}


def _smoothed(smooth: dict, now: dict) -> dict:
    """Exponential average of each loss (batches are noisy); a loss that starts late (the discriminator's)
    starts from its first value."""
    return {k: 0.95 * smooth[k] + 0.05 * v if k in smooth else v for k, v in now.items()}


def train_codec(config: CodecConfig, validation: list[np.ndarray] | None = None, judge=None,
                validation_texts: list[str] | None = None) -> MimiModel:
    """Train (or resume training) the codec. Without `validation` clips the final weights are kept;
    with them, the best snapshot (see CodecConfig) is kept and written to `config.out`. With `judge`
    (a Transcriber) and `validation_texts` (what each clip says), snapshots are also judged by CER."""
    cfg = codec_mimi_config(config.seanet_filters, config.seanet_dim)
    signals = read_signals(config.audio)
    rng = np.random.default_rng(config.seed)
    trainer = _Trainer.build(config, cfg)
    torch.manual_seed(config.seed)
    step, smooth = _resume(config, trainer, rng)
    limit = config.steps + (config.extra_steps if validation else 0)
    trainer.mimi.train()
    started = time.monotonic()
    bar = tqdm(total=max(config.steps, step), initial=step, desc="codec", disable=config.quiet, unit="step")
    while step < limit:
        ref = speech_crops(signals, config.batch_size, config.crop_frames * FRAME, rng)
        smooth = _smoothed(smooth, trainer.step(config, ref, rng, step))
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{smooth[k]:.3f}" for k in ("spec", "mel", "adv") if k in smooth})
        if step % 25 == 0 or step == config.steps:
            config.history.append({"step": step, **{k: round(v, 5) for k, v in smooth.items()},
                                   "elapsed_s": round(time.monotonic() - started, 1)})
        if step % config.save_every and step not in (config.steps, limit):
            continue
        _snapshot(trainer.mimi, cfg, config, validation, step, judge, validation_texts)
        if step >= config.steps and (config.kept is None or snapshot_passes(config.kept, config)):
            break
        if step >= bar.total:  # no snapshot passes yet: the bar shows the extra steps allowed
            bar.total = limit
            bar.refresh()
        _save_state(config, trainer, rng, step, smooth, signals)
    bar.close()
    if validation:
        mimi, _ = load_mimi_folder(config.out)  # the chosen snapshot
    else:
        mimi = trainer.mimi.eval()
        save_mimi(mimi, cfg, config.out)
    _save_log(config, signals, done=True)
    (config.out / STATE_FILE).unlink(missing_ok=True)
    return mimi


def _snapshot(mimi: MimiModel, cfg: dict, config: CodecConfig, validation: list[np.ndarray] | None,
              step: int, judge=None, texts: list[str] | None = None) -> None:
    """Judge the current weights on the validation clips (if any); write them to `out` and make them
    `config.kept` when they beat the snapshot kept so far."""
    if not validation:
        return
    mimi.eval()
    if judge is not None and texts:
        figures = evaluate_codec(mimi, validation, texts=texts, transcriber=judge)
    else:
        figures = evaluate_codec(mimi, validation)
    mimi.train()
    snapshot = {"step": step, **{k: v for k, v in figures.items() if k != "clips"}}
    config.snapshots.append(snapshot)
    if "cer" in snapshot and config.kept is not None and "cer" not in config.kept:
        config.kept = None  # kept before the run had a judge (resumed with one): its CER is unknown
    rank = partial(snapshot_rank, config=config)
    if config.kept is None or rank(snapshot) > rank(config.kept):
        save_mimi(mimi, cfg, config.out)
        config.kept = snapshot
    if not config.quiet:
        shown = ", ".join(f"{k} {v}" for k, v in snapshot.items() if k != "step")
        tqdm.write(f"codec step {step}: validation {shown} (kept: step {config.kept['step']})")


def _settings(config: CodecConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()
            if k not in ("audio", "history", "snapshots", "kept", "quiet")}


def _save_state(config: CodecConfig, trainer: _Trainer, rng: np.random.Generator,
                step: int, smooth: dict, signals: list[np.ndarray]) -> None:
    """Everything needed to go on from `step` exactly as an uninterrupted run would."""
    config.out.mkdir(parents=True, exist_ok=True)
    tmp = config.out / (STATE_FILE + ".tmp")
    torch.save({"settings": _settings(config), "files": [str(p) for p in config.audio], "step": step,
                "mimi": trainer.mimi.state_dict(), "countdowns": dead_code_countdowns(trainer.mimi),
                "opt": trainer.opt.state_dict(), "sched": trainer.sched.state_dict(),
                "adversary": None if trainer.adversary is None else trainer.adversary.state_dict(),
                "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "smooth": smooth,
                "history": config.history, "snapshots": config.snapshots, "kept": config.kept}, tmp)
    tmp.replace(config.out / STATE_FILE)
    _save_log(config, signals, done=False)


def _resume(config: CodecConfig, trainer: _Trainer, rng: np.random.Generator) -> tuple[int, dict]:
    """(step, smoothed losses) to start from: 0 and {} unless `out` holds the state of an interrupted run
    with the same settings and data."""
    path = config.out / STATE_FILE
    if not path.is_file():
        return 0, {}
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["settings"] != _settings(config) or state["files"] != [str(p) for p in config.audio]:
        if not config.quiet:
            tqdm.write(f"codec: {path} is from other settings or data; starting over")
        return 0, {}
    trainer.mimi.load_state_dict(state["mimi"])
    restore_dead_code_countdowns(trainer.mimi, state["countdowns"])
    trainer.opt.load_state_dict(state["opt"])
    trainer.sched.load_state_dict(state["sched"])
    if trainer.adversary is not None:
        trainer.adversary.load_state_dict(state["adversary"])
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    config.history[:], config.snapshots[:], config.kept = state["history"], state["snapshots"], state["kept"]
    if not config.quiet:
        tqdm.write(f"codec: resuming from step {state['step']}")
    return state["step"], state["smooth"]


def _save_log(config: CodecConfig, signals: list[np.ndarray], done: bool) -> None:
    """`codec.json`: settings, losses, judged snapshots and whether training finished."""
    config.out.mkdir(parents=True, exist_ok=True)
    chosen = config.kept
    (config.out / "codec.json").write_text(json.dumps(
        {"done": done, "settings": _settings(config), "files": len(config.audio), "signals": len(signals),
         "audio_s": round(sum(s.size for s in signals) / SAMPLE_RATE, 1),
         "chosen": chosen, "passed": None if chosen is None else snapshot_passes(chosen, config),
         "snapshots": config.snapshots, "history": config.history}, indent=1))


# ---------------------------------------------------------------------------------------------
# Held-out figures
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def reconstruct(mimi: MimiModel, audio: np.ndarray) -> np.ndarray:
    """Encode and decode a mono 24 kHz clip (padded to whole frames) through the 8 codebooks."""
    n = math.ceil(audio.size / FRAME) * FRAME
    x = torch.zeros(1, 1, n)
    x[0, 0, :audio.size] = torch.from_numpy(audio)
    return mimi.decode(mimi.encode(x))[0, 0, :audio.size].numpy()


def log_spectral_distance(out: np.ndarray, ref: np.ndarray, n_fft: int = 1024) -> float:
    """RMS difference of the log power spectra in dB, over frames where the reference is not silent."""
    a = log_spectrum(torch.from_numpy(out)[None], n_fft) ** 2
    b = log_spectrum(torch.from_numpy(ref)[None], n_fft) ** 2
    diff_db = 10 * (a.log10() - b.log10())
    loud = 10 * b.log10().amax(dim=1) > 10 * b.log10().max() - 50  # frames within 50 dB of the loudest
    per_frame = diff_db.pow(2).mean(dim=1).sqrt()
    return float(per_frame[loud].mean())


def speech_seconds(audio: np.ndarray) -> float:
    from agent.eval.timing import speech_segments
    return sum(e - s for s, e in speech_segments(audio, SAMPLE_RATE))


def evaluate_codec(mimi: MimiModel, clips: list[np.ndarray], texts: list[str] | None = None,
                   transcriber=None) -> dict:
    """Silero speech ratio (speech seconds heard in the decoded clips / in the originals), log-spectral
    distance and mel-cepstral distance (dB) of decoded against original, on mono 24 kHz clips; with a
    `transcriber` (agent.eval.asr) and the clips' `texts`, also the CER of what it hears in the decoded clips."""
    ref_speech = out_speech = 0.0
    distances, cepstral, heard = [], [], []
    for clip in clips:
        decoded = reconstruct(mimi, clip)
        ref_speech += speech_seconds(clip)
        out_speech += speech_seconds(decoded)
        distances.append(log_spectral_distance(decoded, clip))
        cepstral.append(mel_cepstral_distance(decoded, clip))
        if transcriber is not None:
            heard.append(" ".join(w.text for w in transcriber.words(decoded, SAMPLE_RATE)))
    figures = {"clips": len(clips), "speech_ratio": round(out_speech / max(ref_speech, 1e-9), 3),
               "lsd_db": round(float(np.mean(distances)), 2), "mcd_db": round(float(np.mean(cepstral)), 2)}
    if transcriber is not None and texts:
        from agent.eval.intelligibility import error_rates
        figures["cer"] = round(error_rates(list(texts), heard).cer, 4)
    return figures
