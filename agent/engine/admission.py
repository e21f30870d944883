"""Calls that start from a voice/text prompt (PersonaPlex): prefill, cache, restore, and their end.

On a model that takes prompts a seat may start from a voice/text prompt: before the tick its row is
reset and the prompt's state copied in (agent/engine/prompt_state.py, through the batched step),
computed first in one pass if the prompt is new (`states`, between two ticks; other seats never
wait for more than that); its first output is already an answer frame. A prompt whose prefill fails
ends its own call (the reason given), never the others'. A prompted call ends
`PROMPT_CONTEXT_MARGIN` frames before its conversation would push the prompt out of the LM's
attention context, where the persona and voice would be forgotten (`end_outgrown`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from agent import FRAME_SECONDS
from agent.config import EngineConfig
from agent.engine.pending import PromptUpdate
from agent.engine.prompt_state import PromptCache, PromptLMGen, PromptState
from agent.engine.prompts import PromptBuilder, PromptFrames, PromptSpec
from agent.engine.seats import Seat
from agent.engine.stats import EngineStats
from agent.engine.step import RowState
from agent.errors import PromptError
from agent.models import LoadedModel

log = logging.getLogger(__name__)

PROMPT_CONTEXT_MARGIN = 2  # frames before the context is full at which a prompted call ends


class PromptAdmission:
    """The prompt builder and the cache of prompt states; the rows' step counts tell when a
    prompted call has outgrown the context."""

    def __init__(self, model: LoadedModel, lm_gen: PromptLMGen, config: EngineConfig, rows: RowState,
                 stats: EngineStats, lock: threading.Lock):
        self.model_name = model.name
        # the builder keeps its own Mimi, copied before the engine's starts streaming
        self.builder = PromptBuilder(model) if model.takes_prompts else None
        self.cache = PromptCache(config.prompt_cache_entries, config.prompt_cache_mib * 2**20)
        self.context = model.lm.transformer.layers[0].self_attn.context
        self._lm_gen, self._rows, self._stats, self._lock = lm_gen, rows, stats, lock

    def frames(self, spec: PromptSpec) -> PromptFrames:
        """The prompt's frames (in the caller's thread: tokenising, encoding the voice); raises
        PromptError for a model without prompts or a prompt it cannot take."""
        if self.builder is None:
            raise PromptError(f"{self.model_name} does not take voice or text prompts (a PersonaPlex "
                              "checkpoint does)")
        return self.builder.frames(spec)

    def states(self, asked: Mapping[int, PromptUpdate],
               refuse: Callable[[int, PromptUpdate, str], None]) -> dict[int, PromptState]:
        """Each asked prompt's state: from the cache, or computed now in one pass (and cached).
        A prefill that fails is `refuse`d with the reason for its caller; the others go on."""
        states: dict[int, PromptState] = {}
        for index, update in asked.items():
            state = self.cache.get(update.frames.key)
            if state is None:
                t0 = time.perf_counter()
                try:
                    state = self._lm_gen.prefill(update.frames)
                except Exception as exc:  # whatever broke, only this call ends (told why); the engine goes on
                    log.exception("prompt prefill failed for seat %d", index)
                    refuse(index, update, f"the voice/persona prompt could not be prepared ({type(exc).__name__})")
                    continue
                self.cache.put(update.frames.key, state)
                with self._lock:
                    self._stats.prompt_prefills += 1
                    self._stats.prompt_prefill_ms = 1e3 * (time.perf_counter() - t0)
            states[index] = state
        with self._lock:
            self._stats.prompt_cache_entries = len(self.cache)
            self._stats.prompt_cache_bytes = self.cache.nbytes
        return states

    def restoring(self, ready: Mapping[int, PromptUpdate]) -> None:
        """These prompts go into their rows at this tick's step: their seats run on them."""
        for update in ready.values():
            update.seat.prompt = update.spec
        with self._lock:
            self._stats.prompts_restored += len(ready)

    def end_outgrown(self, seats: Sequence[Seat | None]) -> None:
        """A prompted call whose conversation would push its prompt out of the context ends."""
        rows = self._rows
        if self.context is None or not rows.prompted.any():
            return
        full = np.flatnonzero(rows.prompted & (rows.steps >= self.context - PROMPT_CONTEXT_MARGIN))
        for index in full:
            seat = seats[index]
            rows.prompted[index] = False
            if seat is not None:
                seat.release(f"the call reached the model's {self.context * FRAME_SECONDS / 60:.0f}-minute "
                             "context: past it the agent would forget its voice and persona. Please call again.")
