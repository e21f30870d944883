"""The recogniser's training sentences, and the sentences it must never have heard.

`project_sentences()` gathers every Telugu sentence the agent and the codec are trained or scored on:
assets/telugu_sentences.txt (script, synth, telugu-tiny's split), every Telugu string of
assets/dialogue/scenes.json and assets/catalogue.json (greetings with each voice's name filled in,
topics, backchannels), synth's voice-prompt sentence, the evaluation set's utterances
(agent.eval.evalset) and agent.audio.espeak's test speech. Each text counts whole and split at its
sentence ends.

`generate(n, seed)` draws sentences of 2-6 words from assets/asr/telugu_words.txt (a vocabulary
written for this recogniser) mixed with pseudo-words built from random Telugu syllables, so every
letter and many conjuncts occur and the model learns sounds, not a phrase book. A draw that equals,
contains or lies inside a project sentence is rejected (`overlaps`); `assert_disjoint` proves it for a
whole list. Words are shared with the project's sentences (a language has one vocabulary); sentences
are not.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from functools import lru_cache

from agent import ASSETS
from agent.eval.ctc.alphabet import clean

WORDS = ASSETS / "asr" / "telugu_words.txt"
SENTENCE_END = re.compile(r"(?<=[.?!।])\s+")
RARE_OR_UNASSIGNED = (0x0C19, 0x0C1E, 0x0C29, 0x0C31, 0x0C34)
CONSONANTS = [chr(c) for c in range(0x0C15, 0x0C3A) if c not in RARE_OR_UNASSIGNED]
VOWELS = list("అఆఇఈఉఊఋఎఏఐఒఓఔ")
VOWEL_SIGNS = ["", "", "ా", "ా", "ి", "ీ", "ు", "ు", "ూ", "ృ", "ె", "ే", "ై", "ొ", "ో", "ౌ"]  # common ones twice
VIRAMA, ANUSVARA, VISARGA = "్", "ం", "ః"
PSEUDO_SHARE = 0.3  # of the words in a generated sentence


def _telugu_strings(value: object) -> Iterable[str]:
    if isinstance(value, str):
        if re.search("[\u0c00-\u0c7f]", value):
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _telugu_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _telugu_strings(v)


def _with_names(texts: Iterable[str], names: list[str]) -> list[str]:
    out = []
    for t in texts:
        out.extend(t.replace("{name_te}", n).replace("{name}", n) for n in names) if "{name" in t else out.append(t)
    return out


@lru_cache(maxsize=1)
def project_sentences() -> frozenset[str]:
    """Every sentence the project trains or scores the agent and the codec on, cleaned (alphabet.clean)."""
    from agent.audio.espeak import TELUGU_TEXT
    from agent.eval import evalset
    from agent.train.synth import PROMPT_TEXT
    catalogue = json.loads((ASSETS / "catalogue.json").read_text(encoding="utf-8"))
    names = [v["name_te"] for v in catalogue["voices"]]
    texts = [line for line in (ASSETS / "telugu_sentences.txt").read_text(encoding="utf-8").splitlines()]
    texts += _with_names(_telugu_strings(json.loads((ASSETS / "dialogue" / "scenes.json").read_text("utf-8"))), names)
    texts += list(_telugu_strings(catalogue))
    texts += _with_names([PROMPT_TEXT], names) + [TELUGU_TEXT, "ఊ"]
    texts += [*evalset.QUESTIONS, *evalset.INTERRUPTIONS, *evalset.MONOLOGUE, " ".join(evalset.MONOLOGUE)]
    texts += [part for pair in evalset.PAUSED for part in (*pair, " ".join(pair))]
    pieces = {clean(p) for t in texts for p in [t, *SENTENCE_END.split(t)]}
    return frozenset(p for p in pieces if p)


def overlaps(sentence: str, sources: frozenset[str] | None = None) -> str | None:
    """The project sentence that `sentence` equals, contains (if it has 2+ words) or lies inside; else None."""
    mine = clean(sentence)
    for source in project_sentences() if sources is None else sources:
        if mine == source or mine in source or (" " in source and source in mine):
            return source
    return None


def assert_disjoint(sentences: Iterable[str]) -> None:
    for s in sentences:
        hit = overlaps(s)
        if hit is not None:
            raise AssertionError(f"recogniser sentence {s!r} meets the project's sentence {hit!r}")


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    return tuple(dict.fromkeys(WORDS.read_text(encoding="utf-8").split()))


def pseudo_word(rng: random.Random) -> str:
    """1-4 random syllables: an optional leading vowel, consonants (sometimes a conjunct) with vowel signs."""
    parts = [rng.choice(VOWELS)] if rng.random() < 0.2 else []
    for _ in range(rng.randint(1, 4) - len(parts)):
        onset = rng.choice(CONSONANTS)
        if rng.random() < 0.2:
            onset += VIRAMA + rng.choice(CONSONANTS)
        parts.append(onset + rng.choice(VOWEL_SIGNS))
    coda = rng.random()
    tail = ANUSVARA if coda < 0.15 else VISARGA if coda < 0.17 else ""
    return "".join(parts) + tail


def draw(rng: random.Random) -> str:
    words = [pseudo_word(rng) if rng.random() < PSEUDO_SHARE else rng.choice(vocabulary())
             for _ in range(rng.randint(2, 6))]
    if len(words) > 4 and rng.random() < 0.3:
        words[rng.randrange(1, len(words) - 1)] += ","
    return " ".join(words) + rng.choice([".", ".", "?", "!", ""])


def generate(n: int, seed: int, exclude: Iterable[str] = ()) -> list[str]:
    """`n` distinct sentences, none overlapping a project sentence nor equal to one in `exclude`."""
    rng, seen, out = random.Random(f"asr-sentences/{seed}"), {clean(s) for s in exclude}, []
    while len(out) < n:
        s = draw(rng)
        key = clean(s)
        if key not in seen and overlaps(s) is None:
            seen.add(key)
            out.append(s)
    return out


def unseen(n: int, seed: int, train_count: int, train_seed: int) -> list[str]:
    """`n` generated sentences that the recogniser trained with (`train_count`, `train_seed`) never heard."""
    return generate(n, seed, exclude=generate(train_count, train_seed))
