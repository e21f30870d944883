"""What the VAD costs per call, in CPU time (a busy machine changes it less than wall time):

    python -m agent.tools.loadtest vad --calls 1,16,64 [--seconds 8]

N calls of Telugu speech (espeak-ng) on both directions (each call offset in the recording, so calls
differ) fed at real time, 80 ms a frame, into the server's own `VadHub` on its own thread. Prints
Silero's calls a second per build (onnxruntime's for small batches, TorchScript's for large), the
hub thread's CPU and the whole process's (which counts torch's worker threads, and the feeding
loop, a few % of a core), per call. torch keeps the process's intra-op thread count as it finds it
(on a CPU server agent.service sets half the cores; on a GPU host it is torch's default, one per
core), so run it as the server would be configured.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from agent import FRAME_SECONDS, FRAME_SIZE
from agent.tools.cost import thread_cpu

WARMUP_FRAMES = 25


@dataclass
class VadCost:
    calls: int
    seconds: float
    torch_threads: int
    hub_thread_cores: float
    process_cores: float
    per_call_pct: float  # process CPU per call, % of one core
    inbox_dropped: int
    silero_calls_per_s: dict[str, float]  # network invocations a second, per build (onnx, torchscript)


def process_cpu() -> float:
    t = os.times()
    return t.user + t.system


def measure(calls: int, seconds: float = 8.0) -> VadCost:
    import threading

    import torch

    from agent.audio.espeak import telugu_speech
    from agent.calls.vad import Silero, TurnLatencyTracker, VadHub

    audio = telugu_speech(30.0)
    frames = audio[:audio.size // FRAME_SIZE * FRAME_SIZE].reshape(-1, FRAME_SIZE)
    earlier = {t.native_id for t in threading.enumerate()}  # a stopped hub's thread may still be ending
    hub = VadHub().start()
    trackers = [TurnLatencyTracker(label=str(i)) for i in range(calls)]
    for t in trackers:
        hub.add(t)
    hub_id = next(t.native_id for t in threading.enumerate() if t.name == "vad-hub" and t.native_id not in earlier)
    start, k = time.monotonic(), 0
    total = WARMUP_FRAMES + int(seconds / FRAME_SECONDS)
    while k < total:
        if k == WARMUP_FRAMES:
            c0, p0, w0 = thread_cpu(hub_id), process_cpu(), time.monotonic()
            n0 = dict(Silero.shared().calls)
        now = time.monotonic()
        for i, t in enumerate(trackers):
            t.on_user_audio(frames[(k + 7 * i) % len(frames)], now)
            t.on_agent_audio(frames[(k + 3 * i + 11) % len(frames)], now)
        k += 1
        time.sleep(max(0.0, start + k * FRAME_SECONDS - time.monotonic()))
    c1, p1, w1 = thread_cpu(hub_id), process_cpu(), time.monotonic()
    n1 = dict(Silero.shared().calls)
    hub.stop()
    window = w1 - w0
    return VadCost(calls, round(window, 1), torch.get_num_threads(), round((c1 - c0) / window, 4),
                   round((p1 - p0) / window, 4), round(100 * (p1 - p0) / window / calls, 3),
                   sum(t.inbox_dropped for t in trackers),
                   {k: round((n1[k] - n0[k]) / window, 1) for k in n1})


def run_vad_cost(counts: list[int], seconds: float = 8.0) -> list[VadCost]:
    print(f"{'calls':>5} {'torch threads':>13} {'hub thread':>10} {'process':>8} {'% core/call':>11} {'dropped':>7}"
          f" {'silero calls/s: onnx':>20} {'torchscript':>11}")
    results = []
    for n in counts:
        r = measure(n, seconds)
        results.append(r)
        print(f"{r.calls:>5} {r.torch_threads:>13} {r.hub_thread_cores:>10.3f} {r.process_cores:>8.3f} "
              f"{r.per_call_pct:>11.2f} {r.inbox_dropped:>7} {r.silero_calls_per_s['onnx']:>20.1f} "
              f"{r.silero_calls_per_s['torchscript']:>11.1f}", flush=True)
    return results
