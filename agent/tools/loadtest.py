"""Reliability benchmarks against a real server on 127.0.0.1 (figures, not pass/fail tests):

    python -m agent.tools.loadtest load --calls 64 --seconds 20     # N concurrent WebSocket calls vs an N-seat server
    python -m agent.tools.loadtest soak --calls 8 --seconds 600     # long calls: frames lost, memory over time
    python -m agent.tools.loadtest fuzz --seconds 30                # garbage at every endpoint beside a normal call
    python -m agent.tools.loadtest cost --calls 1,4,8,16          # host CPU per call, per transport (tools/cost.py)
    python -m agent.tools.loadtest vad --calls 1,16,64            # the VAD's CPU per call (tools/vad_cost.py)

The server (tiny model unless --model) runs in this process; the clients and the fuzzer run in one
child process and the `/healthz` prober in another (so its figures are the server's, not the busy
clients'), and the server's CPU time, threads and memory are its own. Each
mode prints its figures and, with --json, writes them. docs/reliability.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from agent.audio.espeak import telugu_speech
from agent.config import EngineConfig, ModelConfig, ServerConfig
from agent.ops.metrics import percentiles, rss_mib

HEALTH_EVERY_S = 0.1


@dataclass
class ServerSample:
    seconds: float
    cpu_share: float  # of one core, since the previous sample
    threads: int
    rss_mib: float


@dataclass
class ClientFigures:
    calls: int
    answered: int  # calls that got audio back and no error
    sent_s: list[float]
    received_s: list[float]
    errors: list[str]
    health_ms: dict[str, float]  # /healthz latency percentiles, probed throughout
    health_failures: int
    fuzz_messages: int = 0


@dataclass
class Report:
    mode: str
    seats: int
    clients: ClientFigures
    server: list[ServerSample] = field(default_factory=list)
    idle_cpu_share: float = 0.0  # server CPU with every call over, measured for a few seconds
    memory_growth: list[str] = field(default_factory=list)  # --trace-memory: top allocation growth after minute 1
    engine: dict = field(default_factory=dict)  # counters from /metrics' source
    step: dict = field(default_factory=dict)


# -- the client side (child process) --------------------------------------------------------------

def probe_health(base: str, seconds: float) -> tuple[list[float], int]:
    """GET /healthz every HEALTH_EVERY_S for `seconds`: (latencies in ms, failures)."""
    import requests

    latencies, failures = [], 0
    end = time.monotonic() + seconds
    with requests.Session() as http:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                if http.get(base + "/healthz", timeout=5).status_code != 200:
                    failures += 1
                latencies.append(1e3 * (time.perf_counter() - t0))
            except requests.RequestException:
                failures += 1
            time.sleep(HEALTH_EVERY_S)
    return latencies, failures


async def _fuzz(base: str, stop: asyncio.Event, seed: int = 0) -> int:
    """Random and malformed messages at every endpoint until stopped; returns how many were sent."""
    import aiohttp

    rng = random.Random(seed)
    ws_base = base.replace("http://", "ws://")

    def junk() -> str | bytes:
        return rng.choice([
            lambda: "".join(chr(rng.randrange(1, 0x10FFFF)) for _ in range(rng.randrange(1, 200)))
                    .encode("utf-8", "replace").decode("utf-8", "replace"),
            lambda: json.dumps({"event": rng.choice(["media", "start", "stop", "ping", "x", None, 3])}),
            lambda: json.dumps({"event": "media",
                                "media": {"payload": "".join(rng.choices("AB=+/@!", k=rng.randrange(0, 5000)))}}),
            lambda: json.dumps({"event": "media", "media": {"payload": rng.randbytes(rng.randrange(0, 3000)).hex()}}),
            lambda: json.dumps([rng.random() for _ in range(rng.randrange(0, 50))]),
            lambda: rng.randbytes(rng.randrange(0, 4000)),
            lambda: "{" * rng.randrange(1, 3000),
        ])()

    sent = 0
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            target = rng.choice(["ws", "chat", "offer", "page"])
            try:
                if target in ("ws", "chat"):
                    path = "/websocket/offer" if target == "ws" else "/api/chat?voice=" + rng.choice(["", "x", "ravi"])
                    async with http.ws_connect(ws_base + path, timeout=aiohttp.ClientWSTimeout(ws_close=1)) as ws:
                        if target == "ws" and rng.random() < 0.5:
                            await ws.send_str(json.dumps({"event": "start", "websocket_id": str(rng.random())}))
                        for _ in range(rng.randrange(1, 30)):
                            message = junk()
                            if target == "chat" and rng.random() < 0.5:
                                message = b"\x01" + (message if isinstance(message, bytes) else message.encode())
                            await (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_str(message))
                            sent += 1
                        if rng.random() < 0.3:
                            await asyncio.sleep(rng.random())
                else:
                    url = base + ("/webrtc/offer" if target == "offer" else "/gradio_api/component_server")
                    body = junk()
                    if rng.random() < 0.5:
                        body = json.dumps({"sdp": str(body)[:500], "type": "offer", "webrtc_id": str(rng.random()),
                                           "fn_name": "offer", "data": {"sdp": "v=0"},
                                           "component_id": rng.randrange(50)})
                    async with http.post(url, data=body, headers={"content-type": "application/json"}) as resp:
                        await resp.read()
                    sent += 1
            except (TimeoutError, aiohttp.ClientError, ConnectionError):
                sent += 1  # refused or cut off: also an answer
            await asyncio.sleep(0.01)
    return sent


def run_clients(base: str, calls: int, seconds: float, fuzz: bool) -> dict:
    from agent.tools.wsclient import talk

    audio = telugu_speech(seconds)

    async def everything():
        stop = asyncio.Event()
        fuzzer = asyncio.create_task(_fuzz(base, stop)) if fuzz else None
        url = base.replace("http://", "ws://") + "/websocket/offer"
        results = await asyncio.gather(*(talk(url, audio, tail_seconds=0.5) for _ in range(calls)),
                                       return_exceptions=True)
        stop.set()
        return results, (await fuzzer if fuzzer else 0)

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        health = pool.submit(probe_health, base, seconds + 1.0)
        results, fuzzed = asyncio.run(everything())
        latencies, failures = health.result()
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [repr(r) for r in results if isinstance(r, BaseException)] + [e for r in ok for e in r.errors]
    return asdict(ClientFigures(
        calls=calls, answered=sum(1 for r in ok if r.received_seconds > 0 and not r.errors),
        sent_s=[round(r.sent_seconds, 2) for r in ok], received_s=[round(r.received_seconds, 2) for r in ok],
        errors=errors, health_ms=percentiles(latencies) if latencies else {}, health_failures=failures,
        fuzz_messages=fuzzed))


# -- the server side (this process) ---------------------------------------------------------------

def sample_server(stop: threading.Event, every: float = 1.0) -> list[ServerSample]:
    samples: list[ServerSample] = []
    t0 = last_wall = time.monotonic()
    last_cpu = time.process_time()
    while not stop.wait(every):
        wall, cpu = time.monotonic(), time.process_time()
        samples.append(ServerSample(round(wall - t0, 1), round((cpu - last_cpu) / (wall - last_wall), 3),
                                    threading.active_count(), round(rss_mib(), 1)))
        last_wall, last_cpu = wall, cpu
    return samples


def run(mode: str, model: str, seats: int, calls: int, seconds: float, trace_memory: bool = False) -> Report:
    from agent.service import build_service, settle_heap
    from agent.web.server import serve_in_background

    service = build_service(ModelConfig(model=model, device="cpu" if model == "tiny" else None),
                            # every client is on 127.0.0.1: the per-address cap (16) would refuse the rest
                            EngineConfig(max_sessions=seats), ServerConfig(max_connections_per_client=2 * calls + 16),
                            warm_up=False)
    server = serve_in_background(service)
    settle_heap()
    if trace_memory:  # slows the server; for finding what grows, not for the other figures
        import tracemalloc
        tracemalloc.start(8)
        baseline: list = []
        threading.Timer(60.0, lambda: baseline.append(tracemalloc.take_snapshot())).start()
    stop = threading.Event()
    samples: list[ServerSample] = []
    sampler = threading.Thread(target=lambda: samples.extend(sample_server(stop)), daemon=True)
    sampler.start()
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            clients = pool.submit(run_clients, server.url, calls, seconds, mode == "fuzz").result()
        stop.set()
        sampler.join()
        deadline = time.monotonic() + 10
        while service.seats_in_use() and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(3.0)
        idle = (time.process_time() - cpu0) / (time.monotonic() - wall0)
        growth = []
        if trace_memory and baseline:
            diff = tracemalloc.take_snapshot().compare_to(baseline[0], "lineno")
            growth = [str(stat) for stat in diff[:12]]
        return Report(mode, service.seats_total(), ClientFigures(**clients), samples, round(idle, 3),
                      growth, service.metric_values(), service.engine.stats.step.summary())
    finally:
        server.stop()
        service.close()


def print_report(r: Report) -> None:
    c = r.clients
    print(f"\n{r.mode}: {c.calls} WebSocket call(s) against {r.seats} seats")
    print(f"  answered {c.answered}/{c.calls}; errors: {len(c.errors)} {c.errors[:3]}")
    if c.sent_s:
        lost = [round(s - g, 2) for s, g in zip(c.sent_s, c.received_s)]
        print(f"  sent {min(c.sent_s):.1f}-{max(c.sent_s):.1f} s per call; received "
              f"{min(c.received_s):.1f}-{max(c.received_s):.1f} s (sent - received: max {max(lost):.2f} s)")
    h = c.health_ms
    if h:
        print(f"  /healthz during the run: p50 {h['p50']:.0f} ms, p95 {h['p95']:.0f} ms, p99 {h['p99']:.0f} ms; "
              f"failures {c.health_failures}")
    if c.fuzz_messages:
        print(f"  fuzz: {c.fuzz_messages} random or malformed messages/requests")
    if r.server:
        busy = [x.cpu_share for x in r.server]
        print(f"  server: threads max {max(x.threads for x in r.server)} (start {r.server[0].threads}); "
              f"CPU {np.mean(busy):.2f} cores on average during calls; RSS {r.server[0].rss_mib:.0f} -> "
              f"{r.server[-1].rss_mib:.0f} MiB (max {max(x.rss_mib for x in r.server):.0f})")
    print(f"  server CPU once every call ended (idle): {100 * r.idle_cpu_share:.1f} % of a core")
    e = r.engine
    print(f"  engine: calls started {e['calls_started']:.0f}, refused {e['calls_refused']:.0f}; frames dropped "
          f"in {e['input_dropped']:.0f} / out {e['output_dropped']:.0f}; late ticks {e['late_ticks']:.0f}; "
          f"step failures {e['step_failures']:.0f}")
    for line in r.memory_growth:
        print(f"  grew since minute 1: {line}")
    if r.step.get("p50_ms") is not None:
        print(f"  step p50 {r.step['p50_ms']:.0f} ms, p99 {r.step['p99_ms']:.0f} ms (real time is 80 ms)")


def run_cost_mode(args: argparse.Namespace) -> int:
    from agent.tools.cost import run_cost

    counts = [int(x) for x in (args.calls or "1,4,8,16").split(",")]
    points = run_cost(args.transports.split(","), counts, args.seconds or 20.0, args.model, args.profile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(p) for p in points], f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["load", "soak", "fuzz", "cost", "vad"])
    p.add_argument("--model", default="tiny")
    p.add_argument("--calls", default=None, help="default: 64 (load), 8 (soak), 1 (fuzz); cost: a list, 1,4,8,16")
    p.add_argument("--transports", default="webrtc,ws,chat", help="cost: which callers (webrtc, ws, chat)")
    p.add_argument("--profile", action="store_true", help="cost: py-spy's split of the CPU outside the engine")
    p.add_argument("--seats", type=int, default=None, help="default: as many as calls (at least 2)")
    p.add_argument("--seconds", type=float, default=None,
                   help="each call's speech; default 20 (load), 600 (soak), 30 (fuzz)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--trace-memory", action="store_true",
                   help="tracemalloc in the server: print what grew between minute 1 and the end (slows it)")
    args = p.parse_args(argv)
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    if args.mode == "cost":
        return run_cost_mode(args)
    if args.mode == "vad":
        from agent.tools.vad_cost import run_vad_cost
        results = run_vad_cost([int(x) for x in (args.calls or "1,16,64").split(",")], args.seconds or 8.0)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([asdict(r) for r in results], f, indent=1)
        return 0
    calls = int(args.calls) if args.calls else {"load": 64, "soak": 8, "fuzz": 1}[args.mode]
    seconds = args.seconds or {"load": 20.0, "soak": 600.0, "fuzz": 30.0}[args.mode]
    report = run(args.mode, args.model, args.seats or max(calls, 2), calls, seconds, args.trace_memory)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
