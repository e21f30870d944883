"""Telugu characters as CTC labels: blank = 0, space = 1, then U+0C00-U+0C7F.

`labels(text)` keeps what espeak-ng says aloud and the recogniser can write: the text normalised as
the intelligibility scorer does (NFC, punctuation dropped, spaces collapsed), with anything outside the
Telugu block and space removed. `text(ids)` is its inverse for a label sequence.
"""

from __future__ import annotations

from agent.eval.intelligibility import normalise

BLANK = 0
SPACE = 1
FIRST, LAST = 0x0C00, 0x0C7F
SIZE = 2 + LAST - FIRST + 1  # blank, space, the block


def is_telugu(char: str) -> bool:
    return FIRST <= ord(char) <= LAST


def clean(text: str) -> str:
    """What the recogniser should write for `text`: normalised, Telugu block and single spaces only."""
    kept = "".join(c if is_telugu(c) or c == " " else " " for c in normalise(text))
    return " ".join(kept.split())


def labels(text: str) -> list[int]:
    return [SPACE if c == " " else 2 + ord(c) - FIRST for c in clean(text)]


def text(ids: list[int]) -> str:
    return "".join(" " if i == SPACE else chr(FIRST + i - 2) for i in ids if i != BLANK)
