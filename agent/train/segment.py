"""Stage 2, segment: Silero VAD (16 kHz) cuts each ingested file into utterances with padding and
min/max duration filters -> segments/manifest.jsonl (SegmentRecord per utterance).

Transcripts follow the audio only where the data says how to split them:
- per-segment transcripts given (`segments` in the source row): those stretches are the utterances;
- word timings given (`words`): VAD utterances, each with the words whose midpoint falls inside it;
- one transcript for the whole file: the file is kept as ONE utterance (first to last speech, padded),
  so the transcript stays true; if that is longer than `max_duration` the file is cut by the VAD and the
  pieces carry no transcript (they can still be the user side of a dialogue) - reported as a note;
- no transcript: VAD utterances without text (user-side material).
Every record also lists its finer voiced regions (`speech`, pauses of `region_gap_ms` or more split
them), which the align stage uses to place words. A two-speaker recording is not cut (its timing is the
training signal): it is passed through with the voiced regions of both channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agent import SAMPLE_RATE
from agent.audio.stream import resample
from agent.train.common import (
    ItemReport,
    StageRun,
    Summary,
    atomic_write_wav,
    fingerprint,
    link_or_copy,
    parallel_map,
    progress,
    read_audio_checked,
    torch_threads,
)
from agent.train.records import CONVERSATION, AudioRecord, SegmentRecord, Span, Word, from_dict, to_dict

VAD_RATE = 16_000  # Silero's full-band rate; offline we can afford it (the live path uses 8 kHz)


@dataclass
class SegmentConfig:
    inp: Path  # ingest's manifest.jsonl
    out: Path
    threshold: float = 0.5  # Silero speech probability
    min_duration: float = 0.3  # shorter utterances are dropped (a note each); backchannels are ~0.3-1 s
    max_duration: float = 15.0  # longer speech is split by the VAD at its longest pauses
    pad_ms: int = 150  # silence kept around each utterance (less where the next one is closer)
    utterance_gap_ms: int = 400  # a pause this long ends an utterance
    region_gap_ms: int = 100  # a pause this long splits voiced regions (for word placement)
    min_speech_ms: int = 120  # shorter voiced blips are ignored
    workers: int = 1
    ray: str | None = None  # local | auto | a Ray address
    force: bool = False
    quiet: bool = False

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in ("threshold", "min_duration", "max_duration", "pad_ms",
                                              "utterance_gap_ms", "region_gap_ms", "min_speech_ms")}


class SileroRegions:
    """Speech probabilities once per channel, then voiced regions at any grouping (seconds)."""

    def __init__(self, config: SegmentConfig):
        from agent.calls.vad import load_silero_package
        self.config = config
        self.model = load_silero_package()

    @torch.no_grad()
    def probabilities(self, audio: np.ndarray) -> tuple[list[float], int]:
        x = resample(audio, SAMPLE_RATE, VAD_RATE)
        if x.size == 0:
            return [], 0
        probs = self.model.audio_forward(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), VAD_RATE)
        return probs[0].tolist(), int(x.size)

    def regions(self, probs: list[float], n_samples: int, gap_ms: int, pad_ms: int,
                max_speech_s: float = math.inf) -> list[Span]:
        from silero_vad import get_speech_timestamps_from_probs
        if not probs:
            return []
        found = get_speech_timestamps_from_probs(
            probs, sampling_rate=VAD_RATE, threshold=self.config.threshold,
            min_speech_duration_ms=self.config.min_speech_ms, max_speech_duration_s=max_speech_s,
            min_silence_duration_ms=gap_ms, speech_pad_ms=pad_ms, return_seconds=True, time_resolution=3,
            audio_length_samples=n_samples)
        return [[float(t["start"]), float(t["end"])] for t in found if t["end"] > t["start"]]


def _inside(regions: list[Span], start: float, end: float) -> list[Span]:
    """The parts of `regions` within [start, end], shifted to start at 0."""
    out = []
    for a, b in regions:
        a2, b2 = max(a, start), min(b, end)
        if b2 - a2 > 0.01:
            out.append([round(a2 - start, 3), round(b2 - start, 3)])
    return out


def _words_in(words: list[Word] | None, start: float, end: float) -> list[Word]:
    return [w.shifted(-start) for w in (words or []) if start <= w.mid < end]


def _plan_utterance(record: AudioRecord, fine: list[Span], utterances: list[Span], duration: float,
                    config: SegmentConfig,
                    report: ItemReport) -> list[tuple[float, float, str | None, str | None, list[Word] | None, str]]:
    """(start, end, transcript, scope, words, emotion) for each utterance to cut from one file."""
    pad = config.pad_ms / 1000
    plans = []
    if record.segments:
        for i, given in enumerate(record.segments):
            before = record.segments[i - 1].end if i else 0.0
            after = record.segments[i + 1].start if i + 1 < len(record.segments) else duration
            start = max(given.start - pad, (before + given.start) / 2 if i else 0.0, 0.0)
            end = min(given.end + pad, (given.end + after) / 2 if i + 1 < len(record.segments) else duration, duration)
            if not _inside(fine, start, end):
                report.note(record.id, record.source,
                            f"given segment {given.start:.2f}-{given.end:.2f} s has no speech: dropped")
                continue
            plans.append((start, end, given.transcript, "segment" if given.transcript else None,
                          _words_in(record.words, start, end) or None, given.emotion or record.emotion))
        return plans
    if record.transcript and not record.words:
        start, end = max(fine[0][0] - pad, 0.0), min(fine[-1][1] + pad, duration)
        if end - start <= config.max_duration:
            # One transcript, no timings: it cannot be split, so the file stays one utterance.
            return [(start, end, record.transcript, "file", None, record.emotion)]
        report.note(record.id, record.source, f"transcript not split: {end - start:.1f} s of speech is over "
                    f"max_duration {config.max_duration:.0f} s and has no word timings or per-segment transcripts; "
                    "the pieces are kept without text (user-side material)")
    assigned = 0
    for start, end in utterances:
        words = _words_in(record.words, start, end) if record.words else []
        assigned += len(words)
        transcript = " ".join(w.text for w in words) or None
        plans.append((start, end, transcript, "segment" if transcript else None, words or None, record.emotion))
    if record.words and assigned < len(record.words):
        report.note(record.id, record.source, f"{len(record.words) - assigned} given words fall outside any "
                    "speech segment and were dropped")
    return plans


def _segment_file(record: AudioRecord, in_dir: Path, config: SegmentConfig, vad: SileroRegions,
                  report: ItemReport) -> list[SegmentRecord] | None:
    try:
        audio = read_audio_checked(in_dir / record.path, SAMPLE_RATE, record.channels)
    except ValueError as exc:
        report.skip(record.id, record.source, str(exc))
        return None
    out = Path(config.out)
    duration = audio.shape[0] / SAMPLE_RATE
    gap = config.region_gap_ms
    if record.kind == CONVERSATION:
        fine = []
        for channel in range(2):
            probs, n = vad.probabilities(audio[:, channel])
            fine.append(vad.regions(probs, n, gap, 30))
        if not fine[0]:
            report.skip(record.id, record.source, "no speech found by the VAD on the agent channel")
            return None
        rel = f"audio/{record.id}-conv.wav"
        link_or_copy(in_dir / record.path, out / rel)  # not cut: the conversation's own timing is the signal
        return [SegmentRecord(
            id=f"{record.id}-conv", parent_id=record.id, path=rel, duration=round(duration, 4), kind=record.kind,
            speaker=record.speaker, emotion=record.emotion, licence=record.licence, source=record.source,
            start=0.0, end=round(duration, 4), speech=fine[0],
            transcript=record.transcript, transcript_scope="file" if record.transcript else None,
            words=record.words, user_speech=fine[1], user_speaker=record.user_speaker or "unknown",
            user_transcript=record.user_transcript, gender=record.gender)]
    mono = audio[:, 0]
    probs, n = vad.probabilities(mono)
    fine = vad.regions(probs, n, gap, 30)
    if not fine:
        report.skip(record.id, record.source, "no speech found by the VAD")
        return None
    utterances = vad.regions(probs, n, config.utterance_gap_ms, config.pad_ms, config.max_duration)
    segments = []
    for index, (start, end, transcript, scope, words, emotion) in enumerate(
            _plan_utterance(record, fine, utterances, duration, config, report)):
        length = end - start
        seg_id = f"{record.id}-s{index:03d}"
        if length < config.min_duration or length > config.max_duration + 2 * config.pad_ms / 1000:
            report.note(seg_id, record.source, f"segment of {length:.2f} s outside {config.min_duration:.2f}-"
                        f"{config.max_duration:.0f} s: dropped")
            continue
        a, b = int(round(start * SAMPLE_RATE)), int(round(end * SAMPLE_RATE))
        rel = f"audio/{seg_id}.wav"
        atomic_write_wav(out / rel, mono[a:b], SAMPLE_RATE)
        segments.append(SegmentRecord(
            id=seg_id, parent_id=record.id, path=rel, duration=round((b - a) / SAMPLE_RATE, 4), kind=record.kind,
            speaker=record.speaker, emotion=emotion, licence=record.licence, source=record.source,
            start=round(start, 3), end=round(end, 3), speech=_inside(fine, start, end), transcript=transcript,
            transcript_scope=scope, words=words, gender=record.gender))
    if not segments:
        report.skip(record.id, record.source, "no utterance within the duration limits")
        return None
    return segments


_VAD: dict[tuple, SileroRegions] = {}


def segment_item(job: tuple[dict, SegmentConfig]) -> tuple[str, object]:
    """One ingested file -> ("ok", {"segments", "report"}) with its clips written; segments None when the
    file was skipped (the report says why). ("skip", reason) comes only from parallel_map, for an item
    that failed on Ray. Runs wherever parallel_map puts it (Silero loaded once per process, one thread)."""
    record_dict, config = job
    record = from_dict(AudioRecord, record_dict)
    key = tuple(config.settings().items())
    if key not in _VAD:
        _VAD[key] = SileroRegions(config)
    report = ItemReport()
    with torch_threads(1):
        segments = _segment_file(record, Path(config.inp).parent, config, _VAD[key], report)
    return "ok", {"segments": None if segments is None else [to_dict(s) for s in segments], "report": list(report)}


def run_segment(config: SegmentConfig) -> Summary:
    run = StageRun("segment", config.out, config.force, config.quiet)
    inputs = run.read(config.inp, AudioRecord)
    in_dir = Path(config.inp).parent
    jobs = []
    for record in inputs:
        source_file = in_dir / record.path
        stat = source_file.stat() if source_file.is_file() else None
        signature = fingerprint(to_dict(record), [stat.st_size, stat.st_mtime_ns] if stat else None, config.settings())
        if not run.reuse(record.id, signature, SegmentRecord):
            jobs.append((record, signature))
    results = parallel_map(segment_item, [(to_dict(r), config) for r, _ in jobs], config.workers, ray=config.ray)
    for (record, signature), (status, value) in progress(zip(jobs, results), "segment", total=len(jobs),
                                                          quiet=config.quiet):
        if status == "skip":  # failed on Ray after retries: the reason is Ray's failure line
            run.report.skip(record.id, record.path, str(value))
            continue
        run.start_item()
        ItemReport(value["report"]).replay(run.report)
        if value["segments"] is not None:
            segments = [from_dict(SegmentRecord, s) for s in value["segments"]]
            run.keep(record.id, signature, segments, [run.out / s.path for s in segments])
    order = {r.id: n for n, r in enumerate(inputs)}
    run.records.sort(key=lambda r: order[r.parent_id])  # the input's order, however many were reused
    return run.finish()
