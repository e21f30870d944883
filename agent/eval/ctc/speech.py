"""espeak-ng renderings of the recogniser's sentences -> feature sets (features + labels).

A `Rendering` is one utterance's recipe: text, espeak-ng voice, rate (words per minute), pitch
(0-99), silence around it and an optional white-noise SNR. `renderings(sentences, ...)` draws them
reproducibly from a seed; `render(r)` speaks one (agent.audio.espeak, 16 kHz); `feature_set(rs)` turns
a list into the tensors training reads.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from agent.audio.espeak import espeak
from agent.eval.ctc import alphabet
from agent.eval.ctc.features import RATE, log_mel

TRAIN_VOICES = ("te", *(f"te+m{i}" for i in range(1, 8)), *(f"te+f{i}" for i in range(1, 6)))
UNSEEN_VOICES = ("te+Andy", "te+Annie", "te+klatt", "te+Michael")  # never in training: a check across voices
EVAL_VOICES = ("te", "te+f3", "te+m3", "te+f2")  # agent.eval.evalset's user voices
RATES = (120, 220)  # espeak-ng -s, words per minute (its default is 175)
PITCHES = (25, 75)  # espeak-ng -p (default 50)
TRIM_LEVEL = 0.01  # espeak's padding, as agent.eval.speech trims it


@dataclass(frozen=True)
class Rendering:
    text: str
    voice: str = "te"
    rate: int = 175
    pitch: int = 50
    pad_s: tuple[float, float] = (0.1, 0.1)
    snr_db: float | None = None  # white noise at this SNR; None: clean
    seed: int = 0  # of the noise


def renderings(sentences: list[str], seed: int, voices: tuple[str, ...] = TRAIN_VOICES,
               noise_share: float = 0.0, snr_db: tuple[float, float] = (20.0, 40.0)) -> list[Rendering]:
    """One recipe per sentence: a random voice, rate, pitch and padding; noise on `noise_share` of them."""
    rng = random.Random(f"asr-renderings/{seed}")
    out = []
    for i, text in enumerate(sentences):
        snr = rng.uniform(*snr_db) if rng.random() < noise_share else None
        pad = (round(rng.uniform(0.0, 0.3), 2), round(rng.uniform(0.0, 0.3), 2))
        out.append(Rendering(text, rng.choice(voices), rng.randint(*RATES), rng.randint(*PITCHES), pad, snr,
                             seed * 1_000_003 + i))
    return out


def render(r: Rendering) -> np.ndarray:
    """Mono float32 at 16 kHz."""
    speech = espeak(r.text, r.voice, RATE, ["-s", str(r.rate), "-p", str(r.pitch)], trim_level=TRIM_LEVEL)
    audio = np.concatenate([np.zeros(round(r.pad_s[0] * RATE), np.float32), speech,
                            np.zeros(round(r.pad_s[1] * RATE), np.float32)])
    if r.snr_db is not None:
        noise = np.random.default_rng(r.seed).standard_normal(audio.size).astype(np.float32)
        audio = audio + noise * float(np.sqrt(np.mean(speech ** 2)) / 10 ** (r.snr_db / 20))
    return audio


def feature_set(items: list[Rendering], progress: bool = False) -> dict:
    """{"features": [float16 (frames, 80)], "labels": [int16], "items": [recipe dicts]}."""
    from tqdm import tqdm
    feats, labs = [], []
    for r in tqdm(items, desc="espeak-ng", unit="utt", disable=not progress, mininterval=5):
        feats.append(log_mel(render(r)).half())
        labs.append(torch.tensor(alphabet.labels(r.text), dtype=torch.int16))
    return {"features": feats, "labels": labs, "items": [asdict(r) for r in items]}
