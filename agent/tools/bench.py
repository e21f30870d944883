"""The benchmark: how many conversations one device serves, and what the engine costs.

    python -m agent.tools.bench --model tiny --max-sessions 8                      # CPU, CI-sized
    python -m agent.tools.bench --model moshi-7b-random --context 3000 --max-sessions 64   # a GPU
    python -m agent.tools.bench --model tiny --e2e 8 --seconds 120                 # real clients, real time
    python -m agent.tools.bench --prompts --model tiny-personaplex --max-sessions 6 # prompted calls joining

Engine mode: one engine per pool size (the batch is fixed, as when serving), k seats busy and the rest
idle, random-noise input; per-frame step time p50/p95/p99 split into Mimi encode, LM step and Mimi
decode, real-time factor, memory, and the largest k whose p99 stays under one frame (80 ms). In the
same run, the engine's step is timed against a bare `mimi.encode -> LMGen.step -> mimi.decode` loop on
an identical model and batch (steps interleaved, so machine noise hits both alike): engine overhead.
The bare loop runs on two copies of the weights (`--bare-copies`): their mean is the reference and
their spread the noise floor (identical loops on a CPU differ by a few %, by where memory landed).

E2E mode: the real app served on 127.0.0.1, K WebSocket clients speaking Telugu (espeak-ng) at real
time for T seconds: frame latency, voice-to-voice latency (if the VAD hears the agent speak: a
random-weight model only makes noise), dropped/late frames and memory at start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from moshi.conditioners import ConditionAttributes
from moshi.models.lm import LMGen

from agent import FRAME_SECONDS, FRAME_SIZE
from agent.audio.espeak import telugu_speech
from agent.config import EngineConfig, ModelConfig, SamplingConfig
from agent.engine import FrameEngine
from agent.models import LoadedModel, load_model
from agent.ops.metrics import percentiles, rss_mib

FRAME_MS = 1e3 * FRAME_SECONDS


def gpu_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class PointResult:
    sessions: int
    pool: int
    step_ms: dict[str, float]
    encode_ms: float
    lm_ms: float
    decode_ms: float
    rtf: float
    rss_mib: float
    gpu_mib: float | None


@dataclass
class OverheadResult:
    sessions: int
    engine_ms: float  # median step time through the engine
    bare_ms: float  # median of the bare loops (each on its own copy of the weights), averaged
    ratio: float
    # each bare copy's median: identical loops on identical weights differ by a few % on a CPU (where
    # each copy's memory landed), so their spread is the noise floor the ratio is read against
    bare_copies_ms: list[float] = field(default_factory=list)
    # the engine with every seat on its own sampling settings (the per-row sampler; one seat can
    # only agree with itself, so None at 1 session)
    per_seat_sampling_ms: float | None = None


@dataclass
class EngineBench:
    model: str
    device: str
    dtype: str
    context: int | None
    points: list[PointResult] = field(default_factory=list)
    overhead: list[OverheadResult] = field(default_factory=list)
    max_sessions_p99_under_frame: int = 0


class BareLoop:
    """moshi's own loop, nothing else: the reference for the engine's overhead."""

    def __init__(self, model: LoadedModel, batch: int, sampling: SamplingConfig):
        lm = model.lm
        conditions = None
        if lm.fuser is not None:
            defaults = {name: values[0] for name, values in model.condition_values.items()}
            conditions = lm.condition_provider.prepare_and_provide([ConditionAttributes(text=defaults)] * batch)
        self.model = model
        self.lm_gen = LMGen(lm, use_sampling=sampling.use_sampling, temp=sampling.temp, temp_text=sampling.temp_text,
                            top_k=sampling.top_k, top_k_text=sampling.top_k_text, support_out_of_sync=True,
                            condition_tensors=conditions)
        model.mimi.streaming_forever(batch)
        self.lm_gen.streaming_forever(batch)

    @torch.no_grad()
    def step(self, pcm: torch.Tensor) -> None:
        codes = self.model.mimi.encode(pcm)
        tokens = self.lm_gen.step(codes)
        self.model.mimi.decode(tokens[:, 1:].clamp(min=0))


def noise_frames(n: int, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((n, batch, FRAME_SIZE))).astype(np.float32)


def timed_engine_step(engine: FrameEngine, seats, frames: np.ndarray) -> float:
    for seat, frame in zip(seats, frames):
        seat.push(frame)
    device = engine.model.device
    sync(device)
    t0 = time.perf_counter()
    engine.step_once()
    sync(device)
    elapsed = time.perf_counter() - t0
    for seat in seats:
        seat.pull()
    return 1e3 * elapsed


def session_counts(pool: int) -> list[int]:
    counts, k = [], 1
    while k < pool:
        counts.append(k)
        k *= 2
    return counts + [pool]


def bench_engine(config: ModelConfig, pool: int, frames: int, warmup: int = 10) -> EngineBench:
    model = load_model(config)
    engine = FrameEngine(model, EngineConfig(max_sessions=pool), config.sampling)
    result = EngineBench(model.name, model.device.type, str(model.dtype).removeprefix("torch."), config.context)
    for k in session_counts(pool):
        seats = [engine.acquire(f"bench-{i}") for i in range(k)]
        data = noise_frames(warmup + frames, k, seed=k)
        for t in range(warmup):
            timed_engine_step(engine, seats, data[t])
        engine.stats.step = type(engine.stats.step)()  # fresh split figures for this point
        times = [timed_engine_step(engine, seats, data[warmup + t]) for t in range(frames)]
        split = engine.stats.step
        point = PointResult(k, pool, percentiles(times), split.encode.percentile(50), split.lm.percentile(50),
                            split.decode.percentile(50), float(np.median(times)) / FRAME_MS, rss_mib(), gpu_mib())
        result.points.append(point)
        if point.step_ms["p99"] < FRAME_MS:
            result.max_sessions_p99_under_frame = k
        for seat in seats:
            seat.release()
    return result


def bench_overhead(config: ModelConfig, batch: int, frames: int, warmup: int = 10,
                   bare_copies: int = 2) -> OverheadResult:
    """Engine vs bare loop, same weights (same seed), same batch, steps interleaved. The bare loop runs
    on `bare_copies` copies of the weights and the reference is their mean: one copy alone can be a few
    % faster or slower than another for where its memory landed, which is the size of the overhead."""
    engine_model = load_model(config)
    engine = FrameEngine(engine_model, EngineConfig(max_sessions=batch), config.sampling)
    bares = [BareLoop(load_model(config), batch, config.sampling) for _ in range(max(1, bare_copies))]
    seats = [engine.acquire(f"bench-{i}") for i in range(batch)]
    mixed, mixed_seats = None, []
    if batch > 1:
        mixed = FrameEngine(load_model(config), EngineConfig(max_sessions=batch), config.sampling)
        default = mixed.sampler.default
        for i in range(batch):
            mixed_seats.append(mixed.acquire(f"bench-mixed-{i}"))
            mixed_seats[-1].set_sampling(replace(default, temp=0.5 + 0.5 * i / batch, top_k=default.top_k - i))
    data = noise_frames(warmup + frames, batch, seed=batch)
    device = engine_model.device
    engine_ms, mixed_ms = [], []
    bare_ms: list[list[float]] = [[] for _ in bares]
    for t in range(warmup + frames):
        e = timed_engine_step(engine, seats, data[t])
        if mixed is not None:
            m = timed_engine_step(mixed, mixed_seats, data[t])
            if t >= warmup:
                mixed_ms.append(m)
        pcm = torch.from_numpy(data[t][:, None, :]).to(device)
        for bare, times in zip(bares, bare_ms):
            sync(device)
            t0 = time.perf_counter()
            bare.step(pcm)
            sync(device)
            if t >= warmup:
                times.append(1e3 * (time.perf_counter() - t0))
        if t >= warmup:
            engine_ms.append(e)
    e_med, copies = float(np.median(engine_ms)), [float(np.median(times)) for times in bare_ms]
    b_med = float(np.mean(copies))
    return OverheadResult(batch, e_med, b_med, e_med / b_med, copies,
                          float(np.median(mixed_ms)) if mixed_ms else None)


def print_engine(result: EngineBench) -> None:
    print(f"\nmodel {result.model} on {result.device} ({result.dtype}), context {result.context or 'default'}")
    print(f"{'sessions':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'enc':>6} {'lm':>6} {'dec':>6} {'RTF':>5} "
          f"{'RSS MiB':>8} {'GPU MiB':>8}")
    for p in result.points:
        gpu = f"{p.gpu_mib:8.0f}" if p.gpu_mib is not None else f"{'-':>8}"
        print(f"{p.sessions:>8} {p.step_ms['p50']:8.1f} {p.step_ms['p95']:8.1f} {p.step_ms['p99']:8.1f} "
              f"{p.encode_ms:6.1f} {p.lm_ms:6.1f} {p.decode_ms:6.1f} {p.rtf:5.2f} {p.rss_mib:8.0f} {gpu}")
    print(f"largest session count with p99 < {FRAME_MS:.0f} ms: {result.max_sessions_p99_under_frame}")
    for o in result.overhead:
        print(f"engine overhead at {o.sessions} session(s): engine {o.engine_ms:.2f} ms / bare loop {o.bare_ms:.2f} ms "
              f"= {o.ratio:.3f} ({100 * (o.ratio - 1):+.1f} %)")
        if len(o.bare_copies_ms) > 1:
            spread = max(o.bare_copies_ms) / min(o.bare_copies_ms)
            print(f"  the bare loop on {len(o.bare_copies_ms)} copies of the weights: "
                  f"{', '.join(f'{ms:.2f}' for ms in o.bare_copies_ms)} ms (spread {spread:.3f}: the noise floor)")
        if o.per_seat_sampling_ms is not None:
            print(f"  with every seat on its own sampling settings: engine {o.per_seat_sampling_ms:.2f} ms "
                  f"= {o.per_seat_sampling_ms / o.bare_ms:.3f} of the bare loop")


# ---------------------------------------------------------------------------------------------
# End to end: real WebSocket clients at real time against the served app
# ---------------------------------------------------------------------------------------------

@dataclass
class E2EResult:
    clients: int
    seconds: float
    sent_s: list[float]
    received_s: list[float]
    errors: list[str]
    frame_latency_ms: dict[str, float] | None
    voice_to_voice_ms: dict[str, float] | None
    user_turns: int
    answered_turns: int
    input_dropped: int
    output_dropped: int
    late_ticks: int
    rss_start_mib: float  # before the calls
    rss_warm_mib: float  # 15 s in: every call running
    rss_end_mib: float
    rss_max_mib: float
    step_ms: dict[str, float | None]


def run_clients(url: str, clients: int, seconds: float) -> list[dict]:
    """K clients at once (run in a child process, so the server's figures are its own: its memory,
    and no client competing for its interpreter lock). Returns a summary per client, with the id
    the server gave its call."""
    from agent.tools.wsclient import talk

    audio = telugu_speech(seconds)

    async def everyone():
        return await asyncio.gather(*(talk(url, audio, tail_seconds=0.5) for _ in range(clients)))

    return [{"sent": r.sent_seconds, "received": r.received_seconds, "errors": r.errors, "call_id": r.call_id}
            for r in asyncio.run(everyone())]


def bench_e2e(config: ModelConfig, clients: int, seconds: float) -> E2EResult:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from agent.config import ServerConfig
    from agent.service import build_service, settle_heap
    from agent.web.server import serve_in_background

    service = build_service(config, EngineConfig(max_sessions=clients), ServerConfig())
    server = serve_in_background(service)
    settle_heap()  # as app.py does once everything is built
    rss_start = rss_mib()
    samples: list[tuple[float, float]] = []  # (seconds since start, RSS MiB), once a second
    done = threading.Event()

    def sample_memory() -> None:
        t0 = time.monotonic()
        while not done.wait(1.0):
            samples.append((time.monotonic() - t0, rss_mib()))

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            url = server.url.replace("http://", "ws://") + "/websocket/offer"
            results = pool.submit(run_clients, url, clients, seconds).result()
        time.sleep(1.0)
        done.set()
        rss_end = rss_mib()
        warm = [m for t, m in samples if t >= 15.0]
        sessions = [service.registry.get(r["call_id"]) for r in results]
        frame_lat = [v for s in sessions if s for _, v in s.frame_latency.items()]
        turns = [t for s in sessions if s for t in s.latency.turns]
        answered = [t.latency_ms for t in turns if t.latency_ms is not None]
        stats = service.metric_values()
        return E2EResult(
            clients, seconds, [r["sent"] for r in results], [r["received"] for r in results],
            [e for r in results for e in r["errors"]], percentiles(frame_lat) if frame_lat else None,
            percentiles(answered) if answered else None, len(turns), len(answered),
            int(stats["input_dropped"]), int(stats["output_dropped"]), int(stats["late_ticks"]),
            rss_start, warm[0] if warm else rss_end, rss_end, max([m for _, m in samples] + [rss_end]),
            service.engine.stats.step.summary())
    finally:
        server.stop()
        service.close()


def print_e2e(r: E2EResult) -> None:
    print(f"\n{r.clients} WebSocket clients x {r.seconds:.0f} s of Telugu speech at real time")
    print(f"  audio sent per client   min {min(r.sent_s):.1f} s, received min {min(r.received_s):.1f} s")
    if r.frame_latency_ms:
        f = r.frame_latency_ms
        print(f"  frame latency           p50 {f['p50']:.0f} ms  p95 {f['p95']:.0f} ms  p99 {f['p99']:.0f} ms")
    print(f"  step                    p50 {r.step_ms['p50_ms'] or 0:.1f} ms  p99 {r.step_ms['p99_ms'] or 0:.1f} ms")
    if r.voice_to_voice_ms:
        v = r.voice_to_voice_ms
        print(f"  voice-to-voice          p50 {v['p50']:.0f} ms  p95 {v['p95']:.0f} ms ({r.answered_turns} turns)")
    else:
        print(f"  voice-to-voice          none measured: {r.user_turns} user turns, the agent never spoke "
              "(a random-weight model answers with noise, which the VAD rightly ignores)")
    print(f"  dropped in / out        {r.input_dropped} / {r.output_dropped}; late ticks {r.late_ticks}")
    print(f"  server memory (RSS)     {r.rss_start_mib:.0f} MiB before, {r.rss_warm_mib:.0f} MiB 15 s in, "
          f"{r.rss_end_mib:.0f} MiB at the end (max {r.rss_max_mib:.0f})")
    if r.errors:
        print(f"  errors                  {r.errors[:5]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (CPU) or moshi-7b-random (GPU), or any --model of app.py")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--context", type=int, default=None, help="LM context in frames (e.g. 3000 or 750)")
    p.add_argument("--max-sessions", type=int, default=8, help="the pool (batch) size")
    p.add_argument("--frames", type=int, default=200, help="timed steps per point, after 10 warm-up steps")
    p.add_argument("--overhead-at", default="1,8", help="session counts for the engine/bare-loop ratio")
    p.add_argument("--bare-copies", type=int, default=2,
                   help="copies of the weights the bare loop runs on (their mean is the reference; 1 on a "
                        "GPU short of memory)")
    p.add_argument("--e2e", type=int, default=0, help="run K real WebSocket clients instead")
    p.add_argument("--seconds", type=float, default=30.0, help="E2E call length")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--prompts", action="store_true",
                   help="call-start latency of prompted calls and what 4 calls joining do to the others "
                        "(agent/tools/prompt_bench.py; a model that takes prompts)")
    args = p.parse_args(argv)
    config = ModelConfig(model=args.model, device=args.device, dtype=args.dtype, context=args.context)
    if args.prompts:
        from agent.tools.prompt_bench import bench_prompts, print_prompts

        result = bench_prompts(config, pool=args.max_sessions)
        print_prompts(result)
    elif args.e2e:
        result = bench_e2e(config, args.e2e, args.seconds)
        print_e2e(result)
    else:
        result = bench_engine(config, args.max_sessions, args.frames)
        for k in [int(x) for x in args.overhead_at.split(",") if x.strip()]:
            result.overhead.append(bench_overhead(config, k, args.frames, bare_copies=args.bare_copies))
        print_engine(result)
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
