"""What a call costs the host beyond the model: real callers of each transport against a real server.

    python -m agent.tools.loadtest cost --transports webrtc,ws,chat --calls 1,4,8,16 --seconds 20
    python -m agent.tools.loadtest cost --transports ws --calls 8 --profile      # + py-spy's split

The server (tiny model) runs in this process with as many seats as the largest point; the callers
(agent/tools/callers.py) run in child processes, so every thread of the server is the server's. For
each transport and call count: the server's CPU per thread, from /proc/self/task/*/stat sampled every
half second, grouped by thread (the engine's tick thread, uvicorn's event loop, the VAD, ...); the CPU
*outside* the engine thread less what the idle server spends there, per call; the engine's tick
lateness (how long after it was due each tick started, p50/p99); the frame latency (input frame
complete -> its answer taken by the transport); frames dropped; audio sent and received per call.
With --profile, py-spy samples the server (not pausing it) and splits the outside-the-engine samples
by component (the innermost frame that names one). docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agent.ops.metrics import RollingWindow, percentiles

TICKS = os.sysconf("SC_CLK_TCK")
# The CPU window opens once every call of a point has had its first agent frame (set-up: offer,
# ICE, DTLS, the first tick is left out, however long it took) and closes this long before the
# first of them ends (each caller runs `seconds` from its own first frame or so).
TAIL_S = 1.5
SETUP_TIMEOUT_S = 30.0
MIN_WINDOW_S = 2.0
RESUME_S = 2.0  # a dropped call's seat is held this long (15 s by default) before the next point
ENGINE_THREAD = "frame-engine"
# innermost frame's file -> component (first match wins, checked innermost frame first)
COMPONENTS = (
    ("aiortc", "WebRTC: aiortc (DTLS/SRTP/RTP, jitter buffer, Opus)"),
    ("aioice", "WebRTC: ICE (aioice)"),
    ("/av/", "WebRTC: PyAV (Opus codec, resampler)"),
    ("agent/audio/stream", "resampling / framing (agent.audio.stream)"),
    ("agent/calls/vad", "VAD (Silero)"),
    ("silero", "VAD (Silero)"),
    ("onnxruntime", "VAD (Silero)"),
    ("sphn", "Opus for /api/chat (sphn)"),
    ("agent/tools/wsclient", "μ-law/base64/JSON"),
    ("base64", "μ-law/base64/JSON"),
    ("json/", "μ-law/base64/JSON"),
    ("agent/calls", "sessions (agent.calls)"),
    ("agent/transports", "transports (agent.transports)"),
    ("fastrtc", "fastrtc"),
    ("websockets", "WebSocket frames (websockets, uvicorn)"),
    ("uvicorn", "WebSocket frames (websockets, uvicorn)"),
    ("starlette", "WebSocket frames (websockets, uvicorn)"),
    ("asyncio", "asyncio event loop"),
    ("threading", "thread wake-ups (threading)"),
)


@dataclass
class CostPoint:
    transport: str
    calls: int
    window_s: float
    cpu_by_thread: dict[str, float]  # share of one core per thread group during the window
    engine_cpu: float  # share of one core: the engine's tick thread
    outside_cpu: float  # share of one core: every other thread of the server
    outside_idle_cpu: float  # the same with no call (subtracted below)
    per_call_outside_pct: float  # (outside - idle) / calls, % of one core
    lateness_ms: dict[str, float | None]
    ticks: int
    frame_latency_ms: dict[str, float] | None
    sent_s: list[float]
    received_s: list[float]
    input_dropped: int
    output_dropped: int
    late_ticks: int  # seats that sat a tick out for want of a frame
    errors: list[str]
    components: dict[str, float] = field(default_factory=dict)  # share of the outside samples (py-spy)


def thread_cpu(native_id: int) -> float:
    """CPU seconds (user + system) of one thread of this process (OSError once it has ended)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def task_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by native thread id."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            out[int(task.name)] = thread_cpu(int(task.name))
        except OSError:  # the thread ended
            continue
    return out


def thread_group(name: str) -> str:
    """A readable group for a Python thread's name (numbered workers share one)."""
    for prefix, group in (("AnyIO worker", "AnyIO workers"), ("asyncio_", "asyncio executor"),
                          ("ThreadPoolExecutor", "thread pools"), ("Thread-", "other Python threads")):
        if name.startswith(prefix):
            return group
    return name


