"""What callers asked for between two ticks: resets, condition rows, sampling settings, prompts.

Callers write into the engine's one `PendingUpdates` (engine lock held). Each tick swaps it for
the next one in one step (`split`): rows, settings and resets go to this tick, prompts that are not
ready yet wait in the next one. An update whose seat has left since is dropped, never applied to
the seat's next caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from agent.engine.prompt_state import PromptState
from agent.engine.prompts import PromptFrames, PromptSpec
from agent.engine.sampling import SeatLMGen, SeatSampler, SeatSampling
from agent.engine.seats import Seat


@dataclass(frozen=True)
class ConditionUpdate:
    seat: Seat
    values: dict[str, str]
    row: torch.Tensor  # SeatConditions.row(values)


@dataclass(frozen=True)
class SamplingUpdate:
    seat: Seat
    settings: SeatSampling


@dataclass(frozen=True, eq=False)  # compared by identity: a prompt asked again is a new one
class PromptUpdate:
    seat: Seat
    spec: PromptSpec
    frames: PromptFrames  # tokenised and encoded in the caller's thread


@dataclass
class PendingUpdates:
    reset: np.ndarray  # [num_seats] bool: rows that start over at the next step
    rows: dict[int, ConditionUpdate] = field(default_factory=dict)
    sampling: dict[int, SamplingUpdate] = field(default_factory=dict)
    prompts: dict[int, PromptUpdate] = field(default_factory=dict)  # restored at the first step with its state

    @classmethod
    def empty(cls, num_seats: int) -> PendingUpdates:
        return cls(np.zeros(num_seats, bool))

    def split(self, seats: Sequence[Seat | None], stepping: bool, asked: Mapping[int, PromptUpdate],
              states: Mapping[int, PromptState]) -> tuple[PendingUpdates, dict[int, PromptUpdate]]:
        """This becomes the tick's updates; returns the next pending ones and the prompts restored
        this tick (engine lock held). A prompt is restored when it was `asked` before the prefill,
        was not replaced since and has its state, and only at a tick that steps (the row is reset
        first, always); the others wait. With no step, the resets wait too."""
        later = PendingUpdates.empty(len(self.reset))
        waiting = {i: p for i, p in self.prompts.items() if seats[i] is p.seat}  # the seat left: dropped
        ready = {i: p for i, p in asked.items() if waiting.get(i) is p and i in states} if stepping else {}
        if not stepping:
            later.reset |= self.reset
        for index in ready:
            del waiting[index]
            self.reset[index] = True
        later.prompts = waiting
        return later, ready

    def apply_settings(self, lm_gen: SeatLMGen, sampler: SeatSampler) -> None:
        """Write this tick's condition rows and sampling settings into the LM (outside the lock)."""
        for index, update in self.rows.items():
            lm_gen.set_condition_row(index, update.row)
            update.seat.conditions = update.values
        for index, sampling in self.sampling.items():
            sampler.set(index, sampling.settings)
            sampling.seat.sampling = sampling.settings
        if self.sampling:
            lm_gen.sync_text_sampling()

    def retry(self, seats: Sequence[Seat | None], stepped: Sequence[Seat], reset: np.ndarray,
              prompts: Mapping[int, PromptUpdate]) -> None:
        """A step failed part-way (engine lock held): the seats it stepped and those it was to reset
        start over at the next one, and the prompts it was restoring are restored again (unless
        asked anew meanwhile). Seats that have left since are skipped."""
        for index, update in prompts.items():
            if seats[index] is update.seat:
                self.prompts.setdefault(index, update)
        for seat in stepped:
            if seats[seat.index] is seat:
                self.reset[seat.index] = True
        self.reset |= reset & np.array([s is not None for s in seats])
