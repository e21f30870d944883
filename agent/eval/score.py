"""Scoring a folder of input.wav/output.wav pairs the way Full-Duplex-Bench does.

Contract: `score(root, task, transcriber=None)` -> `TaskScore` (summary figures + one row per
sample). Where the agent's speech comes from, per sample, first found wins:
1. a `transcriber` (agent.eval.asr): words with times; the transcript is also written as the
   benchmark's `output.json` beside `output.wav` (for the interruption task the audio is cropped at
   the interruption's end first and the offset added back, as FDB's asr.py does);
2. an existing `output.json` (FDB's own ASR, or an earlier run of ours);
3. neither: Silero VAD segments of `output.wav`, merged across gaps <= 0.5 s (v1.5 timing).
Words get FDB v1's rule (>= 1 s or > 3 words takes the turn); segments the duration half of it.

Figures (means over samples; lower is better for pause TOR, backchannel TOR and all latencies):
- turn-taking: TOR; latency = agent speech start - end of the user's turn (`turn_taking.json`, else
  the end of the user's last merged VAD segment), negatives 0, over samples that took the turn.
- pause: TOR over the whole output (taking the turn during a user's pause is a failure).
- interruption: TOR and latency after the interruption's end (output cropped there); stop latency =
  from the interruption's onset (or the agent's later start) to the end of the agent's speech that
  overlaps the interruption, over samples where the agent spoke during it.
- backchannel: FDB v1's loop over unmerged Silero segments of the output: a segment > 3 s takes the
  turn; otherwise its words decide (> 3 words, or >= 1 s, or > 2 words: turn; else backchannel), the
  last segment deciding as in their code; every segment up to the first > 3 s one counts as a
  backchannel for the frequency (per second of output) and the 0.2 s-binned JSD against a human
  distribution (`gt_distribution`, FDB's icc_gt_distribution.json; no backchannel -> 1). Segment
  times are rounded to 0.1 s first, as Silero's `return_seconds=True` in their scorer rounds them.
Every row also carries v1.5's interval lists (stop and response intervals of merged segments).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agent.eval.layout import EvalDataError, Sample, find_samples, read_audio
from agent.eval.timing import MODEL_MERGE_GAP_S, USER_MERGE_GAP_S, merge_gaps, overlaps, response_gaps, speech_segments
from agent.eval.transcript import Speech, read_words, write_words

if TYPE_CHECKING:
    from agent.eval.asr import Transcriber

TASKS = ("turn-taking", "pause", "interruption", "backchannel")
JSON_KEYS = {"turn-taking": "turn_taking", "pause": "pause", "interruption": "interruption",
             "backchannel": "backchannel"}
BACKCHANNEL_MAX_S = 3.0  # a longer segment is the agent speaking, not a backchannel
BIN_S = 0.2  # backchannel occupancy bins (FDB's window_size)
EPSILON = 1e-10


@dataclass
class SampleScore:
    name: str
    took_turn: bool | None = None
    latency_s: float | None = None
    stop_s: float | None = None
    backchannels: int | None = None
    backchannel_freq: float | None = None
    jsd: float | None = None
    speech_from: str = ""
    stop_intervals: list[tuple[float, float]] = field(default_factory=list)
    response_intervals: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class TaskScore:
    task: str
    samples: list[SampleScore]

    @property
    def n(self) -> int:
        return len(self.samples)

    def summary(self) -> dict:
        def mean(values) -> float | None:
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else None

        rows = self.samples
        out: dict = {"n": self.n, "tor": mean([float(r.took_turn) for r in rows if r.took_turn is not None])}
        if self.task in ("turn-taking", "interruption"):
            out["latency_s"] = mean(r.latency_s for r in rows)
            out["n_took_turn"] = sum(bool(r.took_turn) for r in rows)
        if self.task == "interruption":
            out["stop_s"] = mean(r.stop_s for r in rows)
            out["n_stopped"] = sum(r.stop_s is not None for r in rows)
        if self.task == "backchannel":
            out["freq"] = mean(r.backchannel_freq for r in rows)
            out["jsd"] = mean(r.jsd for r in rows)
        out["speech_from"] = sorted({r.speech_from for r in rows})
        return out

    def to_json(self) -> dict:
        return {JSON_KEYS[self.task]: self.summary(), "samples": [asdict(r) for r in self.samples]}


def _model_speech(sample: Sample, audio: np.ndarray, rate: int, transcriber: Transcriber | None,
                  segments: list[tuple[float, float]], crop_s: float = 0.0) -> tuple[Speech, str]:
    """The agent's speech in `audio` from `crop_s` on, in file seconds, and where it came from
    (`segments`: its merged VAD segments, the fallback)."""
    if transcriber is not None:
        start = int(round(crop_s * rate))
        words = transcriber.words(audio[start:], rate, offset_s=crop_s)
        write_words(sample.transcript, words)
        return Speech.from_words(words), f"asr:{transcriber.name}"
    if sample.transcript.exists():  # FDB's asr.py crops interruption outputs; an uncropped one is cut here
        words = [w for w in read_words(sample.transcript) if w.start >= crop_s]
        return Speech.from_words(words), "output.json"
    return Speech.from_segments([(max(s, crop_s), e) for s, e in segments if e > crop_s]), "vad"


def _stop_latency(model: list[tuple[float, float]], window: tuple[float, float]) -> float | None:
    """From the interruption's onset (or the agent's later start) to the end of the agent's speech
    that overlaps the interruption; None if the agent was silent during it."""
    onset, end = window
    for seg_start, seg_end in model:
        if seg_start < end and seg_end > onset:
            return seg_end - max(seg_start, onset)
    return None


def _backchannel(speech: Speech, segments: list[tuple[float, float]], duration_s: float,
                 gt: list[float] | None) -> tuple[bool, int, float | None]:
    took, found = False, []
    for start, end in segments:
        if end - start > BACKCHANNEL_MAX_S:
            took = True
            break
        words = speech.count_in(start, end) if speech.are_words else 0
        took = words > 2 or end - start >= 1  # FDB's branches (> 3 words; < 1 s and <= 2 words) reduce to this
        found.append((start, end))
    if not found:
        return took, 0, (1.0 if gt is not None else None)
    if gt is None:
        return took, len(found), None
    from scipy.spatial.distance import jensenshannon
    bins = np.zeros(int(duration_s / BIN_S) + 1)
    for start, end in found:
        bins[int(start / BIN_S):int(end / BIN_S) + 1] += 1
    bins = (bins + EPSILON) / (bins + EPSILON).sum()
    reference = np.interp(np.linspace(0, 1, bins.size), np.linspace(0, 1, len(gt)), np.asarray(gt, float))
    return took, len(found), float(jensenshannon(bins, reference))


def score_sample(sample: Sample, task: str, transcriber: Transcriber | None = None,
                 gt_distribution: dict[str, list[float]] | None = None) -> SampleScore:
    if not sample.output.exists():
        raise EvalDataError(f"{sample.folder}: no output.wav (run `python -m agent.eval run` first)")
    user_audio, user_rate = read_audio(sample.input)
    audio, rate = read_audio(sample.output)
    user = merge_gaps(speech_segments(user_audio, user_rate), USER_MERGE_GAP_S)
    raw_model = speech_segments(audio, rate)
    model = merge_gaps(raw_model, MODEL_MERGE_GAP_S)
    row = SampleScore(sample.name, stop_intervals=overlaps(user, model), response_intervals=response_gaps(user, model))

    if task == "interruption":
        if sample.interrupt_s is None:
            raise EvalDataError(f"{sample.folder}: the interruption task needs interrupt.json")
        crop = sample.interrupt_s[1]
        speech, row.speech_from = _model_speech(sample, audio, rate, transcriber, model, crop_s=crop)
        row.took_turn = speech.took_turn()
        if row.took_turn:
            row.latency_s = max(0.0, speech.start - crop)
        row.stop_s = _stop_latency(model, sample.interrupt_s)
        return row

    speech, row.speech_from = _model_speech(sample, audio, rate, transcriber, model)
    row.took_turn = speech.took_turn()
    if task == "turn-taking":
        turn_end = sample.turn_end_s if sample.turn_end_s is not None else (user[-1][1] if user else None)
        if turn_end is None:
            raise EvalDataError(f"{sample.folder}: no turn_taking.json and no user speech in input.wav")
        if row.took_turn:
            row.latency_s = max(0.0, speech.start - turn_end)
    elif task == "backchannel":
        gt = None
        if gt_distribution is not None:
            if sample.name not in gt_distribution:
                raise EvalDataError(f"{sample.folder}: no human distribution for {sample.name!r}")
            gt = gt_distribution[sample.name]
        duration = audio.size / rate
        # FDB's backchannel scorer asks Silero for seconds, which rounds them to 0.1 s
        segments = [(round(s, 1), round(e, 1)) for s, e in raw_model]
        row.took_turn, row.backchannels, row.jsd = _backchannel(speech, segments, duration, gt)
        row.backchannel_freq = row.backchannels / duration if duration > 0 else 0.0
    return row


def score(root: Path, task: str, transcriber: Transcriber | None = None,
          gt_distribution: dict[str, list[float]] | None = None) -> TaskScore:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    samples = find_samples(root)
    return TaskScore(task, [score_sample(s, task, transcriber, gt_distribution) for s in samples])


def task_of_folder(name: str) -> str | None:
    """The task a set's folder holds, by FDB's names and make-set's (candor_turn_taking, turn_taking,
    synthetic_pause_handling, user_interruption, icc_backchannel, ...); None for anything else."""
    for key, task in (("turn_taking", "turn-taking"), ("pause", "pause"), ("interruption", "interruption"),
                      ("backchannel", "backchannel")):
        if key in name:
            return task
    return None


def score_all(root: Path, transcriber: Transcriber | None = None,
              gt_distribution: dict[str, list[float]] | None = None) -> dict[str, TaskScore]:
    """Every task folder directly under `root`, scored as its name says; folder name -> scores."""
    folders = sorted(f for f in Path(root).iterdir() if f.is_dir() and task_of_folder(f.name))
    if not folders:
        raise EvalDataError(f"{root}: no task folders (names with turn_taking, pause, interruption or backchannel)")
    return {f.name: score(f, task_of_folder(f.name), transcriber,
                          gt_distribution if task_of_folder(f.name) == "backchannel" else None) for f in folders}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(result: TaskScore, label: str = "") -> str:
    """The figures as the paper's table has them, one row for this run."""
    s = result.summary()
    columns = {
        "turn-taking": [("TOR ↑", s["tor"]), ("latency s ↓", s.get("latency_s"))],
        "pause": [("TOR ↓", s["tor"])],
        "interruption": [("TOR ↑", s["tor"]), ("latency s ↓", s.get("latency_s")), ("stop s ↓", s.get("stop_s"))],
        "backchannel": [("TOR ↓", s["tor"]), ("freq ↑", s.get("freq")), ("JSD ↓", s.get("jsd"))],
    }[result.task]
    head = f"{'task':<14}{'n':>5}" + "".join(f"{name:>14}" for name, _ in columns) + "   speech from"
    row = f"{result.task:<14}{s['n']:>5}" + "".join(f"{_fmt(v):>14}" for _, v in columns) \
        + "   " + ", ".join(s["speech_from"])
    return head + "\n" + row + (f"   ({label})" if label else "")


def write_json(result: TaskScore, path: Path) -> None:
    path.write_text(json.dumps(result.to_json(), ensure_ascii=False, indent=2), encoding="utf-8")
