"""Stage 4, align: word-level timestamps for the agent's speech, in moshi-finetune's shape
-> align/data/<id>.wav + <id>.json, align/train.jsonl (moshi-finetune's dataset list) and
align/manifest.jsonl (AlignedRecord).

moshi-finetune (github.com/kyutai-labs/moshi-finetune) reads, next to each stereo WAV, a JSON
`{"alignments": [[word, [start, end], "SPEAKER_MAIN"], ...]}` sorted by start (its annotate.py writes
exactly this from Whisper on the LEFT channel), and builds its Interleaver with keep_main_only=True:
only words labelled with the main speaker become the text stream, each placed at its start frame.
So we write the agent's words only, labelled SPEAKER_MAIN. `include_user_words` adds the user's words
under another label (moshi-finetune then drops them; a trainer with BOS/EOS turn markers can use them).
`text_conditions` (off by default) adds {"speaker": voice, "emotion": ...} for a conditioned model;
stock moshi-finetune would hand that dict to a model without conditioners, so it stays opt-in.

Word times, in order of preference:
1. given word timings (from the source manifest, carried through every stage): used as they are;
2. an `Aligner` (a Protocol: plug in a real Telugu ASR/forced aligner with --aligner module:Class);
3. the default ProportionalAligner: an APPROXIMATION - the transcript's words are laid over the turn's
   voiced regions (Silero VAD) in proportion to their letter counts. Word starts land inside speech and
   in the right order, but each can be off by a syllable or more; good enough for moshi-finetune's
   start-frame placement at 80 ms per frame on short turns, not a substitute for forced alignment.
"""

from __future__ import annotations

import importlib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from agent import SAMPLE_RATE
from agent.train.common import (
    StageRun,
    Summary,
    UsageError,
    atomic_write_json,
    atomic_write_text,
    fingerprint,
    link_or_copy,
    parallel_map,
    progress,
    read_audio_checked,
)
from agent.train.records import AGENT, USER, AlignedRecord, DialogueRecord, Span, Turn, Word, from_dict, to_dict
from agent.voices import EMOTION, SPEAKER

MAIN_SPEAKER = "SPEAKER_MAIN"  # moshi-finetune's Interleaver main_speaker_label default
OTHER_SPEAKER = "SPEAKER_OTHER"
TRAIN_LIST = "train.jsonl"


@runtime_checkable
class Aligner(Protocol):
    """Word timings for a transcript spoken in `audio` (mono, `sample_rate`).

    `speech` lists the voiced regions (seconds, within `audio`) the VAD found. Return the transcript's
    words with start/end in seconds within `audio`, in order. Raise ValueError when it cannot align.
    """

    name: str

    def align(self, audio: np.ndarray, sample_rate: int, transcript: str, speech: Sequence[Span]) -> list[Word]: ...


def _weight(word: str) -> int:
    # Letters and combining marks (Telugu vowel signs, viramas) approximate spoken length; punctuation does not.
    return max(1, sum(1 for ch in word if unicodedata.category(ch)[0] in "LMN"))


class ProportionalAligner:
    """Spreads the words over the voiced regions in proportion to their letter counts (an approximation)."""

    name = "proportional"

    def align(self, audio: np.ndarray, sample_rate: int, transcript: str, speech: Sequence[Span]) -> list[Word]:
        words = transcript.split()
        if not words:
            return []
        regions = [(float(a), float(b)) for a, b in speech if b > a] or [(0.0, audio.shape[0] / sample_rate)]
        total = sum(b - a for a, b in regions)
        weights = [_weight(w) for w in words]
        scale = total / sum(weights)
        bounds = np.cumsum([0.0, *(w * scale for w in weights)])  # word edges on the voiced-only time axis
        starts = np.cumsum([0.0, *(b - a for a, b in regions)])  # where each region begins on that axis

        def locate(x: float, closing: bool) -> tuple[int, float]:
            # Region index and real time; a closing edge exactly at a region's end stays in that region.
            index = int(np.searchsorted(starts, x, side="left" if closing else "right")) - 1
            index = min(max(index, 0), len(regions) - 1)
            return index, regions[index][0] + (x - starts[index])

        out = []
        for word, lo, hi in zip(words, bounds[:-1], bounds[1:]):
            i, start = locate(float(lo), closing=False)
            j, end = locate(float(hi), closing=True)
            if j != i:  # the word straddles a pause: keep it in the region holding most of it
                if regions[i][1] - start >= end - regions[j][0]:
                    end = regions[i][1]
                else:
                    start = regions[j][0]
            out.append(Word(word, round(start, 3), round(max(end, start + 0.001), 3)))
        return out


