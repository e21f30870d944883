"""Greedy CTC decoding: the best label per frame, repeats merged, blanks dropped; each word's time
runs from the first to the last frame that emitted one of its characters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agent.eval.ctc import alphabet


@dataclass(frozen=True)
class Heard:
    text: str
    words: list[tuple[str, int, int]]  # (word, first frame, last frame + 1), in output frames


def greedy(log_probs: torch.Tensor, length: int | None = None) -> Heard:
    """`log_probs`: (frames, labels) of one utterance."""
    best = log_probs[:length].argmax(-1).tolist()
    chars: list[tuple[str, int]] = []
    previous = alphabet.BLANK
    for t, label in enumerate(best):
        if label != previous and label != alphabet.BLANK:
            chars.append((alphabet.text([label]), t))
        previous = label
    words, current, start, end = [], "", 0, 0
    for char, t in chars + [(" ", len(best))]:
        if char == " ":
            if current:
                words.append((current, start, end + 1))
            current = ""
            continue
        if not current:
            start = t
        current, end = current + char, t
    return Heard(" ".join(w for w, _, _ in words), words)
