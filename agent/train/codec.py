"""Train the tiny Mimi as a speech codec: an autoencoder on Telugu speech, on a CPU.

The tiny model's Mimi (`agent.models.tiny_mimi_config`: moshi's own classes, full framing of 24 kHz
and 12.5 Hz frames, 8 codebooks of 256, narrow layers) starts from random weights, so its voice is
noise. Here it learns to reconstruct speech: moshi's `MimiModel.forward` (encoder, split residual
quantizer with EMA codebooks, decoder) on random crops of mono speech, with an L1 waveform loss, a
multi-scale log-spectral loss and the quantizer's commitment penalty. No adversarial or distillation
losses (Mimi's paper uses both): at this size and budget they are not worth their cost, so the voice is
muffled but recognisably speech.

Contract: `train_codec(CodecConfig, validation)` -> a trained `MimiModel` saved as `mimi.safetensors` +
`mimi_config.json` in `config.out` (with validation clips: the best snapshot as Silero hears it), plus
`codec.json` with its losses, judged snapshots and settings. An interrupted run resumes from
`state.pt` in `config.out`.
`evaluate_codec(mimi, clips)` -> the reconstruction figures on held-out clips (Silero speech ratio,
log-spectral distance).
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

def autoencode(mimi: MimiModel, x: torch.Tensor, quantize_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MimiModel.forward's path (encoder, transformer, 12.5 Hz, quantizer, back, decoder), with the
    quantized latent used for a random `quantize_rate` share of the batch and the continuous latent
    for the rest, as Mimi was trained: the decoder learns from clean latents while the codebooks
    catch up. Returns (decoded audio cut to the input's length, commitment penalty)."""
    (emb,) = mimi.encoder_transformer(mimi.encoder(x))
    emb = mimi.downsample(emb)
    q = mimi.quantizer(emb, mimi.frame_rate)
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
    seed: int = 0
    quiet: bool = False
    history: list[dict] = field(default_factory=list)
    snapshots: list[dict] = field(default_factory=list)  # every judged snapshot
    kept: dict | None = None  # the judged snapshot whose weights are in `out`


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


def snapshot_rank(snapshot: dict, min_speech_ratio: float) -> tuple:
    """Order of preference between snapshots: a passing one beats any other; then the more speech Silero
    hears (a ratio above 1, speech heard where there was none, counts as 1), then the closer spectrum."""
    ratio = snapshot["speech_ratio"]
    return (ratio >= min_speech_ratio, min(ratio, 1.0), -snapshot["lsd_db"], -snapshot["step"])


def train_codec(config: CodecConfig, validation: list[np.ndarray] | None = None) -> MimiModel:
    """Train (or resume training) the codec. Without `validation` clips the final weights are kept;
    with them, the best snapshot (see CodecConfig) is kept and written to `config.out`."""
    cfg = codec_mimi_config(config.seanet_filters, config.seanet_dim)
    mimi = build_mimi(cfg, config.seed)
    for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
        rvq.q_dropout = False  # every frame trains all 8 levels: the LM always uses all of them
    signals = read_signals(config.audio)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    params = [p for p in mimi.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.8, 0.99), weight_decay=0.0)
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.55 + 0.45 * math.cos(math.pi * min(1.0, s / config.steps))))  # warm up, cosine to 10%, then stay
    step, smooth = _resume(config, mimi, opt, sched, rng)
    limit = config.steps + (config.extra_steps if validation else 0)
    mimi.train()
    started = time.monotonic()
    bar = tqdm(total=max(config.steps, step), initial=step, desc="codec", disable=config.quiet, unit="step")
    while step < limit:
        ref = speech_crops(signals, config.batch_size, config.crop_frames * FRAME, rng)
        decoded, penalty = autoencode(mimi, ref, config.quantize_rate)
        wave = F.l1_loss(decoded, ref)
        spec = spectral_loss(*(emphasise(x, config.pre_emphasis) for x in (decoded, ref)))
        loss = config.waveform_weight * wave + config.spectral_weight * spec + config.commit_weight * penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        now = {"loss": loss.item(), "wave": wave.item(), "spec": spec.item(), "commit": penalty.item()}
        smooth = {k: now[k] if not smooth else 0.95 * smooth[k] + 0.05 * now[k] for k in now}  # batches are noisy
        step += 1
        bar.update(1)
        bar.set_postfix(spec=f"{smooth['spec']:.3f}", wave=f"{smooth['wave']:.4f}")
        if step % 25 == 0 or step == config.steps:
            config.history.append({"step": step, **{k: round(v, 5) for k, v in smooth.items()},
                                   "elapsed_s": round(time.monotonic() - started, 1)})
        if step % config.save_every and step not in (config.steps, limit):
            continue
        _snapshot(mimi, cfg, config, validation, step)
        if step >= config.steps and (config.kept is None or config.kept["speech_ratio"] >= config.min_speech_ratio):
            break
        if step >= bar.total:  # no snapshot heard as speech yet: the bar shows the extra steps allowed
            bar.total = limit
            bar.refresh()
        _save_state(config, mimi, opt, sched, rng, step, smooth, signals)
    bar.close()
    if validation:
        mimi, _ = load_mimi_folder(config.out)  # the chosen snapshot
    else:
        mimi.eval()
        save_mimi(mimi, cfg, config.out)
    _save_log(config, signals, done=True)
    (config.out / STATE_FILE).unlink(missing_ok=True)
    return mimi


