"""What the VAD costs per call, as CPU time (not wall time, so a busy machine changes it little):

    python -m agent.tools.loadtest vad --calls 1,16,64

N calls of Telugu speech (espeak-ng) on both directions, each direction offset in the recording so
calls differ, judged as the server's VAD hub does (`TurnLatencyTracker.judge_all`, one batched
Silero call per window round) on a thread set up as the hub's thread is (its torch intra-op
threads: `agent.calls.vad.VAD_TORCH_THREADS`). Prints CPU ms per 80 ms tick (the judging thread and
the whole process, which includes torch's worker threads) and % of a core per call.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from agent import FRAME_SECONDS, FRAME_SIZE


@dataclass
class VadCost:
    calls: int
    ticks: int
    thread_ms_per_tick: float
    process_ms_per_tick: float
    per_call_pct: float  # process CPU per call, % of one core


def measure(calls: int, ticks: int = 150, warmup: int = 20) -> VadCost:
    import torch

    from agent.audio.espeak import telugu_speech
    from agent.calls import vad

    audio = telugu_speech(30.0)
    frames = audio[:audio.size // FRAME_SIZE * FRAME_SIZE].reshape(-1, FRAME_SIZE)
    trackers = [vad.TurnLatencyTracker(label=str(i)) for i in range(calls)]
    vad.Silero.shared()
    out: list[VadCost] = []

    def tick(k: int) -> None:
        for i, t in enumerate(trackers):
            t.on_user_audio(frames[(k + 7 * i) % len(frames)], k * FRAME_SECONDS)
            t.on_agent_audio(frames[(k + 3 * i + 11) % len(frames)], k * FRAME_SECONDS)
        vad.TurnLatencyTracker.judge_all(trackers)

    def run() -> None:
        setup = getattr(vad, "use_own_torch_threads", None)  # absent before the hub had its own count
        if setup is not None:
            setup(vad.VAD_TORCH_THREADS, lambda: None)
        for k in range(warmup):
            tick(k)
        t0, p0 = time.thread_time(), time.process_time()
        for k in range(warmup, warmup + ticks):
            tick(k)
        t1, p1 = time.thread_time(), time.process_time()
        out.append(VadCost(calls, ticks, round(1e3 * (t1 - t0) / ticks, 2), round(1e3 * (p1 - p0) / ticks, 2),
                           round(100 * (p1 - p0) / (ticks * FRAME_SECONDS) / calls, 3)))

    threads = torch.get_num_threads()
    worker = threading.Thread(target=run, name="vad-cost")
    worker.start()
    worker.join()
    torch.set_num_threads(threads)  # the default for new threads, as VadHub.start restores it
    return out[0]


def run_vad_cost(counts: list[int], ticks: int = 150) -> list[VadCost]:
    print(f"{'calls':>5} {'thread ms/tick':>14} {'process ms/tick':>15} {'% core/call':>11}")
    results = []
    for n in counts:
        r = measure(n, ticks)
        results.append(r)
        print(f"{r.calls:>5} {r.thread_ms_per_tick:>14.2f} {r.process_ms_per_tick:>15.2f} {r.per_call_pct:>11.3f}",
              flush=True)
    return results
