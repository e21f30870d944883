"""Driving a FrameEngine offline: recordings in, the agent's frames out, as fast as the model runs.

Contract: each recording (24 kHz mono, cut into 1920-sample frames by `to_frames`, the last one padded
with zeros) holds one seat of the engine a live call uses. `drive(engine, items, start, finish)` steps
every held seat together, one batched step per frame with no real-time wait and no engine thread; a
recording whose last frame is answered is handed to `finish` and the next item's `start` takes its seat,
so N recordings run in about N / seats batches of frames. Output frame k answers input frame k.
`infer` is the one-recording case (agent.tools.infer, the eval's checks); agent.eval.runner runs whole
sets through `drive`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.config import EngineConfig, SamplingConfig
from agent.engine import FrameEngine, Seat
from agent.engine.prompts import PromptSpec
from agent.models import LoadedModel

T = TypeVar("T")


def to_frames(audio: np.ndarray) -> np.ndarray:
    """(n_frames, FRAME_SIZE) float32, the last partial frame padded with zeros."""
    n_frames = -(-audio.size // FRAME_SIZE)
    padded = np.zeros(n_frames * FRAME_SIZE, np.float32)
    padded[:audio.size] = audio
    return padded.reshape(n_frames, FRAME_SIZE)


@dataclass
class OfflineCall:
    """One recording in its seat: its input frames and the agent's answer so far."""

    name: str
    seat: Seat
    frames: np.ndarray  # (n, FRAME_SIZE) float32 at 24 kHz
    source_rate: int = SAMPLE_RATE  # the recording's own rate and length, to write the answer back alike
    source_samples: int = 0
    pcm: list[np.ndarray] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # one per frame; -2 where the model had nothing yet
    text: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.pcm) == len(self.frames)


def step(engine: FrameEngine, calls: list[OfflineCall]) -> None:
    """One batched step: each call's next input frame in, its answer frame out."""
    for call in calls:
        call.seat.push(call.frames[len(call.pcm)])
    engine.step_once()
    for call in calls:
        out = call.seat.pull()
        if out is None:
            raise RuntimeError(f"the engine gave no frame for {call.name}")
        call.pcm.append(out.pcm)
        call.tokens.append(out.text_token)
        call.text.append(out.text)


def drive(engine: FrameEngine, items: Iterable[T], start: Callable[[T], OfflineCall],
          finish: Callable[[T, OfflineCall], None]) -> int:
    """Run every item's recording (see the module notes); returns the batched steps taken. `finish`
    releases the seat; seats still held when a step fails are released here."""
    queue = list(items)
    active: list[tuple[T, OfflineCall]] = []
    steps = 0
    try:
        while queue or active:
            while queue and len(active) < engine.num_seats:
                item = queue.pop(0)
                active.append((item, start(item)))
            running = [call for _, call in active if not call.done]  # an empty recording takes no step
            if running:
                step(engine, running)
                steps += 1
            for pair in [p for p in active if p[1].done]:
                active.remove(pair)
                finish(*pair)
    finally:
        for _, call in active:
            call.seat.release("run stopped")
    return steps


@dataclass
class InferResult:
    pcm: np.ndarray  # float32, 24 kHz, FRAME_SIZE samples per input frame
    text_tokens: list[int]  # one per frame; -2 where the model had nothing yet (the first frame)
    text: str


def infer(model: LoadedModel, audio: np.ndarray, sampling: SamplingConfig | None = None,
          conditions: dict[str, str] | None = None, prompt: PromptSpec | None = None) -> InferResult:
    """Run 24 kHz mono `audio` through a one-seat FrameEngine on `model` (which must not back
    another engine: the streaming state lives in its modules). `conditions`, e.g. {"speaker":
    "ravi", "emotion": "sad"}, applies from the first frame; None keeps the engine's defaults.
    `prompt` (a model that takes prompts): the voice/text prompt the conversation starts from
    (PromptError if the model cannot take it)."""
    engine = FrameEngine(model, EngineConfig(max_sessions=1), sampling)
    seat = engine.acquire("infer")
    if conditions:
        seat.set_conditions(conditions)  # ConditionError for a value the model does not know
    if prompt is not None:
        seat.set_prompt(prompt)
    call = OfflineCall("infer", seat, to_frames(audio))
    drive(engine, [None], lambda _: call, lambda _, done: done.seat.release("done"))
    pcm = np.concatenate(call.pcm) if call.pcm else np.zeros(0, np.float32)
    return InferResult(pcm, call.tokens, "".join(call.text).strip())
