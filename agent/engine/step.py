"""The batched step: one `mimi.encode -> LMGen.step -> mimi.decode` for every seat at once.

Mimi and the LM stream with a constant batch size for the life of the process
(`streaming_forever`), which keeps CUDA graphs valid. Contract of `BatchedStep.step(TickInput)`:
- rows in `reset` start over first (`reset_streaming(mask)`, alone); a row in `restores` then gets
  its prompt's state copied in (agent/engine/prompt_state.py), so its first output is an answer;
- rows outside `exec_mask` are frozen (`set_exec_mask`): their state does not advance;
- the `StepOutput` holds one frame per row; a row is `voiced` once it has stepped past the LM's
  largest delay (Moshi's acoustic delay); before that its output is silence.
The host keeps each row's step count (`RowState`), so it knows which rows have audio without
asking the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from agent import FRAME_SIZE
from agent.engine.prompt_state import PromptLMGen, PromptState
from agent.engine.seats import OutputFrame
from agent.models import LoadedModel


@dataclass
class TickInput:
    pcm: np.ndarray  # [num_seats, 1, FRAME_SIZE] float32, zeros in the rows that sit out
    exec_mask: np.ndarray  # [num_seats] bool: the rows stepped; the others are frozen
    reset: np.ndarray  # [num_seats] bool: the rows that start over before the step
    restores: dict[int, PromptState] = field(default_factory=dict)  # reset rows that start from a prompt


@dataclass
class StepOutput:
    pcm: np.ndarray  # [num_seats, FRAME_SIZE] float32, finite
    voiced: np.ndarray  # [num_seats] bool: stepped rows past the acoustic delay
    text_tokens: np.ndarray  # [num_seats] the text token each row chose
    encode_s: float
    lm_s: float
    decode_s: float
    seconds: float  # the whole step, reset and restores included
    produced_at: float  # time.monotonic() when the step finished

    def frame(self, row: int, input_done_at: float, text: str) -> OutputFrame:
        voiced = bool(self.voiced[row])
        return OutputFrame(pcm=self.pcm[row].copy() if voiced else np.zeros(FRAME_SIZE, np.float32), text=text,
                           text_token=int(self.text_tokens[row]), input_done_at=input_done_at,
                           produced_at=self.produced_at, voiced=voiced)


@dataclass
class RowState:
    """The host's view of each row since its reset."""

    steps: np.ndarray  # [num_seats] int64: LM steps run (the host's copy of LMGen's offsets)
    prompted: np.ndarray  # [num_seats] bool: running on a prompt (its context is watched)


class BatchedStep:
    def __init__(self, model: LoadedModel, lm_gen: PromptLMGen, num_seats: int):
        self.mimi, self.device, self.lm_gen = model.mimi, model.device, lm_gen
        self.rows = RowState(np.zeros(num_seats, np.int64), np.zeros(num_seats, bool))
        # the exec mask each streaming model holds now: set again only when it changes (on a CPU a
        # set walks every streaming module, ~1 % of a tiny step each time)
        self._masks: dict[str, bytes | None] = {"mimi": None, "lm": None}

    def forget_masks(self) -> None:
        """Set the masks again at the next step (a failed step may have left any mask set)."""
        self._masks = {"mimi": None, "lm": None}

    @torch.no_grad()
    def step(self, tick: TickInput) -> StepOutput:
        mimi, lm_gen, rows = self.mimi, self.lm_gen, self.rows
        t0 = time.perf_counter()
        if tick.reset.any():
            reset_dev = torch.from_numpy(tick.reset).to(self.device)
            mimi.reset_streaming(reset_dev)
            lm_gen.reset_streaming(reset_dev)
            rows.steps[tick.reset] = 0
            rows.prompted[tick.reset] = False
            self.forget_masks()  # a reset also sets the reset seats' masks
        for index, state in tick.restores.items():
            lm_gen.restore(index, state)
            rows.steps[index] = state.length
            rows.prompted[index] = True
        self._set_mask("mimi", mimi, tick.exec_mask)
        codes = mimi.encode(torch.from_numpy(tick.pcm).to(self.device))
        t1 = time.perf_counter()
        self._set_mask("lm", lm_gen, tick.exec_mask)
        tokens = lm_gen.step(codes)
        assert tokens is not None  # support_out_of_sync: never None, not-ready slots are -2
        t2 = time.perf_counter()
        rows.steps[tick.exec_mask] += 1
        # Decode only seats with real tokens: until a seat has stepped past the LM's largest delay,
        # LMGen gives it -2 (Moshi's acoustic delay) and its output is silence.
        voiced = tick.exec_mask & (rows.steps > lm_gen.max_delay)
        self._set_mask("mimi", mimi, voiced)
        out = mimi.decode(tokens[:, 1:].clamp(min=0))
        pcm = out[:, 0].float().cpu().numpy()
        if not np.isfinite(pcm).all():
            pcm = np.nan_to_num(pcm, nan=0.0, posinf=0.0, neginf=0.0)
        text = tokens[:, 0, 0].cpu().numpy()
        t3 = time.perf_counter()
        return StepOutput(pcm, voiced, text, t1 - t0, t2 - t1, t3 - t2, t3 - t0, time.monotonic())

    def _set_mask(self, name: str, module, mask: np.ndarray) -> None:
        key = mask.tobytes()
        if self._masks[name] != key:
            module.set_exec_mask(torch.from_numpy(mask).to(self.device))
            self._masks[name] = key