def _snapshot(mimi: MimiModel, cfg: dict, config: CodecConfig, validation: list[np.ndarray] | None,
              step: int) -> None:
    """Judge the current weights on the validation clips (if any); write them to `out` and make them
    `config.kept` when they beat the snapshot kept so far."""
    if not validation:
        return
    mimi.eval()
    figures = evaluate_codec(mimi, validation)
    mimi.train()
    snapshot = {"step": step, "speech_ratio": figures["speech_ratio"], "lsd_db": figures["lsd_db"]}
    config.snapshots.append(snapshot)
    rank = partial(snapshot_rank, min_speech_ratio=config.min_speech_ratio)
    if config.kept is None or rank(snapshot) > rank(config.kept):
        save_mimi(mimi, cfg, config.out)
        config.kept = snapshot
    if not config.quiet:
        tqdm.write(f"codec step {step}: validation speech ratio {snapshot['speech_ratio']:.3f}, "
                   f"LSD {snapshot['lsd_db']:.1f} dB (kept: step {config.kept['step']})")


def _settings(config: CodecConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()
            if k not in ("audio", "history", "snapshots", "kept", "quiet")}


def _save_state(config: CodecConfig, mimi: MimiModel, opt: torch.optim.Optimizer, sched, rng: np.random.Generator,
                step: int, smooth: dict, signals: list[np.ndarray]) -> None:
    """Everything needed to go on from `step` exactly as an uninterrupted run would."""
    config.out.mkdir(parents=True, exist_ok=True)
    tmp = config.out / (STATE_FILE + ".tmp")
    torch.save({"settings": _settings(config), "files": [str(p) for p in config.audio], "step": step,
                "mimi": mimi.state_dict(), "countdowns": dead_code_countdowns(mimi),
                "opt": opt.state_dict(), "sched": sched.state_dict(),
                "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "smooth": smooth,
                "history": config.history, "snapshots": config.snapshots, "kept": config.kept}, tmp)
    tmp.replace(config.out / STATE_FILE)
    _save_log(config, signals, done=False)


def _resume(config: CodecConfig, mimi: MimiModel, opt: torch.optim.Optimizer, sched,
            rng: np.random.Generator) -> tuple[int, dict]:
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
    mimi.load_state_dict(state["mimi"])
    restore_dead_code_countdowns(mimi, state["countdowns"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
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
         "chosen": chosen, "passed": None if chosen is None else chosen["speech_ratio"] >= config.min_speech_ratio,
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


def evaluate_codec(mimi: MimiModel, clips: list[np.ndarray]) -> dict:
    """Silero speech ratio (speech seconds heard in the decoded clips / in the originals) and
    log-spectral distance (dB) of decoded against original, on mono 24 kHz clips."""
    ref_speech = out_speech = 0.0
    distances = []
    for clip in clips:
        decoded = reconstruct(mimi, clip)
        ref_speech += speech_seconds(clip)
        out_speech += speech_seconds(decoded)
        distances.append(log_spectral_distance(decoded, clip))
    return {"clips": len(clips), "speech_ratio": round(out_speech / max(ref_speech, 1e-9), 3),
            "lsd_db": round(float(np.mean(distances)), 2)}
