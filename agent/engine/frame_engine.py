"""`FrameEngine`: every live call on a model shares one batched Moshi step per 80 ms frame.

The engine owns a fixed pool of seats (batch slots, agent/engine/seats.py). Each tick takes at most
one input frame per seat, swaps out the updates callers asked for (agent/engine/pending.py), and runs
the batched step (agent/engine/step.py) once for the whole batch; new prompts are prepared first
(agent/engine/admission.py). The tick loop (agent/engine/loop.py) decides when.

Faults: a step that raises loses the frames it took; the seats it was stepping are reset (their
conversation starts over), each is told (`Seat.take_notices`), the failure is counted
(`EngineStats.step_failures`), and after `FAILING_AFTER` failures in a row `health()` says the
engine is failing until a step succeeds again (agent/engine/stats.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from agent import FRAME_SIZE
from agent.config import EngineConfig, SamplingConfig
from agent.engine.admission import PromptAdmission
from agent.engine.conditions import SeatConditions
from agent.engine.loop import TickLoop, due_since
from agent.engine.pending import ConditionUpdate, PendingUpdates, PromptUpdate, SamplingUpdate
from agent.engine.prompt_state import PromptLMGen
from agent.engine.prompts import PromptSpec
from agent.engine.sampling import SeatSampler, SeatSampling
from agent.engine.seats import Gathered, Seat, finish, gather
from agent.engine.stats import EngineStats, default_seat_count
from agent.engine.step import BatchedStep, StepOutput, TickInput
from agent.errors import EngineStoppedError, SeatsFullError
from agent.models import LoadedModel

log = logging.getLogger(__name__)

STEP_FAILED_NOTICE = "The agent hit an internal error and restarted this conversation; keep talking."


class FrameEngine:
    """One per loaded model. `start()` runs the tick loop on its own thread; `step_once()` runs a
    single tick in the caller's thread (offline inference, benchmarks, tests)."""

    def __init__(self, model: LoadedModel, config: EngineConfig | None = None,
                 sampling: SamplingConfig | None = None,
                 on_step: Callable[[float, int], None] | None = None):
        """`on_step(seconds, batch)` is called after every step (e.g. a Prometheus histogram)."""
        self.model, self.on_step, self.config = model, on_step, config or EngineConfig()
        self.num_seats = self.config.max_sessions or default_seat_count(model, self.config)
        self._conditions = SeatConditions(model)
        self.condition_values = self._conditions.values
        self.sampler = SeatSampler(self.num_seats, model.device, sampling or SamplingConfig())
        self.lm_gen = PromptLMGen(model.lm, self.sampler, support_out_of_sync=True,
                                  condition_tensors=self._conditions.initial_tensors(self.num_seats))
        self.stats = EngineStats(seats_total=self.num_seats)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._step = BatchedStep(model, self.lm_gen, self.num_seats)
        self._admission = PromptAdmission(model, self.lm_gen, self.config, self._step.rows, self.stats, self._lock)
        self.prompts, self.prompt_cache = self._admission.builder, self._admission.cache  # before Mimi streams
        model.mimi.streaming_forever(self.num_seats)
        self.lm_gen.streaming_forever(self.num_seats)
        self._seats: list[Seat | None] = [None] * self.num_seats
        self._pending = PendingUpdates.empty(self.num_seats)
        self._default_row = self._conditions.default_row()
        self._loop = TickLoop(self._wake, self._seats, self.config, self.step_once, self.release)

    @property
    def _thread(self) -> threading.Thread | None:
        """The tick loop's thread; None when not started or stopped."""
        return self._loop.thread

    # -- seats ---------------------------------------------------------------------------------

    def acquire(self, owner: str) -> Seat:
        with self._lock:
            if self._loop.stopping:
                raise EngineStoppedError("the server is shutting down")
            if None in self._seats:
                index = self._seats.index(None)
                seat = self._seats[index] = Seat(self, index, owner, self.config, self._lock, self._wake, self.stats)
                self._pending.reset[index] = True
                if self._default_row is not None:  # a new caller starts from the defaults
                    self._pending.rows[index] = ConditionUpdate(seat, dict(self._conditions.defaults),
                                                                self._default_row)
                self._pending.sampling[index] = SamplingUpdate(seat, self.sampler.default)
                self.stats.calls_started += 1
                self.stats.seats_in_use += 1
                log.debug("seat %d taken by %s (%d/%d in use)", index, owner, self.stats.seats_in_use, self.num_seats)
                return seat
            self.stats.calls_refused += 1
        raise SeatsFullError(f"All {self.num_seats} seats are in use. Please try again in a minute.")

    def release(self, seat: Seat, reason: str) -> None:
        """Free this seat (idempotent); its caller's waits end."""
        with self._lock:
            if seat.closed:
                return
            seat.mark_closed(reason)
            if self._seats[seat.index] is seat:
                self._seats[seat.index] = None
                self.stats.seats_in_use -= 1
                log.debug("seat %d freed (%s), %d/%d in use", seat.index, reason,
                          self.stats.seats_in_use, self.num_seats)

    def set_conditions(self, seat: Seat, conditions: dict[str, str]) -> None:
        """See Seat.set_conditions."""
        chosen = self._conditions.choose(conditions)
        if chosen is None:
            return  # an unconditioned checkpoint (e.g. Kyutai's Moshiko): nothing to set
        with self._lock:
            if self._seats[seat.index] is seat:
                self._pending.rows[seat.index] = ConditionUpdate(seat, *chosen)

    def set_sampling(self, seat: Seat, settings: SeatSampling) -> None:
        """See Seat.set_sampling."""
        settings = settings.checked(self.sampler.config)
        with self._lock:
            if self._seats[seat.index] is seat:
                self._pending.sampling[seat.index] = SamplingUpdate(seat, settings)

    def prompt_presets(self) -> list[str] | None:
        """The model's preset voices if it takes voice/text prompts; None if it does not."""
        return sorted(self.model.preset_voices) if self.prompts is not None else None

    def set_prompt(self, seat: Seat, spec: PromptSpec) -> None:
        """See Seat.set_prompt."""
        frames = self._admission.frames(spec)
        with self._lock:
            if self._seats[seat.index] is seat:
                self._pending.prompts[seat.index] = PromptUpdate(seat, spec, frames)
                self._pending.reset[seat.index] = True  # a prompt starts the conversation over

    def _refuse_prompt(self, index: int, update: PromptUpdate, reason: str) -> None:
        """A prompt that cannot be prepared ends its own call."""
        with self._lock:
            waiting = self._pending.prompts.get(index)
            if waiting is not None and waiting.seat is update.seat:
                del self._pending.prompts[index]
        update.seat.release(reason)

    def seats_in_use(self) -> int:
        with self._lock:
            return self.stats.seats_in_use

    def health(self) -> tuple[bool, str]:
        """(healthy, reason): unhealthy after FAILING_AFTER failed steps in a row."""
        with self._lock:
            return self.stats.health()

    # -- the tick ------------------------------------------------------------------------------

    @torch.no_grad()
    def step_once(self) -> int:
        """Run one batched step for every seat that has an input frame. Returns how many stepped."""
        with self._lock:
            asked = dict(self._pending.prompts)
        states = self._admission.states(asked, self._refuse_prompt) if asked else {}  # one pass each, before the tick
        with self._lock:
            since, now = due_since(self._seats, self._loop.last_tick), time.monotonic()
            if since is not None:
                self.stats.lateness.add(1e3 * max(0.0, now - since), now)
            batch = gather(self._seats)
            self.stats.late_ticks += batch.late
            taken = self._pending
            self._pending, ready = taken.split(self._seats, bool(batch.seats), asked, states)
            self._loop.last_tick = time.monotonic()
        taken.apply_settings(self.lm_gen, self.sampler)
        if not batch.seats:
            return 0
        tick = TickInput(batch.pcm, batch.exec_mask, taken.reset, {i: states[i] for i in ready})
        try:
            self._admission.restoring(ready)  # a step that fails restores them again at the next tick
            self._deliver(batch, self._step.step(tick))
            self._admission.end_outgrown(self._seats)
        except Exception as exc:
            self._step_failed(batch, tick.reset, ready, exc)
            raise
        return len(batch.seats)

    def _deliver(self, batch: Gathered, out: StepOutput) -> None:
        with self._lock:
            self.stats.stepped(out.encode_s, out.lm_s, out.decode_s, len(batch.seats))
            for seat, done_at in batch.seats:
                seat.deliver(out.frame(seat.index, done_at, self.model.decode_text(int(out.text_tokens[seat.index]))),
                             wake=False)
            later: list = []  # every frame is in, then one wake-up per event loop, not one per call
            for seat, _ in batch.seats:
                seat.wake_listeners(later)
            finish(later)
        if self.on_step is not None:  # after delivery: telemetry never delays audio
            self.on_step(out.seconds, len(batch.seats))

    def _step_failed(self, batch: Gathered, reset: np.ndarray, prompts: dict[int, PromptUpdate],
                     exc: Exception) -> None:
        """The step raised part-way: the seats it stepped (and those due a reset) start over, and
        their callers are told; a prompt it was restoring is restored again at the next tick. Seats
        outside the batch were masked out, so they are untouched."""
        with self._lock:
            stepped = [seat for seat, _ in batch.seats]
            self._pending.retry(self._seats, stepped, reset, prompts)
            self.stats.failed(exc)
            self._step.forget_masks()
            for seat in stepped:
                if self._seats[seat.index] is seat:
                    seat.tell(STEP_FAILED_NOTICE)

    # -- the loop ------------------------------------------------------------------------------

    def warm_up(self, steps: int = 4) -> None:
        """Run a few steps on silence (captures CUDA graphs on GPU), then reset every seat.
        Warm-up steps are slow by design and are kept out of every figure."""
        on_step, self.on_step = self.on_step, None
        try:
            owner = [self.acquire("warm-up") for _ in range(self.num_seats)]
            for _ in range(steps):
                for seat in owner:
                    seat.push(np.zeros(FRAME_SIZE, np.float32))
                self.step_once()
            for seat in owner:
                seat.release("warm-up done")
        finally:
            self.on_step = on_step
        self.stats.clear()

    def start(self) -> FrameEngine:
        self._loop.start()
        return self

    def stop(self) -> None:
        for seat in self._loop.stop():
            self.release(seat, "server shutting down")
        self._loop.join()