class ThreadCpuMeter:
    """Per-thread CPU of this process, accumulated from samples every `every` s (threads that end
    between two samples lose at most that much). The meter's own thread is left out."""

    def __init__(self, every: float = 0.5):
        self.every = every
        self._totals: Counter[int] = Counter()
        self._names: dict[int, str] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cost-meter", daemon=True)

    def __enter__(self) -> ThreadCpuMeter:
        self._last = task_cpu()
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.monotonic() - self._t0

    def _sample(self) -> None:
        now = task_cpu()
        for tid, cpu in now.items():
            self._totals[tid] += cpu - self._last.get(tid, 0.0)
        self._last = now
        for t in threading.enumerate():
            if t.native_id is not None:
                self._names[t.native_id] = t.name

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def by_group(self) -> dict[str, float]:
        """Share of one core per thread group over the window; threads with no Python name are
        `native` (torch's pools, codec threads)."""
        groups: Counter[str] = Counter()
        for tid, cpu in self._totals.items():
            name = self._names.get(tid, "native")
            if name != "cost-meter":
                groups[thread_group(name)] += cpu / self.seconds
        return {k: round(v, 4) for k, v in groups.most_common()}


def outside(groups: dict[str, float]) -> float:
    """CPU outside the engine's tick thread; MainThread is this benchmark waiting, not the server."""
    return sum(v for k, v in groups.items() if k not in (ENGINE_THREAD, "MainThread"))


# -- py-spy -------------------------------------------------------------------------------------

