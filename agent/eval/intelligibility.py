"""Intelligibility: character and word error rates of what the agent says, through a Telugu ASR.

Contract: `error_rates(references, hypotheses)` -> `ErrorRates` (corpus CER and WER by jiwer: total
edits over total reference characters/words, not a mean of per-sample rates). Both sides are
normalised first (`normalise`): Unicode NFC, lower case, punctuation and symbols dropped, spaces
collapsed. Telugu vowel signs and viramas are combining marks, which Python's `\\w` does not match
(FDB's `remove_punctuation` would strip them), so punctuation is found by Unicode category instead.
CER counts Unicode code points, as Indic ASR papers do.

`transcribe_set(samples, transcriber)` transcribes each sample's output.wav and pairs it with its
reference: `reference.txt` in the folder if present (what the agent was meant to say), else the
agent's own text stream `output.txt` (what Moshi's inner monologue says it said, written by `run`),
which makes the figure "does its speech say what its text says", the TTS-style measure.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

from agent.eval.asr import Transcriber
from agent.eval.layout import EvalDataError, Sample, read_audio

REFERENCE = "reference.txt"
AGENT_TEXT = "output.txt"


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFC", text).lower()
    kept = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
    return " ".join(kept.split())


@dataclass
class ErrorRates:
    cer: float | None
    wer: float | None
    n: int  # samples with a non-empty reference
    skipped: int = 0  # samples whose reference was empty after normalising


def error_rates(references: list[str], hypotheses: list[str]) -> ErrorRates:
    import jiwer
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(normalise(r), normalise(h)) for r, h in zip(references, hypotheses)]
    kept = [(r, h) for r, h in pairs if r]
    if not kept:
        return ErrorRates(None, None, 0, len(pairs))
    refs, hyps = [r for r, _ in kept], [h for _, h in kept]
    return ErrorRates(float(jiwer.cer(refs, hyps)), float(jiwer.wer(refs, hyps)), len(kept), len(pairs) - len(kept))


@dataclass
class Transcript:
    name: str
    reference: str
    reference_from: str
    hypothesis: str


@dataclass
class SetIntelligibility:
    rates: ErrorRates
    backend: str
    samples: list[Transcript] = field(default_factory=list)


def reference_of(sample: Sample) -> tuple[str, str]:
    for name in (REFERENCE, AGENT_TEXT):
        path = sample.folder / name
        if path.exists():
            return path.read_text(encoding="utf-8").strip(), name
    raise EvalDataError(f"{sample.folder}: no {REFERENCE} or {AGENT_TEXT} to compare the agent's speech with")


def transcribe_set(samples: list[Sample], transcriber: Transcriber) -> SetIntelligibility:
    rows = []
    for sample in samples:
        if not sample.output.exists():
            raise EvalDataError(f"{sample.folder}: no output.wav (run `python -m agent.eval run` first)")
        reference, source = reference_of(sample)
        audio, rate = read_audio(sample.output)
        words = transcriber.words(audio, rate)
        rows.append(Transcript(sample.name, reference, source, " ".join(w.text for w in words)))
    rates = error_rates([r.reference for r in rows], [r.hypothesis for r in rows])
    return SetIntelligibility(rates, transcriber.name, rows)


def format_table(result: SetIntelligibility) -> str:
    r = result.rates

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    return (f"{'n':>5}{'CER ↓':>10}{'WER ↓':>10}   ASR\n"
            f"{r.n:>5}{fmt(r.cer):>10}{fmt(r.wer):>10}   {result.backend}"
            + (f"   ({r.skipped} with an empty reference left out)" if r.skipped else ""))
