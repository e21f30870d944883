"""The frame engine: every live call on a model shares one batched Moshi step per 80 ms frame.

One idea per module, a tick flowing down the list:

    seats         a caller's place in the batch: bounded queues, its own counters, the jitter policy
    pending       what callers asked for between ticks (resets, condition rows, sampling, prompts),
                  swapped out in one step per tick
    conditions    each seat's condition row (voice, emotion) from the values the model knows
    sampling      each seat's sampling settings, written into fixed-size tensors (SeatLMGen)
    prompts       a voice/text prompt as frames of forced tokens (PersonaPlex's sequence)
    prompt_state  a prompt's state computed in one pass and copied into any row; its cache
    admission     prompted calls: prefill or cache, restore, and their end before the context is full
    step          the batched step: step(TickInput) -> StepOutput (masks, reset, encode, LM, decode)
    loop          the engine's thread: when to tick, freeing idle seats
    stats         engine-wide figures and health, seats per device
    frame_engine  FrameEngine, the facade callers use: seats, settings, one tick, start/stop

Callers import from here: `from agent.engine import FrameEngine, Seat, OutputFrame`.
"""

from agent.engine.admission import PROMPT_CONTEXT_MARGIN
from agent.engine.frame_engine import STEP_FAILED_NOTICE, FrameEngine
from agent.engine.seats import OutputFrame, Seat, SeatCounters
from agent.engine.stats import (
    CPU_DEFAULT_SEATS,
    FAILING_AFTER,
    GPU_RESERVE_BYTES,
    MAX_DEFAULT_SEATS,
    EngineStats,
    default_seat_count,
)
from agent.engine.step import StepOutput, TickInput

__all__ = ["CPU_DEFAULT_SEATS", "FAILING_AFTER", "GPU_RESERVE_BYTES", "MAX_DEFAULT_SEATS", "PROMPT_CONTEXT_MARGIN",
           "STEP_FAILED_NOTICE", "EngineStats", "FrameEngine", "OutputFrame", "Seat", "SeatCounters", "StepOutput",
           "TickInput", "default_seat_count"]