def load_aligner(spec: str) -> Aligner:
    if spec in ("", "proportional"):
        return ProportionalAligner()
    module_name, _, class_name = spec.partition(":")
    if not class_name:
        raise UsageError(f"--aligner must be 'proportional' or 'module:Class', got {spec!r}")
    try:
        aligner = getattr(importlib.import_module(module_name), class_name)()
    except (ImportError, AttributeError, TypeError) as exc:
        raise UsageError(f"cannot load aligner {spec!r}: {exc}") from exc
    if not isinstance(aligner, Aligner):
        raise UsageError(f"{spec!r} is not an Aligner (needs .name and .align(audio, sample_rate, transcript, speech))")
    return aligner


@dataclass
class AlignConfig:
    inp: Path  # dialogues' manifest.jsonl
    out: Path
    aligner: str = "proportional"
    include_user_words: bool = False
    text_conditions: bool = False
    workers: int = 1
    ray: str | None = None  # local | auto | a Ray address
    force: bool = False
    quiet: bool = False

    def settings(self) -> dict:
        return {"aligner": self.aligner, "include_user_words": self.include_user_words,
                "text_conditions": self.text_conditions}


def _align_span(aligner: Aligner, channel: np.ndarray, transcript: str, start: float, end: float,
                speech: list[Span]) -> list[Word]:
    """Run the aligner on the [start, end] slice of one channel; words come back in dialogue time."""
    a, b = int(round(start * SAMPLE_RATE)), int(round(end * SAMPLE_RATE))
    local = [[max(x, start) - start, min(y, end) - start] for x, y in speech if min(y, end) > max(x, start)]
    words = aligner.align(channel[a:b], SAMPLE_RATE, transcript, local)
    return [w.shifted(start) for w in words]


def _valid(words: list[Word], duration: float) -> list[Word]:
    return [w for w in words if 0 <= w.start < w.end <= duration + 1e-3 and w.text.strip()]


def align_dialogue(record: DialogueRecord, audio: np.ndarray, aligner: Aligner,
                   config: AlignConfig) -> tuple[list[list], dict[str, int], str | None]:
    """(alignments, words per method, reason to skip)."""
    methods: dict[str, int] = {}
    entries: list[tuple[Word, str]] = []
    agent_turns = [t for t in record.turns if t.role == AGENT]
    untranscribed = [t for t in agent_turns if not t.words and not t.transcript]
    roles = [AGENT, USER] if config.include_user_words else [AGENT]
    for role in roles:
        channel = audio[:, 0 if role == AGENT else 1]
        label = MAIN_SPEAKER if role == AGENT else OTHER_SPEAKER
        turns: list[Turn] = [t for t in record.turns if t.role == role]
        if role == AGENT and untranscribed:
            if not record.agent_transcript:
                t = untranscribed[0]
                return [], methods, (f"agent speech without transcript: turn at {t.start:.2f}-{t.end:.2f} s "
                                     "(its text would be trained as silence)")
            # A conversation with one transcript for the whole agent side: align it over all agent speech.
            speech = [r for t in turns for r in t.speech]
            try:
                words = _align_span(aligner, channel, record.agent_transcript, 0.0, record.duration, speech)
            except ValueError as exc:
                return [], methods, f"aligner {aligner.name} failed: {exc}"
            methods[aligner.name] = methods.get(aligner.name, 0) + len(words)
            entries += [(w, label) for w in words]
            continue
        for turn in turns:
            if turn.words:
                words, method = turn.words, "given"
            elif turn.transcript:
                try:
                    words = _align_span(aligner, channel, turn.transcript, turn.start, turn.end,
                                        turn.speech or [[turn.start, turn.end]])
                except ValueError as exc:
                    if role == AGENT:
                        return [], methods, f"aligner {aligner.name} failed on turn at {turn.start:.2f} s: {exc}"
                    continue
                method = aligner.name
            else:
                continue  # a user turn without text: nothing to write, nothing lost
            if role == USER:
                method = f"user:{method}"
            methods[method] = methods.get(method, 0) + len(words)
            entries += [(w, label) for w in words]
    kept = _valid([w for w, _ in entries], record.duration)
    if len(kept) < len(entries):
        methods["dropped_out_of_range"] = len(entries) - len(kept)
    labels = {id(w): label for w, label in entries}
    alignments = [[w.text, [w.start, w.end], labels[id(w)]] for w in sorted(kept, key=lambda w: (w.start, w.end))]
    if not any(a[2] == MAIN_SPEAKER for a in alignments):
        return [], methods, "no agent words to train on"
    return alignments, methods, None


