"""Train the recogniser (`python -m agent.train asr --out DIR`): data, steps, figures, the shipped folder.

Contract: `train_asr(AsrTrainConfig)` -> the figures dict also written to `DIR/recipe.json`, the model to
`DIR/model/` (what `--asr ctc:DIR/model` loads). Data: `DIR/data/*.pt` feature shards rendered by
espeak-ng (agent.eval.ctc.speech) from generated sentences (agent.eval.ctc.sentences; disjoint from the
project's, checked before any audio is made). Each step: a random batch, SpecAugment (frequency and
time masks), CTC loss, AdamW with warm-up and cosine decay. Every `eval_every` steps: greedy CER on the
clean held-out set (the curve) and `DIR/state.pt` (model, optimiser, schedule, every RNG), so an
interrupted run resumes where it stopped and matches an uninterrupted one. Given the seed, the run is
reproducible on one thread.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from agent.eval.ctc import alphabet, speech
from agent.eval.ctc import model as ctc_model
from agent.eval.ctc import sentences as corpus
from agent.eval.ctc.decode import greedy

STATE = "state.pt"


@dataclass
class AsrTrainConfig:
    out: Path
    train_sentences: int = 3000
    heldout_sentences: int = 200  # clean, the training voices: the CER that must stay <= 10 %
    unseen_voice_sentences: int = 120  # clean, espeak-ng variants never trained on
    steps: int = 3000
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 200
    eval_every: int = 250
    noise_share: float = 0.3  # of training utterances, white noise at 20-40 dB SNR
    freq_masks: int = 2  # SpecAugment: masks of up to 12 mel bins
    time_masks: int = 2  # and of up to 5 % of the frames each
    seed: int = 0
    threads: int = 1
    project_check: bool = True  # also score the project's own sentences (596 renderings, about a minute)
    workers: int = 2  # processes rendering espeak-ng speech
    model: ctc_model.ModelConfig = field(default_factory=ctc_model.ModelConfig)
    quiet: bool = False


def _shard(job: tuple[list[speech.Rendering], str]) -> str:
    items, path = job
    torch.set_num_threads(1)
    torch.save(speech.feature_set(items), path)
    return path


def build_sets(config: AsrTrainConfig) -> dict[str, dict]:
    """The training, held-out, unseen-voice and project-sentence sets, rendered once into DIR/data."""
    from agent.train.common import parallel_map, progress
    train_text = corpus.generate(config.train_sentences, config.seed)
    heldout_text = corpus.generate(config.heldout_sentences, config.seed + 1_000, exclude=train_text)
    unseen_text = corpus.generate(config.unseen_voice_sentences, config.seed + 2_000, exclude=train_text)
    corpus.assert_disjoint(train_text)
    project = sorted(corpus.project_sentences())
    recipes = {
        "train": speech.renderings(train_text, config.seed, noise_share=config.noise_share),
        "heldout": speech.renderings(heldout_text, config.seed + 1_000),
        "unseen_voices": speech.renderings(unseen_text, config.seed + 2_000, voices=speech.UNSEEN_VOICES),
    }
    if config.project_check:
        recipes["project"] = [speech.Rendering(t, v) for t in project for v in speech.EVAL_VOICES]
    data = config.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    jobs = [(items[i:i + 500], str(data / f"{name}-{i // 500:03d}.pt"))
            for name, items in recipes.items() for i in range(0, len(items), 500)]
    todo = [j for j in jobs if not Path(j[1]).exists()]
    for _ in progress(parallel_map(_shard, todo, config.workers), "espeak-ng shards", len(todo), config.quiet):
        pass
    sets = {}
    for name in recipes:
        parts = [torch.load(p, weights_only=False) for _, p in jobs if Path(p).name.startswith(name + "-")]
        sets[name] = {k: [x for part in parts for x in part[k]] for k in ("features", "labels", "items")}
    return sets


def spec_augment(x: torch.Tensor, lengths: torch.Tensor, config: AsrTrainConfig, gen: torch.Generator) -> torch.Tensor:
    x = x.clone()
    for b in range(x.shape[0]):
        for _ in range(config.freq_masks):
            width = int(torch.randint(0, 13, (1,), generator=gen))
            start = int(torch.randint(0, x.shape[2] - width + 1, (1,), generator=gen))
            x[b, :, start:start + width] = 0
        n = int(lengths[b])
        for _ in range(config.time_masks):
            width = int(torch.randint(0, max(1, n // 20) + 1, (1,), generator=gen))
            start = int(torch.randint(0, max(1, n - width + 1), (1,), generator=gen))
            x[b, start:start + width] = 0
    return x


def batch(features: list[torch.Tensor], labels: list[torch.Tensor], idx: list[int]):
    feats = [features[i].float() for i in idx]
    lengths = torch.tensor([f.shape[0] for f in feats])
    x = nn.utils.rnn.pad_sequence(feats, batch_first=True)
    targets = torch.cat([labels[i].long() for i in idx])
    target_lengths = torch.tensor([len(labels[i]) for i in idx])
    return x, lengths, targets, target_lengths


@torch.no_grad()
def transcribe_set(net: ctc_model.CtcRecogniser, data: dict, batch_size: int = 32) -> list[str]:
    was_training = net.training
    net.eval()
    out = []
    for i in range(0, len(data["features"]), batch_size):
        idx = list(range(i, min(i + batch_size, len(data["features"]))))
        x, lengths, _, _ = batch(data["features"], data["labels"], idx)
        log_probs, out_lengths = net(x, lengths)
        out += [greedy(log_probs[j], int(out_lengths[j])).text for j in range(len(idx))]
    net.train(was_training)
    return out


def cer(net: ctc_model.CtcRecogniser, data: dict, by: str | None = None) -> dict:
    """Corpus CER (and WER) of `net` on a set; with `by` (a recipe field, e.g. "voice"), per value too."""
    from agent.eval.intelligibility import error_rates
    refs = [alphabet.clean(item["text"]) for item in data["items"]]
    hyps = transcribe_set(net, data)
    total = error_rates(refs, hyps)
    result = {"n": total.n, "cer": round(total.cer, 4), "wer": round(total.wer, 4)}
    if by:
        keys = sorted({item[by] for item in data["items"]})
        result[f"by_{by}"] = {k: round(error_rates(*zip(*[(r, h) for r, h, item in zip(refs, hyps, data["items"])
                                                              if item[by] == k])).cer, 4) for k in keys}
    return result


def _lr(step: int, config: AsrTrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _settings(config: AsrTrainConfig) -> dict:
    return {k: v for k, v in asdict(config).items()
            if k not in ("out", "quiet", "workers", "threads", "project_check")}


def train_asr(config: AsrTrainConfig) -> dict:
    from tqdm import tqdm
    torch.set_num_threads(config.threads)
    started = time.monotonic()
    sets = build_sets(config)
    torch.manual_seed(config.seed)
    net = ctc_model.CtcRecogniser(config.model)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, config))
    gen = torch.Generator().manual_seed(config.seed)
    ctc = nn.CTCLoss(blank=alphabet.BLANK, zero_infinity=True)
    step, curve, minutes = 0, [], 0.0
    state_path = config.out / STATE
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["settings"] != _settings(config):
            raise ValueError(f"{state_path} was written with other settings; use another --out or delete it")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        step, curve, minutes = state["step"], state["curve"], state["minutes"]
    train = sets["train"]
    net.train()
    losses: list[float] = []
    bar = tqdm(total=config.steps, initial=step, desc="asr", unit="step", disable=config.quiet, mininterval=2)
    while step < config.steps:
        idx = torch.randint(0, len(train["features"]), (config.batch_size,), generator=gen).tolist()
        x, lengths, targets, target_lengths = batch(train["features"], train["labels"], idx)
        x = spec_augment(x, lengths, config, gen)
        log_probs, out_lengths = net(x, lengths)
        loss = ctc(log_probs.transpose(0, 1), targets, out_lengths, target_lengths)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % config.eval_every == 0 or step == config.steps:
            point = {"step": step, "loss": round(sum(losses) / len(losses), 4),
                     "heldout_cer": cer(net, sets["heldout"])["cer"],
                     "minutes": round(minutes + (time.monotonic() - started) / 60, 1)}
            curve.append(point)
            losses = []
            bar.set_postfix(loss=point["loss"], cer=point["heldout_cer"])
            _save_state(state_path, net, opt, sched, gen, step, curve, point["minutes"], config)
    bar.close()
    figures = {
        "what": "Telugu CTC recogniser trained on espeak-ng speech: it hears espeak-like Telugu, not real speakers",
        "heldout_clean": cer(net, sets["heldout"], by="voice"),
        "unseen_voices": cer(net, sets["unseen_voices"], by="voice"),
        **({"project_sentences": cer(net, sets["project"], by="voice")} if "project" in sets else {}),
        "curve": curve,
        "minutes": curve[-1]["minutes"] if curve else 0.0,
        "training": {**_settings(config), "voices": list(speech.TRAIN_VOICES), "rates_wpm": list(speech.RATES),
                     "pitches": list(speech.PITCHES), "unseen_voices": list(speech.UNSEEN_VOICES),
                     "project_voices": list(speech.EVAL_VOICES), "sentences": "agent.eval.ctc.sentences.generate"},
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    ctc_model.save(net, config.out / "model", figures)
    (config.out / "recipe.json").write_text(json.dumps(figures, ensure_ascii=False, indent=1), encoding="utf-8")
    return figures


def _save_state(path: Path, net, opt, sched, gen, step: int, curve: list, minutes: float,
                config: AsrTrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step, "curve": curve,
                "minutes": minutes, "settings": _settings(config), "python_rng": random.getstate()}, tmp)
    tmp.replace(path)
