"""How intelligible a codec keeps speech: CER of a recogniser on espeak-ng clips before and after a
codec's round trip (encode + decode through every codebook).

Contract: `codec_cer(mimi, transcriber, sentences)` speaks each sentence in the agent voices (one voice
each, in turn: agent.train.telugu_tiny.spoken_clips), transcribes the clean clip and the codec's
reconstruction, and returns both corpus CERs/WERs with each transcript. The clean figure is the
recogniser's own floor on that speech: a round-trip figure means something only beside it.
"""

from __future__ import annotations

from dataclasses import asdict

from agent import SAMPLE_RATE
from agent.eval.asr import Transcriber
from agent.eval.intelligibility import error_rates


def _heard(transcriber: Transcriber, audio) -> str:
    return " ".join(w.text for w in transcriber.words(audio, SAMPLE_RATE))


def codec_cer(mimi, transcriber: Transcriber, sentences: list[str]) -> dict:
    from agent.train.codec import reconstruct
    from agent.train.telugu_tiny import spoken_clips
    clips = spoken_clips(sentences)
    clean = [_heard(transcriber, c) for c in clips]
    coded = [_heard(transcriber, reconstruct(mimi, c)) for c in clips]
    return {"asr": transcriber.name, "n": len(sentences),
            "clean": asdict(error_rates(sentences, clean)), "round_trip": asdict(error_rates(sentences, coded)),
            "samples": [{"reference": s, "clean": a, "round_trip": b} for s, a, b in zip(sentences, clean, coded)]}
