"""The frame engine: every live call on a model shares one batched Moshi step per 80 ms frame.

The engine owns a fixed pool of seats (batch slots). Mimi and the LM stream with that constant
batch size for the life of the process (`streaming_forever`), which keeps CUDA graphs valid.
Each tick takes at most one input frame per seat and runs

    mimi.encode -> LMGen.step -> mimi.decode

once for the whole batch. A seat that takes a new caller is reset alone (`reset_streaming(mask)`);
a seat with no input this tick is frozen (`set_exec_mask`) so its state does not advance. Each seat
has its own condition row (voice, emotion) and its own sampling settings (agent.engine.sampling), both
written into fixed-size tensors between ticks. On a model that takes prompts (PersonaPlex) a seat may
start from a voice/text prompt: before the tick its row is reset and the prompt's state copied in
(agent/engine/prompt_state.py), computed first in one pass if the prompt is new; its first output is already
an answer frame.

Jitter policy (per seat, counted in `SeatCounters`):
- input backlog is bounded (`EngineConfig.input_queue_frames`); when full the oldest frame is dropped;
- output backlog is bounded (`EngineConfig.output_queue_frames`); when full the oldest frame is dropped;
- a seat whose input is late sits the tick out (frozen) and never delays the others by more than a frame;
- a seat that sends nothing for `idle_timeout_s` is freed (its client vanished);
- a held seat (`Seat.hold`: its caller's connection dropped and may come back) is neither stepped
  nor freed for idleness, and other seats do not wait for it; its LM context stays as it was.

Faults: a step that raises loses the frames it took; the seats it was stepping are reset (their
conversation starts over), each is told (`Seat.take_notices`), the failure is counted
(`EngineStats.step_failures`), and after `FAILING_AFTER` failures in a row `health()` says the
engine is failing until a step succeeds again, so a load balancer stops sending calls.

Tick timing: a tick fires as soon as every occupied seat has a frame (so a lone caller never waits
for a clock), or one frame period after the previous tick for the seats that are ready, or at once
when a seat has fallen two frames behind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from moshi.conditioners import ConditionAttributes

from agent import FRAME_SECONDS, FRAME_SIZE
from agent.config import EngineConfig, SamplingConfig
from agent.engine.prompt_state import PromptCache, PromptLMGen, PromptState
from agent.engine.prompts import PromptBuilder, PromptFrames, PromptSpec
from agent.engine.sampling import SeatSampler, SeatSampling
from agent.errors import ConditionError, EngineStoppedError, PromptError, SeatsFullError
from agent.models import LoadedModel
from agent.ops.metrics import StepTimes

log = logging.getLogger(__name__)

# On a CPU every seat costs compute each tick, idle or not (the batch is fixed); 4 keeps a lone
# caller's tiny-model step near 20 ms on 2 cores. GPU seats come from memory instead.
CPU_DEFAULT_SEATS = 4
MAX_DEFAULT_SEATS = 64
GPU_RESERVE_BYTES = 2 * 1024**3  # activations, CUDA graphs, allocator slack
FAILING_AFTER = 3  # steps failed in a row before the engine reports itself unhealthy
STEP_FAILED_NOTICE = "The agent hit an internal error and restarted this conversation; keep talking."








# A prompted call ends this many frames before its conversation would push the prompt out of the
# LM's attention context (agent/engine/prompt_state.py): the persona and voice would be forgotten.
PROMPT_CONTEXT_MARGIN = 2


@dataclass
class OutputFrame:
    """One 80 ms frame of the agent, produced by one batched step."""

    pcm: np.ndarray  # FRAME_SIZE float32 samples at 24 kHz
    text: str  # the decoded text piece, '' when the model emitted padding
    text_token: int
    input_done_at: float  # time.monotonic() when the input frame that produced it was complete
    produced_at: float  # time.monotonic() when the step finished
    voiced: bool  # False while the model's acoustic delay has not produced audio yet


@dataclass
class SeatCounters:
    frames_in: int = 0
    frames_out: int = 0
    input_dropped: int = 0  # oldest input frames dropped: client sent faster than real time
    output_dropped: int = 0  # oldest output frames dropped: client did not read its audio
    frozen_ticks: int = 0  # ticks this seat sat out because its input was late
    non_finite_frames: int = 0  # frames that carried NaN/Inf (zeroed before the model)


class Seat:
    """A caller's place in the batch: push input frames, pull output frames. Thread-safe.

    The caller's side is push/pull/hold/release and the settings; the engine's side (`take_input`,
    `deliver`, `tell`, `mark_closed`) is called by the engine with its lock held. Seat and engine
    share one lock, which the engine hands over at construction."""

    def __init__(self, engine: FrameEngine, index: int, owner: str, config: EngineConfig,
                 lock: threading.Lock, engine_wake: threading.Condition):
        self.index = index
        self.owner = owner
        self.counters = SeatCounters()
        self.closed_reason: str | None = None
        self.conditions: dict[str, str] = {}  # what the LM is conditioned on for this seat, once applied
        self.sampling: SeatSampling | None = None  # how this seat is sampled, once applied
        self.prompt: PromptSpec | None = None  # the voice/text prompt this seat runs on, once restored
        self.last_input_at = time.monotonic()
        self.held = False  # frozen while its caller reconnects (hold)
        self._engine = engine
        self._lock = lock  # the engine's: a tick takes every seat's frame at once
        self._engine_wake = engine_wake  # tells the engine's loop that input arrived
        self._inputs: deque[tuple[np.ndarray, float]] = deque()
        self._outputs: deque[OutputFrame] = deque()
        self._notices: deque[str] = deque(maxlen=8)  # messages for the caller (e.g. a failed step)
        self._listeners: list[Callable[[], None]] = []
        self._max_in = config.input_queue_frames
        self._max_out = config.output_queue_frames
        self._out_ready = threading.Condition(lock)

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    @property
    def input_backlog(self) -> int:
        """Input frames waiting for a tick."""
        return len(self._inputs)

    def push(self, frame: np.ndarray, done_at: float | None = None) -> None:
        """Queue one FRAME_SIZE float32 frame (24 kHz mono). Never blocks."""
        if frame.shape != (FRAME_SIZE,):
            raise ValueError(f"a frame is {FRAME_SIZE} samples, got shape {frame.shape}")
        done_at = time.monotonic() if done_at is None else done_at
        with self._lock:
            if self.closed:
                raise EngineStoppedError(f"seat {self.index} is closed: {self.closed_reason}")
            if len(self._inputs) >= self._max_in:
                self._inputs.popleft()
                self.counters.input_dropped += 1
                self._engine.stats.input_dropped += 1
            self._inputs.append((frame, done_at))
            self.counters.frames_in += 1
            self.last_input_at = time.monotonic()
            self._engine_wake.notify_all()

    def pull(self, timeout: float = 0.0) -> OutputFrame | None:
        """The next output frame, waiting up to `timeout` seconds; None if there is none yet."""
        with self._lock:
            if not self._outputs and timeout > 0 and not self.closed:
                self._out_ready.wait(timeout)
            return self._outputs.popleft() if self._outputs else None

    def on_change(self, wake: Callable[[], None]) -> None:
        """Call `wake()` (from the engine's thread; it must not block) whenever an output frame or a
        notice arrives, or the seat closes: an async transport waits on this instead of a thread."""
        with self._lock:
            self._listeners.append(wake)
            if self._outputs or self._notices or self.closed:
                wake()

    def hold(self, held: bool) -> None:
        """Freeze this seat (True) while its caller is away: it keeps its LM context, is not stepped
        and is not freed for idleness; False takes it back (the idle clock starts again)."""
        with self._lock:
            self.held = held
            self.last_input_at = time.monotonic()
            self._engine_wake.notify_all()

    def take_notices(self) -> list[str]:
        """Messages for this seat's caller since the last call (e.g. its conversation was reset)."""
        with self._lock:
            notices = list(self._notices)
            self._notices.clear()
            return notices

    def release(self, reason: str = "released") -> None:
        self._engine.release(self, reason)

    def set_conditions(self, conditions: dict[str, str]) -> None:
        """Condition this seat (e.g. {"speaker": "ravi", "emotion": "sad"}) from its next frame on;
        other seats are untouched. Raises ConditionError for a value the model does not know."""
        self._engine.set_conditions(self, conditions)

    def set_sampling(self, settings: SeatSampling) -> None:
        """Sample this seat with these settings from its next frame on; other seats are untouched.
        Raises SamplingError for values outside what the server allows."""
        self._engine.set_sampling(self, settings)

    def set_prompt(self, spec: PromptSpec) -> None:
        """Start this seat's conversation over from a voice/text prompt (agent/engine/prompts.py) at its
        next tick. Raises PromptError for a prompt the model cannot take. Other seats never wait
        for it: a cached prompt is copied into the seat's row, a new one is computed once, in one
        pass, between two ticks."""
        self._engine.set_prompt(self, spec)

    # -- the engine's side (engine lock held) ----------------------------------------------------

    def take_input(self) -> tuple[np.ndarray, float] | None:
        """The oldest input frame and when it was complete, or None if none came."""
        return self._inputs.popleft() if self._inputs else None

    def mark_closed(self, reason: str) -> None:
        """The seat is closed: its queued input is dropped and anyone waiting is woken."""
        self.closed_reason = reason
        self._inputs.clear()
        self._changed()

    def deliver(self, frame: OutputFrame) -> None:
        if len(self._outputs) >= self._max_out:
            self._outputs.popleft()
            self.counters.output_dropped += 1
            self._engine.stats.output_dropped += 1
        self._outputs.append(frame)
        self.counters.frames_out += 1
        self._changed()

    def tell(self, message: str) -> None:
        """Queue a message for the caller (take_notices)."""
        self._notices.append(message)
        self._changed()

    def _changed(self) -> None:
        self._out_ready.notify_all()
        for wake in list(self._listeners):
            try:
                wake()
            except RuntimeError:  # its event loop is closed: nobody waits there any more
                self._listeners.remove(wake)


@dataclass
class EngineStats:
    """Engine-wide totals since start (seat counters vanish with their seat; these do not)."""

    ticks: int = 0
    seats_total: int = 0
    seats_in_use: int = 0
    calls_started: int = 0
    calls_refused: int = 0
    input_dropped: int = 0
    output_dropped: int = 0
    late_ticks: int = 0
    step_failures: int = 0  # steps that raised (their seats were reset and told)
    failures_in_a_row: int = 0  # since the last step that succeeded
    last_failure: str = ""
    step: StepTimes = field(default_factory=StepTimes)
    prompts_restored: int = 0  # calls started from a prompt state (cached or new)
    prompt_prefills: int = 0  # prompt states computed (cache misses)
    prompt_prefill_ms: float = 0.0  # the last one's time, spent between two ticks
    prompt_cache_entries: int = 0
    prompt_cache_bytes: int = 0


def default_seat_count(model: LoadedModel, config: EngineConfig | None = None) -> int:
    """Seats from device memory: one KV cache per seat (about 1.5 GiB for the 7B at context 3000),
    after the prompt cache's budget on a model that takes prompts."""
    if model.device.type != "cuda":
        return CPU_DEFAULT_SEATS
    lm = model.lm
    bytes_per = torch.tensor([], dtype=model.dtype).element_size()
    kv_per_seat = 2 * len(lm.transformer.layers) * lm.transformer.layers[0].self_attn.context * lm.dim * bytes_per
    free, _ = torch.cuda.mem_get_info(model.device)
    reserve = GPU_RESERVE_BYTES + ((config or EngineConfig()).prompt_cache_mib * 2**20 if model.takes_prompts else 0)
    return int(max(1, min(MAX_DEFAULT_SEATS, (free - reserve) // max(kv_per_seat, 1))))


class FrameEngine:
    """One per loaded model. `start()` runs the tick loop on its own thread; `step_once()` runs a
    single tick in the caller's thread (offline inference, benchmarks, tests)."""

    def __init__(self, model: LoadedModel, config: EngineConfig | None = None,
                 sampling: SamplingConfig | None = None,
                 on_step: Callable[[float, int], None] | None = None):
        """`on_step(seconds, batch)` is called after every step (e.g. a Prometheus histogram)."""
        self.model = model
        self.on_step = on_step
        self.config = config or EngineConfig()
        sampling = sampling or SamplingConfig()
        self.num_seats = self.config.max_sessions or default_seat_count(model, self.config)
        # Conditioned models (speaker/emotion LUTs summed into the input) start every seat on each
        # conditioner's first value; a seat's row is overwritten when its caller chooses.
        self.condition_values = model.condition_values
        self._default_conditions = {name: values[0] for name, values in self.condition_values.items()}
        condition_tensors = None
        if model.lm.fuser is not None:
            condition_tensors = model.lm.condition_provider.prepare_and_provide(
                [ConditionAttributes(text=dict(self._default_conditions))] * self.num_seats)
        self.sampler = SeatSampler(self.num_seats, model.device, sampling)
        self.lm_gen = PromptLMGen(model.lm, self.sampler, support_out_of_sync=True, condition_tensors=condition_tensors)
        # PersonaPlex-style models take voice/text prompts; the builder keeps its own Mimi, copied
        # before the engine's starts streaming
        self.prompts = PromptBuilder(model) if model.takes_prompts else None
        self.prompt_cache = PromptCache(self.config.prompt_cache_entries, self.config.prompt_cache_mib * 2**20)
        self._context = model.lm.transformer.layers[0].self_attn.context
        model.mimi.streaming_forever(self.num_seats)
        self.lm_gen.streaming_forever(self.num_seats)
        self.stats = EngineStats(seats_total=self.num_seats)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._seats: list[Seat | None] = [None] * self.num_seats
        self._pending_reset = np.zeros(self.num_seats, bool)
        # LM steps each seat has run since its reset: the host's copy of LMGen's offsets, so the
        # engine knows which seats have audio yet (Moshi's acoustic delay) without asking the device
        self._steps = np.zeros(self.num_seats, np.int64)
        # the exec mask each streaming model holds now: set again only when it changes (on a CPU a
        # set walks every streaming module, ~1 % of a tiny step each time)
        self._masks: dict[str, bytes | None] = {"mimi": None, "lm": None}
        self._pending_rows: dict[int, tuple[Seat, dict[str, str], torch.Tensor]] = {}  # index -> (seat, values, row)
        self._pending_sampling: dict[int, tuple[Seat, SeatSampling]] = {}
        self._pending_prompts: dict[int, tuple[Seat, PromptSpec, PromptFrames]] = {}
        self._prompted = np.zeros(self.num_seats, bool)  # rows running on a prompt (context is watched)
        self._default_row = self._condition_row(self._default_conditions) if self._default_conditions else None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_tick = 0.0
        self._zeros = np.zeros(FRAME_SIZE, np.float32)

    # -- seats ---------------------------------------------------------------------------------

    def acquire(self, owner: str) -> Seat:
        with self._lock:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            for index, seat in enumerate(self._seats):
                if seat is None:
                    new = Seat(self, index, owner, self.config, self._lock, self._wake)
                    self._seats[index] = new
                    self._pending_reset[index] = True
                    # a new caller starts from the defaults
                    if self._default_row is not None:
                        self._pending_rows[index] = (new, dict(self._default_conditions), self._default_row)
                    self._pending_sampling[index] = (new, self.sampler.default)
                    self.stats.calls_started += 1
                    self.stats.seats_in_use += 1
                    log.debug("seat %d taken by %s (%d/%d in use)", index, owner,
                             self.stats.seats_in_use, self.num_seats)
                    return new
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

    def _condition_row(self, conditions: dict[str, str]) -> torch.Tensor:
        """The LM's summed condition for one seat, shape [1, dim]."""
        lm = self.model.lm
        with torch.no_grad():
            tensors = lm.condition_provider.prepare_and_provide([ConditionAttributes(text=dict(conditions))])
            return lm.fuser.get_sum(tensors).to(lm.dtype)[0]

    def set_conditions(self, seat: Seat, conditions: dict[str, str]) -> None:
        """See Seat.set_conditions."""
        if not self.condition_values:
            return  # an unconditioned checkpoint (e.g. Kyutai's Moshiko): nothing to set
        for name, value in conditions.items():
            known = self.condition_values.get(name)
            if known is None:
                raise ConditionError(f"this model has no {name!r} conditioning")
            if value not in known:
                raise ConditionError(f"{name} {value!r} is not one this model was trained with: {known}")
        values = self._default_conditions | conditions
        row = self._condition_row(values)
        with self._lock:
            if self._seats[seat.index] is seat:
                self._pending_rows[seat.index] = (seat, values, row)

    def _apply_condition_rows(self, rows: dict[int, tuple[Seat, dict[str, str], torch.Tensor]]) -> None:
        """Write the pending seats' condition rows into the LM (SeatLMGen.set_condition_row)."""
        for index, (seat, values, row) in rows.items():
            self.lm_gen.set_condition_row(index, row)
            seat.conditions = values

    def set_sampling(self, seat: Seat, settings: SeatSampling) -> None:
        """See Seat.set_sampling."""
        settings = settings.checked(self.sampler.config)
        with self._lock:
            if self._seats[seat.index] is seat:
                self._pending_sampling[seat.index] = (seat, settings)

    def _apply_sampling(self, pending: dict[int, tuple[Seat, SeatSampling]]) -> None:
        for index, (seat, settings) in pending.items():
            self.sampler.set(index, settings)
            seat.sampling = settings

    def prompt_presets(self) -> list[str] | None:
        """The model's preset voices if it takes voice/text prompts; None if it does not."""
        return sorted(self.model.preset_voices) if self.prompts is not None else None

    def set_prompt(self, seat: Seat, spec: PromptSpec) -> None:
        if self.prompts is None:
            raise PromptError(f"{self.model.name} does not take voice or text prompts (a PersonaPlex "
                              "checkpoint does)")
        frames = self.prompts.frames(spec)  # the caller's thread: tokenising, encoding the voice
        with self._lock:
            if self._seats[seat.index] is seat:
                self._pending_prompts[seat.index] = (seat, spec, frames)
                self._pending_reset[seat.index] = True  # a prompt starts the conversation over

    def _prompt_states(self, pending: dict[int, tuple[Seat, PromptSpec, PromptFrames]]) -> dict[int, PromptState]:
        """Each pending prompt's state: from the cache, or computed now in one pass (and cached).
        A prompt whose prefill fails ends its own call (the reason given), never the others'."""
        states: dict[int, PromptState] = {}
        for index, (seat, _, frames) in pending.items():
            state = self.prompt_cache.get(frames.key)
            if state is None:
                t0 = time.perf_counter()
                try:
                    state = self.lm_gen.prefill(frames)
                except Exception as exc:  # whatever broke, only this call ends (told why); the engine goes on
                    log.exception("prompt prefill failed for seat %d", index)
                    with self._lock:
                        if self._pending_prompts.get(index, (None,))[0] is seat:
                            del self._pending_prompts[index]
                    seat.release(f"the voice/persona prompt could not be prepared ({type(exc).__name__})")
                    continue
                self.prompt_cache.put(frames.key, state)
                with self._lock:
                    self.stats.prompt_prefills += 1
                    self.stats.prompt_prefill_ms = 1e3 * (time.perf_counter() - t0)
            states[index] = state
        with self._lock:
            self.stats.prompt_cache_entries = len(self.prompt_cache)
            self.stats.prompt_cache_bytes = self.prompt_cache.nbytes
        return states

    def _restore_prompts(self, pending: dict[int, tuple[Seat, PromptSpec, PromptFrames]],
                         states: dict[int, PromptState]) -> None:
        """Copy prompt states into their (just reset) rows; the host's step counts follow."""
        for index, (seat, spec, _) in pending.items():
            self.lm_gen.restore(index, states[index])
            self._steps[index] = states[index].length
            self._prompted[index] = True
            seat.prompt = spec
        with self._lock:
            self.stats.prompts_restored += len(pending)

    def _end_outgrown_prompts(self) -> None:
        """A prompted call whose conversation would push its prompt out of the context ends."""
        if self._context is None or not self._prompted.any():
            return
        full = np.flatnonzero(self._prompted & (self._steps >= self._context - PROMPT_CONTEXT_MARGIN))
        for index in full:
            seat = self._seats[index]
            self._prompted[index] = False
            if seat is not None:
                seat.release(f"the call reached the model's {self._context * FRAME_SECONDS / 60:.0f}-minute "
                             "context: past it the agent would forget its voice and persona. Please call again.")

    def seats_in_use(self) -> int:
        with self._lock:
            return self.stats.seats_in_use

    def health(self) -> tuple[bool, str]:
        """(healthy, reason): unhealthy after FAILING_AFTER failed steps in a row."""
        with self._lock:
            if self.stats.failures_in_a_row >= FAILING_AFTER:
                return False, (f"engine failing: {self.stats.failures_in_a_row} steps in a row "
                               f"({self.stats.last_failure})")
            return True, "ok"

    # -- the tick ------------------------------------------------------------------------------

    def _take_batch(self) -> tuple[list[tuple[Seat, float]], np.ndarray, np.ndarray, np.ndarray, dict, dict]:
        """Pop one frame per ready seat (engine lock held)."""
        batch: list[tuple[Seat, float]] = []
        pcm = np.zeros((self.num_seats, 1, FRAME_SIZE), np.float32)
        exec_mask = np.zeros(self.num_seats, bool)
        for seat in self._seats:
            if seat is None or seat.held:
                continue
            taken = seat.take_input()
            if taken is None:
                seat.counters.frozen_ticks += 1
                self.stats.late_ticks += 1
                continue
            frame, done_at = taken
            if not np.isfinite(frame).all():  # sessions sanitise; this guards direct callers
                seat.counters.non_finite_frames += 1
                frame = np.nan_to_num(frame, nan=0.0, posinf=0.0, neginf=0.0)
            pcm[seat.index, 0] = frame
            exec_mask[seat.index] = True
            batch.append((seat, done_at))
        reset = self._pending_reset.copy()
        self._pending_reset[:] = False
        rows, self._pending_rows = self._pending_rows, {}
        sampling, self._pending_sampling = self._pending_sampling, {}
        return batch, pcm, exec_mask, reset, rows, sampling

    @torch.no_grad()
    def step_once(self) -> int:
        """Run one batched step for every seat that has an input frame. Returns how many stepped."""
        with self._lock:
            prompts = dict(self._pending_prompts)
        states = self._prompt_states(prompts) if prompts else {}  # new prompts: one pass each, before the tick
        with self._lock:
            batch, pcm, exec_mask, reset, rows, sampling = self._take_batch()
            # prompts whose seat left, or that another prompt replaced meanwhile, are dropped
            for index, (seat, _, _) in list(self._pending_prompts.items()):
                if self._seats[index] is not seat:
                    del self._pending_prompts[index]
            prompts = {i: p for i, p in prompts.items() if self._pending_prompts.get(i) is p and i in states}
            if not batch:
                self._pending_reset |= reset  # no step this tick: keep the resets (and prompts) for the next one
                prompts = {}
            for index in prompts:
                del self._pending_prompts[index]
                reset[index] = True  # a prompt is restored into a freshly reset row, always
            self._last_tick = time.monotonic()
        if rows:
            self._apply_condition_rows(rows)
        if sampling:
            self._apply_sampling(sampling)
        if not batch:
            return 0
        try:
            return self._step(batch, pcm, exec_mask, reset, prompts, states)
        except Exception as exc:
            self._step_failed(batch, reset, prompts, exc)
            raise

    def _step_failed(self, batch: list[tuple[Seat, float]], reset: np.ndarray,
                     prompts: dict[int, tuple[Seat, PromptSpec, PromptFrames]], exc: Exception) -> None:
        """The step raised part-way: the seats it stepped (and those due a reset) start over, and
        their callers are told; a prompt it was restoring is restored again at the next tick. Seats
        outside the batch were masked out, so they are untouched."""
        with self._lock:
            for index, pending in prompts.items():
                if self._seats[index] is pending[0]:
                    self._pending_prompts.setdefault(index, pending)
            self.stats.step_failures += 1
            self.stats.failures_in_a_row += 1
            self.stats.last_failure = f"{type(exc).__name__}: {exc}"[:200]
            self._masks = {"mimi": None, "lm": None}  # the failed step may have left any mask set
            for seat, _ in batch:
                if self._seats[seat.index] is seat:
                    self._pending_reset[seat.index] = True
                    seat.tell(STEP_FAILED_NOTICE)
            self._pending_reset |= reset & np.array([s is not None for s in self._seats])

    def _step(self, batch: list[tuple[Seat, float]], pcm: np.ndarray, exec_mask: np.ndarray, reset: np.ndarray,
              prompts: dict[int, tuple[Seat, PromptSpec, PromptFrames]], states: dict[int, PromptState]) -> int:
        mimi, device = self.model.mimi, self.model.device
        t0 = time.perf_counter()
        if reset.any():
            reset_dev = torch.from_numpy(reset).to(device)
            mimi.reset_streaming(reset_dev)
            self.lm_gen.reset_streaming(reset_dev)
            self._steps[reset] = 0
            self._prompted[reset] = False
            self._masks = {"mimi": None, "lm": None}  # a reset also sets the reset seats' masks
        if prompts:
            self._restore_prompts(prompts, states)
        self._set_mask("mimi", mimi, exec_mask)
        codes = mimi.encode(torch.from_numpy(pcm).to(device))
        t1 = time.perf_counter()
        self._set_mask("lm", self.lm_gen, exec_mask)
        tokens = self.lm_gen.step(codes)
        assert tokens is not None  # support_out_of_sync: never None, not-ready slots are -2
        t2 = time.perf_counter()
        self._steps[exec_mask] += 1
        # Decode only seats with real tokens: until a seat has stepped past the LM's largest delay,
        # LMGen gives it -2 (Moshi's acoustic delay) and its output is silence.
        voiced_np = exec_mask & (self._steps > self.lm_gen.max_delay)
        self._set_mask("mimi", mimi, voiced_np)
        out = mimi.decode(tokens[:, 1:].clamp(min=0))
        out_np = out[:, 0].float().cpu().numpy()
        if not np.isfinite(out_np).all():
            out_np = np.nan_to_num(out_np, nan=0.0, posinf=0.0, neginf=0.0)
        text_np = tokens[:, 0, 0].cpu().numpy()
        t3 = time.perf_counter()

        produced_at = time.monotonic()
        with self._lock:
            self.stats.ticks += 1
            self.stats.failures_in_a_row = 0
            self.stats.step.add(encode_ms=1e3 * (t1 - t0), lm_ms=1e3 * (t2 - t1), decode_ms=1e3 * (t3 - t2),
                                batch=len(batch))
            for seat, done_at in batch:
                i = seat.index
                is_voiced = bool(voiced_np[i])
                token = int(text_np[i])
                seat.deliver(OutputFrame(
                    pcm=out_np[i].copy() if is_voiced else self._zeros.copy(),
                    text=self.model.decode_text(token), text_token=token, input_done_at=done_at,
                    produced_at=produced_at, voiced=is_voiced))
        if self.on_step is not None:  # after delivery: telemetry never delays audio
            self.on_step(t3 - t0, len(batch))
        self._end_outgrown_prompts()
        return len(batch)

    def _set_mask(self, name: str, module, mask: np.ndarray) -> None:
        key = mask.tobytes()
        if self._masks[name] != key:
            module.set_exec_mask(torch.from_numpy(mask).to(self.model.device))
            self._masks[name] = key

    # -- the loop ------------------------------------------------------------------------------

    def _should_tick(self, now: float) -> bool:
        occupied = [s for s in self._seats if s is not None and not s.held]
        ready = [s for s in occupied if s.input_backlog]
        if not ready:
            return False
        return (len(ready) == len(occupied) or now >= self._last_tick + FRAME_SECONDS
                or any(s.input_backlog >= 2 for s in ready))

    def _free_idle_seats(self, now: float) -> list[Seat]:
        return [s for s in self._seats
                if s is not None and not s.held and now - s.last_input_at > self.config.idle_timeout_s]

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping:
                    now = time.monotonic()
                    if self._should_tick(now):
                        break
                    idle = self._free_idle_seats(now)
                    if idle:
                        break
                    waiting = any(s is not None and not s.held and s.input_backlog for s in self._seats)
                    self._wake.wait(timeout=max(0.001, self._last_tick + FRAME_SECONDS - now) if waiting else 0.25)
                if self._stopping:
                    return
                idle = self._free_idle_seats(time.monotonic())
            for seat in idle:
                self.release(seat, f"no audio for {self.config.idle_timeout_s:g} s")
            try:
                self.step_once()
            except Exception:  # counted, seats reset and told (_step_failed); the loop goes on
                log.exception("engine step failed; its seats were reset")

    def warm_up(self, steps: int = 4) -> None:
        """Run a few steps on silence (captures CUDA graphs on GPU), then reset every seat.
        Warm-up steps are slow by design and are kept out of every figure."""
        on_step, self.on_step = self.on_step, None
        try:
            owner = [self.acquire("warm-up") for _ in range(self.num_seats)]
            for _ in range(steps):
                for seat in owner:
                    seat.push(self._zeros.copy())
                self.step_once()
            for seat in owner:
                seat.release("warm-up done")
        finally:
            self.on_step = on_step
        self.stats = EngineStats(seats_total=self.num_seats)

    def start(self) -> FrameEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="frame-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            seats = [s for s in self._seats if s is not None]
            self._wake.notify_all()
        for seat in seats:
            self.release(seat, "server shutting down")
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