_ALIGNERS: dict[str, Aligner] = {}


def align_item(job: tuple[dict, AlignConfig]) -> tuple[str, object]:
    """One dialogue -> ("ok", AlignedRecord dict) with its files written, or ("skip", reason); runs wherever
    parallel_map puts it (the aligner is loaded once per process)."""
    record_dict, config = job
    record = from_dict(DialogueRecord, record_dict)
    if config.aligner not in _ALIGNERS:
        _ALIGNERS[config.aligner] = load_aligner(config.aligner)
    in_dir, out = Path(config.inp).parent, Path(config.out)
    try:
        audio = read_audio_checked(in_dir / record.path, SAMPLE_RATE, 2)
    except ValueError as exc:
        return "skip", str(exc)
    alignments, methods, reason = align_dialogue(record, audio, _ALIGNERS[config.aligner], config)
    if reason is not None:
        return "skip", reason
    conditions = {SPEAKER: record.agent_voice or record.agent_speaker}
    if record.emotion:
        conditions[EMOTION] = record.emotion
    data: dict = {"alignments": alignments}
    if config.text_conditions:
        data["text_conditions"] = conditions
    wav, js = out / "data" / f"{record.id}.wav", out / "data" / f"{record.id}.json"
    link_or_copy(in_dir / record.path, wav)
    atomic_write_json(js, data)
    return "ok", to_dict(AlignedRecord(
        id=record.id, path=f"data/{record.id}.wav", alignment=f"data/{record.id}.json", duration=record.duration,
        agent_speaker=record.agent_speaker, agent_voice=record.agent_voice, emotion=record.emotion,
        licences=record.licences, n_words=sum(1 for a in alignments if a[2] == MAIN_SPEAKER), methods=methods,
        text_conditions=conditions))


def run_align(config: AlignConfig) -> Summary:
    run = StageRun("align", config.out, config.force, config.quiet)
    out, report = run.out, run.report
    dialogues = run.read(config.inp, DialogueRecord)
    _ALIGNERS[config.aligner] = load_aligner(config.aligner)  # a bad --aligner stops the run before any item
    jobs = [(r, sig) for r in dialogues
            if not run.reuse(r.id, sig := fingerprint(to_dict(r), config.settings()), AlignedRecord)]
    results = parallel_map(align_item, [(to_dict(r), config) for r, _ in jobs], config.workers, ray=config.ray)
    for (record, signature), (status, value) in progress(zip(jobs, results), "align", total=len(jobs),
                                                          quiet=config.quiet):
        if status == "skip":
            report.skip(record.id, f"{record.road} dialogue {record.path}", str(value))
            continue
        aligned = from_dict(AlignedRecord, value)
        run.keep(record.id, signature, aligned, [out / aligned.path, out / aligned.alignment])
    order = {r.id: n for n, r in enumerate(dialogues)}
    run.records.sort(key=lambda r: order[r.id])  # the input's order, however many were reused
    # moshi-finetune's dataset list: {"path", "duration"} per line, paths relative to this file's folder
    # (the layout of kyutai/DailyTalkContiguous); point its `train_data` at this file.
    import json
    atomic_write_text(out / TRAIN_LIST, "".join(json.dumps({"path": r.path, "duration": r.duration}) + "\n"
                                                for r in run.records))
    return run.finish()
