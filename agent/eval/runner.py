"""Running a Full-Duplex-Bench-style set through the engine a live call uses, many samples at once.

Contract: `run_set(model, samples, options, config)` takes each sample's `{prefix}input.wav` (any
rate, channels, sample format), gives it a seat of one `FrameEngine` (the live calls' engine: same
encode -> LM step -> decode per 80 ms frame, same per-seat reset, conditioning and sampling), and
steps every seat together, one batched step per frame, as fast as the model runs. When a sample ends
its seat is freed and the next sample takes it (the engine resets a seat alone), so a set of N
samples runs in about N / seats batches of frames.

Each sample gets `{prefix}output.wav` beside its input, the benchmark's layout: mono 16-bit PCM,
time-aligned (output frame k answers input frame k; Moshi's first frame is silent, its acoustic
delay, which is also where FDB's own Moshi client puts one frame of zeros), exactly as long as the
input, at the input's rate unless `RunConfig.output_rate` says otherwise (FDB's backchannel scorer
assumes 16 kHz; ICC's inputs are 16 kHz). The agent's text stream goes to `{prefix}output.txt`.

Per-seat choices (voice, emotion; prompts later) live in `SeatOptions`, applied when a sample takes
its seat, before its first frame: the options dataclass is where new per-call settings are added
(through the seat's public API, as a live call sets them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from agent import SAMPLE_RATE
from agent.audio.stream import resample
from agent.config import EngineConfig, SamplingConfig
from agent.engine import FrameEngine, Seat
from agent.engine.offline import OfflineCall, drive, to_frames
from agent.eval.layout import EvalDataError, Sample, read_audio, write_output
from agent.models import LoadedModel
from agent.voices import load_catalogue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeatOptions:
    """What each sample's seat is set to, as a live call would choose it. None: the catalogue's default."""

    voice: str | None = None
    emotion: str | None = None

    def apply(self, seat: Seat, model: LoadedModel) -> None:
        """Set up a freshly acquired seat (raises CatalogueError/ConditionError for unknown values)."""
        settings = load_catalogue().settings(self.voice, self.emotion)
        seat.set_conditions(settings.conditions(model.condition_values))


@dataclass(frozen=True)
class RunConfig:
    seats: int = 8  # samples stepped together in one batch
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 42424242  # torch's RNG before the first step (sampled runs depend on batch order too)
    output_rate: int | None = None  # None: each output at its input's rate
    prefix: str = ""  # "clean_": v1.5's clean_input.wav -> clean_output.wav
    skip_existing: bool = False  # keep outputs already written (resume an interrupted run)


@dataclass
class RunReport:
    samples: int = 0
    skipped: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0
    steps: int = 0

    @property
    def realtime_factor(self) -> float:
        """Seconds of input audio processed per wall second (all seats together)."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0


def _paths(sample: Sample, prefix: str) -> tuple[Path, Path, Path]:
    folder = sample.folder
    return folder / f"{prefix}input.wav", folder / f"{prefix}output.wav", folder / f"{prefix}output.txt"


def _start(engine: FrameEngine, sample: Sample, options: SeatOptions, config: RunConfig) -> OfflineCall:
    in_path, _, _ = _paths(sample, config.prefix)
    audio, rate = read_audio(in_path)
    if audio.size == 0:
        raise EvalDataError(f"{in_path}: empty")
    seat = engine.acquire(f"eval:{sample.name}")
    try:
        options.apply(seat, engine.model)
    except Exception:
        seat.release("bad options")
        raise
    return OfflineCall(sample.name, seat, to_frames(resample(audio, rate, SAMPLE_RATE)), rate, audio.size)


def _finish(sample: Sample, call: OfflineCall, config: RunConfig, report: RunReport) -> None:
    call.seat.release("sample done")
    _, out_path, text_path = _paths(sample, config.prefix)
    rate = config.output_rate or call.source_rate
    n_out = round(call.source_samples * rate / call.source_rate)
    pcm = np.concatenate(call.pcm)
    audio = write_output(sample.folder, pcm, SAMPLE_RATE, rate, n_out, name=out_path.name)
    text_path.write_text("".join(call.text).strip() + "\n", encoding="utf-8")
    log.info("%s: %.1f s -> %s", sample.name, call.source_samples / call.source_rate, audio)
    report.samples += 1
    report.audio_s += call.source_samples / call.source_rate


def run_set(model: LoadedModel, samples: list[Sample], options: SeatOptions | None = None,
            config: RunConfig | None = None) -> RunReport:
    """Run every sample through one engine on `model` (which must not back another engine)."""
    options = options or SeatOptions()
    config = config or RunConfig()
    report = RunReport()
    queue = []
    for sample in samples:
        in_path, out_path, _ = _paths(sample, config.prefix)
        if not in_path.is_file():
            raise EvalDataError(f"{sample.folder}: no {in_path.name}")
        if config.skip_existing and out_path.exists():
            report.skipped += 1
        else:
            queue.append(sample)
    if not queue:
        return report
    engine = FrameEngine(model, EngineConfig(max_sessions=min(config.seats, len(queue))), config.sampling)
    if model.device.type == "cuda":
        engine.warm_up()  # as the server does: CUDA graphs captured before the first sample's frames
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    try:
        report.steps = drive(engine, queue, lambda sample: _start(engine, sample, options, config),
                             lambda sample, call: _finish(sample, call, config, report))
    finally:
        engine.stop()
    report.wall_s = time.perf_counter() - started
    return report
