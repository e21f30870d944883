"""What the agent said, with times: words (from an ASR) or speech segments (from the VAD).

Contract:
- `Word` is one time-aligned word; `read_words`/`write_words` read and write the benchmark's
  `output.json` (`{"text": ..., "chunks": [{"text": w, "timestamp": [start, end]}, ...]}`, what its
  `get_transcript/asr.py` writes), so a transcript made here is scored by its scripts too and one made
  there is scored here.
- `Speech` is the agent's speech in one output: spans in seconds, either words or VAD segments.
  `took_turn()` is Full-Duplex-Bench's rule (eval_smooth_turn_taking.py and its siblings): nothing
  said -> no; else it took the turn if it spoke for at least 1 s (first start to last end) or said
  more than 3 words. Without an ASR there are no words, so only the duration half applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from agent.train.records import Word  # one time-aligned word, the same in training data and evaluation

TURN_SECONDS = 1.0  # speaking this long takes the turn
TURN_WORDS = 3  # saying more words than this takes the turn


class TranscriptError(ValueError):
    """An output.json that is not the benchmark's format; the message names the file."""


def read_words(path: Path) -> list[Word]:
    """Words of a benchmark-format output.json. A word without an end time ends where it starts
    (their pause scorer does the same)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        words = []
        for chunk in data["chunks"]:
            start, end = chunk["timestamp"][0], chunk["timestamp"][-1]
            if start is None:
                continue
            words.append(Word(str(chunk["text"]), float(start), float(start if end is None else end)))
        return words
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise TranscriptError(f"{path}: not a Full-Duplex-Bench output.json ({exc})") from exc


def write_words(path: Path, words: list[Word]) -> None:
    data = {"text": " ".join(w.text for w in words),
            "chunks": [{"text": w.text, "timestamp": [w.start, w.end]} for w in words]}
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


@dataclass(frozen=True)
class Speech:
    """The agent's speech in one output: (start, end) spans in seconds, in order."""

    spans: tuple[tuple[float, float], ...]
    are_words: bool  # True: ASR words (the word-count rule applies); False: VAD segments

    @classmethod
    def from_words(cls, words: list[Word]) -> Speech:
        return cls(tuple((w.start, w.end) for w in words), True)

    @classmethod
    def from_segments(cls, segments: list[tuple[float, float]]) -> Speech:
        return cls(tuple(segments), False)

    @property
    def start(self) -> float | None:
        return self.spans[0][0] if self.spans else None

    @property
    def duration(self) -> float:
        return self.spans[-1][1] - self.spans[0][0] if self.spans else 0.0

    def took_turn(self) -> bool:
        if not self.spans:
            return False
        return self.duration >= TURN_SECONDS or (self.are_words and len(self.spans) > TURN_WORDS)

    def count_in(self, start: float, end: float) -> int:
        """Spans that touch [start, end] (the backchannel scorer's three overlap cases)."""
        return sum(1 for s, e in self.spans
                   if (s >= start and e <= end) or (s <= end < e) or (s <= start < e))
