"""Prompted calls joining a busy engine: call-start latency and what the others feel.

    python -m agent.tools.bench --prompts --model tiny-personaplex --max-sessions 6      # CPU
    python -m agent.tools.bench --prompts --model nvidia/personaplex-7b-v1 --max-sessions 16   # a GPU

The engine runs on its own thread in real time, as when serving. `others` calls (by default the
pool less the 4 joiners) stream audio all along (one frame per 80 ms each). Then:

- call start, one call at a time: from taking a seat and asking for a prompt ("connect") to the
  first agent frame handed to the call, for a prompt never seen (prefilled in one pass between two
  ticks), the same prompt again (copied from the cache), and no prompt (Moshi's own start);
- a burst: `joiners` calls join at once, each with a new prompt; the other calls' frame latency
  (input frame complete -> its output frame produced) p50/p99 in the seconds after the burst,
  against the seconds before it and against the same burst of calls without prompts (the control:
  on a CPU the batch's step grows with the number of live calls, prompts or not).

The alternative design, stepping a new prompt through the live batch one forced frame per tick,
is priced from the same run: it takes P ticks (P x 80 ms before the call answers, P = the prompt's
frames) and P extra batch steps of compute, against one prefill pass here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from agent import FRAME_SECONDS, FRAME_SIZE
from agent.config import EngineConfig, ModelConfig
from agent.engine import FrameEngine, Seat
from agent.engine.prompts import PromptSpec
from agent.models import load_model

PERSONA = "You are a patient support agent at a bank in Hyderabad. Keep answers short. Variant {}."


@dataclass
class PromptBench:
    model: str
    pool: int
    others: int
    prompt_frames: int
    call_start_ms: dict[str, list[float]] = field(default_factory=dict)  # uncached / cached / no prompt
    prefill_ms: list[float] = field(default_factory=list)
    step_p50_ms: float = 0.0
    others_before_ms: dict[str, float] = field(default_factory=dict)
    others_during_ms: dict[str, float] = field(default_factory=dict)  # 4 join with new prompts
    others_during_plain_ms: dict[str, float] = field(default_factory=dict)  # control: 4 join without prompts
    step_p99_during_ms: float = 0.0
    forced_step_alternative_ms: float = 0.0  # P ticks of wall time before answering


class Feeder:
    """Feeds every registered seat one frame per 80 ms and collects what comes back."""

    def __init__(self):
        self.seats: dict[Seat, list] = {}
        self.latency: list[tuple[float, float]] = []  # (when, ms) for the `others`
        self.others: set[Seat] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._noise = np.random.default_rng(0).uniform(-0.3, 0.3, (50, FRAME_SIZE)).astype(np.float32)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def add(self, seat: Seat, other: bool = False) -> list:
        outputs: list = []
        with self._lock:
            self.seats[seat] = outputs
            if other:
                self.others.add(seat)
        return outputs

    def remove(self, seat: Seat) -> None:
        with self._lock:
            self.seats.pop(seat, None)

    def _run(self) -> None:
        k, next_at = 0, time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                seats = list(self.seats.items())
            for seat, outputs in seats:
                if not seat.closed:
                    seat.push(self._noise[k % len(self._noise)])
                while (frame := seat.pull()) is not None:
                    outputs.append((frame.produced_at, frame))
                    if seat in self.others:
                        self.latency.append((frame.produced_at, 1e3 * (frame.produced_at - frame.input_done_at)))
            k += 1
            next_at += FRAME_SECONDS
            time.sleep(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def _window(latency: list[tuple[float, float]], start: float, end: float) -> dict[str, float]:
    values = [ms for at, ms in latency if start <= at < end]
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "n": 0}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "n": len(values)}


def _start_call(engine: FrameEngine, feeder: Feeder, spec: PromptSpec | None,
                timeout: float = 20.0) -> tuple[Seat, float]:
    """Take a seat, ask for the prompt, feed audio: ms until the first agent frame arrives."""
    t0 = time.monotonic()
    seat = engine.acquire("bench-join")
    if spec is not None:
        seat.set_prompt(spec)
    outputs = feeder.add(seat)
    while time.monotonic() - t0 < timeout:
        voiced = [at for at, frame in outputs if frame.voiced]
        if voiced:
            return seat, 1e3 * (voiced[0] - t0)
        time.sleep(0.002)
    raise RuntimeError("no agent frame within the timeout")


def _burst(engine: FrameEngine, feeder: Feeder, voice: str | None, joiners: int,
           with_prompts: bool) -> dict[str, float]:
    """`joiners` calls join at once (new prompts, or none); the other calls' latency over the next 3 s."""
    start = time.monotonic()
    joined: list[Seat] = []
    threads = [threading.Thread(target=lambda j=j: joined.append(_start_call(
        engine, feeder, PromptSpec(voice, PERSONA.format(f"burst{j}")) if with_prompts else None)[0]))
        for j in range(joiners)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(3.0)
    window = _window(feeder.latency, start, time.monotonic())
    for seat in joined:
        feeder.remove(seat)
        seat.release("bench")
    time.sleep(2.0)
    return window


def bench_prompts(config: ModelConfig, pool: int = 8, others: int | None = None, joiners: int = 4, repeats: int = 3,
                  voice: str | None = None) -> PromptBench:
    """`others` calls stream all along (default: the seats the joiners leave, so the burst fills the pool)."""
    others = max(1, pool - joiners) if others is None else others
    model = load_model(config)
    engine = FrameEngine(model, EngineConfig(max_sessions=pool), config.sampling)
    if engine.prompts is None:
        raise SystemExit(f"{model.name} takes no prompts: use --model tiny-personaplex or a PersonaPlex checkpoint")
    voice = voice or (sorted(model.preset_voices)[0] if model.preset_voices else None)
    engine.warm_up()
    engine.start()
    feeder = Feeder().start()
    try:
        for i in range(others):
            feeder.add(engine.acquire(f"other{i}"), other=True)
        time.sleep(2.0)
        result = PromptBench(model.name, pool, others, len(engine.prompts.frames(PromptSpec(voice, PERSONA.format(0)))))
        starts: dict[str, list[float]] = {"uncached": [], "cached": [], "no prompt": []}
        for r in range(repeats):
            for kind, spec in (("uncached", PromptSpec(voice, PERSONA.format(f"a{r}"))),
                               ("cached", PromptSpec(voice, PERSONA.format(f"a{r}"))), ("no prompt", None)):
                seat, ms = _start_call(engine, feeder, spec)
                starts[kind].append(ms)
                if kind == "uncached":
                    result.prefill_ms.append(engine.stats.prompt_prefill_ms)
                feeder.remove(seat)
                seat.release("bench")
                time.sleep(0.3)
        result.call_start_ms = starts
        time.sleep(2.0)
        before_start = time.monotonic()
        time.sleep(3.0)
        result.others_before_ms = _window(feeder.latency, before_start, time.monotonic())
        result.others_during_ms = _burst(engine, feeder, voice, joiners, with_prompts=True)
        result.others_during_plain_ms = _burst(engine, feeder, voice, joiners, with_prompts=False)
        summary = engine.stats.step.summary()
        result.step_p50_ms = summary["p50_ms"] or 0.0
        result.step_p99_during_ms = summary["p99_ms"] or 0.0
        result.forced_step_alternative_ms = result.prompt_frames * 1e3 * FRAME_SECONDS
    finally:
        feeder.stop()
        engine.stop()
    return result


def print_prompts(r: PromptBench) -> None:
    def ms(values: list[float]) -> str:
        return f"median {np.median(values):.0f} ms (min {min(values):.0f}, max {max(values):.0f}, n={len(values)})"

    print(f"\nPrompted calls on {r.model}: pool {r.pool}, {r.others} other calls streaming, "
          f"prompt of {r.prompt_frames} frames ({r.prompt_frames * FRAME_SECONDS:.1f} s)")
    for kind, values in r.call_start_ms.items():
        print(f"  call start (connect -> first agent frame), {kind:9s}: {ms(values)}")
    print(f"  prompt prefill (one pass, between two ticks): {ms(r.prefill_ms)}; batch step p50 {r.step_p50_ms:.1f} ms")
    print(f"  one forced step per tick instead: {r.prompt_frames} ticks = {r.forced_step_alternative_ms:.0f} ms "
          f"before answering, and {r.prompt_frames} extra batch steps "
          f"(~{r.prompt_frames * r.step_p50_ms:.0f} ms of compute)")
    b, d, c = r.others_before_ms, r.others_during_ms, r.others_during_plain_ms
    print(f"  other calls' frame latency p50 / p99: before {b['p50']:.0f} / {b['p99']:.0f} ms; "
          f"4 calls joining with new prompts {d['p50']:.0f} / {d['p99']:.0f} ms; "
          f"4 joining without prompts {c['p50']:.0f} / {c['p99']:.0f} ms "
          f"(step p99 over the run {r.step_p99_during_ms:.0f} ms)")
