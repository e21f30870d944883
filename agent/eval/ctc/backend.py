"""`CtcTranscriber`: the recogniser as an agent.eval.asr backend (`--asr ctc[:FOLDER]`).

It hears espeak-ng-like Telugu, not real speakers: its words mean something beside the held-out CER
in the folder's recipe.json (`heldout_cer`), which `load` reads and the name carries. Word times come
from the frames that emitted each word's characters (30 ms resolution). Audio is heard in windows
of at most `WINDOW_S` seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from agent.eval.ctc import model as ctc_model
from agent.eval.ctc.decode import greedy
from agent.eval.ctc.features import HOP, RATE, log_mel
from agent.eval.transcript import Word

log = logging.getLogger(__name__)
WINDOW_S = 60
MIN_S = 0.1


class CtcTranscriber:
    def __init__(self, folder: Path, device: str | None = None):
        self.net, self.recipe = ctc_model.load(Path(folder))
        self.heldout_cer = float(self.recipe["heldout_clean"]["cer"])
        self.name = f"ctc:{folder} (held-out espeak-ng CER {self.heldout_cer:.1%})"
        self.frame_s = self.net.config.stride * HOP / RATE
        log.info("ASR %s: hears espeak-ng-like Telugu, not real speakers", self.name)

    @torch.no_grad()
    def text(self, audio: np.ndarray, rate: int) -> str:
        return " ".join(w.text for w in self.words(audio, rate))

    @torch.no_grad()
    def words(self, audio: np.ndarray, rate: int, offset_s: float = 0.0) -> list[Word]:
        audio = np.asarray(audio, np.float32)
        words = []
        step = WINDOW_S * rate
        for start in range(0, audio.size, step):
            piece = audio[start:start + step]
            if piece.size < MIN_S * rate or not np.any(piece):
                continue
            x = log_mel(piece, rate)[None]
            log_probs, lengths = self.net(x, torch.tensor([x.shape[1]]))
            base = offset_s + start / rate
            words += [Word(w, base + a * self.frame_s, base + b * self.frame_s)
                      for w, a, b in greedy(log_probs[0], int(lengths[0])).words]
        return words