class Profiler:
    """py-spy on this process for a window, in raw (collapsed-stack) form with thread ids, not pausing it."""

    def __init__(self, seconds: float, rate: int = 50):
        self.out = Path(tempfile.mkdtemp()) / "pyspy.txt"
        self.proc = subprocess.Popen(
            [shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy", "record",
 "--pid", str(os.getpid()), "--rate", str(rate), "--duration", str(int(seconds)),
             "--format", "raw", "--threads", "--nonblocking", "--full-filenames", "--output", str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def components(self, engine_tid: int | None) -> dict[str, float]:
        """Share of the sampled outside-the-engine stacks per component."""
        _, err = self.proc.communicate(timeout=60)
        if not self.out.is_file():
            return {"py-spy failed: " + (err or b"").decode(errors="replace")[-200:]: 1.0}
        counts: Counter[str] = Counter()
        for line in self.out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            head, *frames = stack.split(";")  # head: "thread (NATIVE_ID): name"
            if engine_tid is not None and head.startswith(f"thread ({engine_tid})"):
                continue
            counts[component(frames, head.partition(": ")[2])] += int(n)
        total = sum(counts.values()) or 1
        return {k: round(v / total, 3) for k, v in counts.most_common()}


def component(frames: list[str], thread: str) -> str:
    for frame in reversed(frames):
        if "Thread._bootstrap" in frame or "Thread.run " in frame:
            break
        for needle, name in COMPONENTS:
            if needle in frame:
                return name
    return f"other ({thread_group(thread)})"


# -- the run ------------------------------------------------------------------------------------

def first_frames(service, calls: int, seen: set[str], timeout: float) -> dict[str, float]:
    """When each new call (not in `seen`) had its first agent frame handed to its transport, as
    polled every 20 ms; returns when `calls` of them have one, or at `timeout` with those that do."""
    firsts: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(firsts) < calls and time.monotonic() < deadline:
        for s in service.registry.live():
            if s.call_id not in seen and s.call_id not in firsts and s.seat.counters.frames_out > 0:
                firsts[s.call_id] = time.monotonic()
        time.sleep(0.02)
    return firsts


def run_point(service, base: str, transport: str, calls: int, seconds: float, idle_outside: float,
              profile: bool) -> CostPoint:
    from agent.tools.callers import call_many

    engine = service.engine
    before = dict(service.metric_values())
    procs = max(1, min(4, math.ceil(calls / 8)))
    share = [calls // procs + (1 if i < calls % procs else 0) for i in range(procs)]
    seen = {s.call_id for s in service.registry.live()}
    setup_errors = []
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(call_many, transport, base, n, seconds) for n in share]
        firsts = first_frames(service, calls, seen, SETUP_TIMEOUT_S + seconds / 2)
        if len(firsts) < calls:
            setup_errors.append(f"only {len(firsts)} of {calls} calls had an agent frame before the window")
        end = (min(firsts.values()) if firsts else time.monotonic()) + seconds - TAIL_S
        window = end - time.monotonic()
        if window < MIN_WINDOW_S:
            setup_errors.append(f"window {window:.1f} s: set-up took most of the call; use a longer --seconds")
            window = MIN_WINDOW_S
        engine.stats.lateness = RollingWindow()  # this point's ticks only
        ticks0 = engine.stats.ticks
        profiler = Profiler(window) if profile else None
        with ThreadCpuMeter() as meter:
            time.sleep(window)
        sessions = service.registry.live()
        ticks = engine.stats.ticks - ticks0
        lateness = engine.stats.lateness_ms()
        results = [r for f in futures for r in f.result()]
    groups = meter.by_group()
    engine_thread = next((t for t in threading.enumerate() if t.name == ENGINE_THREAD), None)
    frame_lat = [v for s in sessions for _, v in s.frame_latency.items()]
    after = service.metric_values()
    out = outside(groups)
    return CostPoint(
        transport, calls, round(meter.seconds, 1), groups, groups.get(ENGINE_THREAD, 0.0), round(out, 4),
        round(idle_outside, 4), round(100 * (out - idle_outside) / calls, 2), lateness, ticks,
        percentiles(frame_lat) if frame_lat else None, [round(r["sent_s"], 1) for r in results],
        [round(r["received_s"], 1) for r in results],
        int(after["input_dropped"] - before["input_dropped"]), int(after["output_dropped"] - before["output_dropped"]),
        int(after["late_ticks"] - before["late_ticks"]), (setup_errors + [e for r in results for e in r["errors"]])[:5],
        profiler.components(engine_thread.native_id if engine_thread else None) if profiler else {})


def wait_calls_over(service, timeout: float = 30.0) -> None:
    """Until the last point's calls let their seats go (a WebRTC call hung up by closing its peer
    may be held for RESUME_S first), so the next point's calls all find one."""
    deadline = time.monotonic() + timeout
    while service.seats_in_use() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)


def run_cost(transports: list[str], counts: list[int], seconds: float, model: str = "tiny",
             profile: bool = False) -> list[CostPoint]:
    from agent.config import EngineConfig, ModelConfig, ServerConfig
    from agent.service import build_service, settle_heap
    from agent.web.server import serve_in_background

    service = build_service(ModelConfig(model=model, device="cpu" if model == "tiny" else None),
                            EngineConfig(max_sessions=max(counts)),
                            ServerConfig(max_connections_per_client=4 * max(counts) + 16, resume_seconds=RESUME_S))
    server = serve_in_background(service)
    settle_heap()
    points = []
    try:
        with ThreadCpuMeter() as idle:
            time.sleep(5.0)
        idle_outside = outside(idle.by_group())
        for transport in transports:
            for calls in counts:
                points.append(run_point(service, server.url, transport, calls, seconds, idle_outside, profile))
                print_point(points[-1], header=len(points) == 1)
                wait_calls_over(service)
    finally:
        server.stop()
        service.close()
    return points


def print_point(p: CostPoint, header: bool = False) -> None:
    if header:
        print(f"\n{'transport':>9} {'calls':>5} {'engine':>7} {'outside':>8} {'/call %':>8} {'late p50':>9} "
              f"{'late p99':>9} {'frame p50':>9} {'frame p99':>9} {'recv/sent':>9} {'drop in/out':>11} {'frozen':>6}")
    lat = p.lateness_ms
    f = p.frame_latency_ms or {}
    ratio = sum(p.received_s) / max(sum(p.sent_s), 1e-9)
    print(f"{p.transport:>9} {p.calls:>5} {p.engine_cpu:7.2f} {p.outside_cpu:8.3f} {p.per_call_outside_pct:8.2f} "
          f"{lat['p50'] or 0:9.1f} {lat['p99'] or 0:9.1f} {f.get('p50', 0):9.0f} {f.get('p99', 0):9.0f} "
          f"{ratio:9.2f} {p.input_dropped:>5}/{p.output_dropped:<5} {p.late_ticks:>6}", flush=True)
    top = ", ".join(f"{k} {v:.3f}" for k, v in list(p.cpu_by_thread.items())[:6])
    print(f"{'':>15} threads (cores): {top}; idle outside {p.outside_idle_cpu:.3f}; {p.ticks} ticks in "
          f"{p.window_s:.0f} s", flush=True)
    if p.components:
        print(f"{'':>15} outside the engine, by component: "
              + ", ".join(f"{k} {100 * v:.0f} %" for k, v in p.components.items()), flush=True)
    if p.errors:
        print(f"{'':>15} errors: {p.errors}", flush=True)
