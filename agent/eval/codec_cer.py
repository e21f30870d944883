"""How intelligible a codec keeps speech: CER of a recogniser on espeak-ng clips before and after a
codec's round trip (encode + decode through every codebook).

Contract: `codec_cer(mimi, transcriber, sentences, voices=None)` speaks each sentence (without `voices`:
in the agent voices, one voice each, in turn: agent.train.telugu_tiny.spoken_clips; with `voices`, e.g.
("te", "te+m8"): in every one of those espeak-ng voices), transcribes the clean clip and the codec's
reconstruction, and returns both corpus CERs/WERs (per voice too, with `voices`) with each transcript.
The clean figure is the recogniser's own floor on that speech: a round-trip figure means something only
beside it. Voices the codec never trained on are the check that it codes speech, not its own voices.
"""

from __future__ import annotations

from dataclasses import asdict

from agent import SAMPLE_RATE
from agent.eval.asr import Transcriber
from agent.eval.intelligibility import error_rates


def _heard(transcriber: Transcriber, audio) -> str:
    return " ".join(w.text for w in transcriber.words(audio, SAMPLE_RATE))


def _rates(references: list[str], clean: list[str], coded: list[str]) -> dict:
    return {"clean": asdict(error_rates(references, clean)), "round_trip": asdict(error_rates(references, coded))}


def codec_cer(mimi, transcriber: Transcriber, sentences: list[str], voices: tuple[str, ...] | None = None) -> dict:
    from agent.train.codec import reconstruct
    if voices:
        from agent.eval.speech import speak
        items = [(s, v) for v in voices for s in sentences]
        clips = [speak(s, v, SAMPLE_RATE).astype("float32") for s, v in items]
    else:
        from agent.train.telugu_tiny import spoken_clips
        items, clips = [(s, None) for s in sentences], spoken_clips(sentences)
    references = [s for s, _ in items]
    clean = [_heard(transcriber, c) for c in clips]
    coded = [_heard(transcriber, reconstruct(mimi, c)) for c in clips]
    result = {"asr": transcriber.name, "n": len(sentences), **_rates(references, clean, coded),
              "samples": [{"reference": s, **({"voice": v} if v else {}), "clean": a, "round_trip": b}
                          for (s, v), a, b in zip(items, clean, coded)]}
    if voices:
        result["voices"] = {v: _rates(*zip(*[(s, a, b) for (s, w), a, b in zip(items, clean, coded) if w == v]))
                            for v in voices}
    return result
