"""Holding up under faults and bad input, on a live server: a silent client costs no CPU, bad
credentials are refused, a failing engine step resets and tells its callers, the per-client cap
holds for every transport, /api/chat ends at the time limit, calls hold no thread each, call set-up
runs off the event loop, a reused websocket_id cannot touch another call, the VAD inbox is bounded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import requests
import websockets

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.calls.hub import CALL_SETUP_WORKERS
from agent.calls.vad import MAX_INBOX_CHUNKS, TurnLatencyTracker
from agent.config import EngineConfig, ServerConfig
from agent.engine import FAILING_AFTER, FrameEngine
from agent.ops.access import Credentials
from agent.tools.wsclient import encode_media, talk
from call_helpers import opus_pages, webrtc_call
from conftest import LiveServer, live_server_fixture, tiny_model, wait_until
from tiny_helpers import GREEDY, frames_of, varied_audio

ROOT = Path(__file__).resolve().parent.parent
IDLE_TIMEOUT_S = 1.5


server = live_server_fixture(max_sessions=8, idle_timeout_s=IDLE_TIMEOUT_S)


def metric(server: LiveServer, name: str) -> float:
    for line in requests.get(server.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.slow
def test_reliab_silent_connected_client_costs_no_cpu(server, telugu_speech):
    """A client that stays connected but sends nothing: once the engine frees its seat the server
    must sleep, not spin (it used to take a whole core for as long as the client stayed)."""
    _, audio = telugu_speech

    async def go() -> float:
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(json.dumps({"event": "start", "websocket_id": uuid.uuid4().hex}))
            for i in range(0, SAMPLE_RATE // 2, 480):
                await ws.send(json.dumps(encode_media(audio[i:i + 480])))
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + IDLE_TIMEOUT_S + 10
            while server.service.seats_in_use():  # silent: the engine frees the seat
                assert time.monotonic() < deadline, "the silent client's seat was never freed"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            cpu0, wall0 = time.process_time(), time.monotonic()
            await asyncio.sleep(3.0)  # still connected, still silent
            return (time.process_time() - cpu0) / (time.monotonic() - wall0)

    share = asyncio.run(go())
    assert share < 0.10, f"an idle connected client cost {100 * share:.0f} % of a core"


def test_reliab_non_ascii_and_undecodable_credentials_get_401():
    guarded = LiveServer(max_sessions=1, server_config=ServerConfig(auth="ana:s3cret"))
    try:
        offer = guarded.url + "/webrtc/offer"
        non_ascii = "Basic " + base64.b64encode("అనా:పాస్వర్డ్".encode()).decode()
        undecodable = "Basic " + base64.b64encode(b"\xff:\xfe").decode()
        for header in (non_ascii, "Basic అనా".encode(), b"Basic \xff\xfe\xc3(", undecodable):
            response = requests.post(offer, json={}, headers={"Authorization": header}, timeout=5)
            assert response.status_code == 401, (header, response.status_code)

        async def ws_status() -> int:
            try:
                async with websockets.connect(guarded.ws_url, additional_headers={"Authorization": non_ascii}):
                    return 101
            except websockets.InvalidStatus as exc:
                return exc.response.status_code
        assert asyncio.run(ws_status()) == 401
    finally:
        guarded.close()
    # non-ASCII credentials themselves work when they are the right ones
    creds = Credentials.parse("అనా:పాస్")
    assert creds.check_header("Basic " + base64.b64encode("అనా:పాస్".encode()).decode())
    assert not creds.check_header("Basic " + base64.b64encode("అనా:పాస".encode()).decode())


class FlakyStep:
    """Fault injection: the LM step raises while armed, otherwise it is the real one."""

    def __init__(self, step):
        self.step, self.armed = step, False

    def __call__(self, *args, **kwargs):
        if self.armed:
            raise RuntimeError("injected fault: CUDA error: an illegal memory access was encountered")
        return self.step(*args, **kwargs)


def last_output(seat):
    frames = []
    while (frame := seat.pull()) is not None:
        frames.append(frame)
    return frames[-1]


def test_fault_failed_step_resets_only_its_seats_and_tells_them():
    engine = FrameEngine(tiny_model(), EngineConfig(max_sessions=2), GREEDY)
    flaky = FlakyStep(engine.lm_gen.step)
    engine.lm_gen.step = flaky
    a, b = engine.acquire("a"), engine.acquire("b")
    warm = engine.lm_gen.max_delay + 2
    frames = frames_of(varied_audio(warm + 2, seed=3))
    for frame in frames[:warm]:  # both seats past Moshi's acoustic delay: their output is voiced
        a.push(frame)
        b.push(frame)
        engine.step_once()
    assert last_output(a).voiced and last_output(b).voiced
    flaky.armed = True
    a.push(frames[warm])  # only a is in the failing step; b has no input and sits it out
    with pytest.raises(RuntimeError, match="injected"):
        engine.step_once()
    assert engine.stats.step_failures == 1
    assert a.take_notices() and not b.take_notices()
    flaky.armed = False
    a.push(frames[warm + 1])
    b.push(frames[warm + 1])
    engine.step_once()
    assert not a.pull().voiced, "the failed seat was not reset (it would still be past the acoustic delay)"
    assert b.pull().voiced, "a seat outside the failed step was disturbed"
    assert engine.health()[0]


@pytest.mark.slow
def test_fault_engine_failing_is_told_counted_and_unready(server, telugu_speech):
    engine = server.service.engine
    flaky = FlakyStep(engine.lm_gen.step)
    engine.lm_gen.step = flaky
    _, audio = telugu_speech
    failures_before = metric(server, "agent_step_failures_total")
    outcome: dict = {}

    def fault_while_talking() -> None:
        wait_until(lambda: engine.seats_in_use() == 1, 10, "the call did not start")
        time.sleep(0.8)
        flaky.armed = True
        try:
            wait_until(lambda: requests.get(server.url + "/readyz", timeout=5).status_code == 503, 10,
                       "/readyz stayed 200 while every step failed")
            outcome["reason"] = requests.get(server.url + "/readyz", timeout=5).json()["reason"]
        finally:
            flaky.armed = False

    try:
        injector = threading.Thread(target=fault_while_talking)
        injector.start()
        result = asyncio.run(talk(server.ws_url, audio[:4 * SAMPLE_RATE], tail_seconds=0.5))
        injector.join()
    finally:
        engine.lm_gen.step = flaky.step
    assert "engine failing" in outcome["reason"]
    warnings = [m.get("message", "") for m in result.messages if m.get("type") == "warning"]
    assert any("restarted this conversation" in w for w in warnings), result.messages
    assert metric(server, "agent_step_failures_total") >= failures_before + FAILING_AFTER
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 200  # healthy again
    # the call went on after the fault: audio kept coming
    assert result.arrivals and result.arrivals[-1][0] - result.started_at > 3.0


async def api_chat(url: str, audio: np.ndarray, headers: dict | None = None, seconds: float = 3.0) -> list[bytes]:
    """Speak into /api/chat at real-time pace; the server's messages, in order, until it closes or time is up."""
    got: list[bytes] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        async def reader():
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    got.append(msg.data)
        task = asyncio.create_task(reader())
        t0 = time.monotonic()
        for page in opus_pages(audio):
            if ws.closed or time.monotonic() - t0 > seconds:
                break
            await ws.send_bytes(b"\x01" + page)
            await asyncio.sleep(FRAME_SIZE / SAMPLE_RATE)
        try:
            await asyncio.wait_for(task, timeout=max(0.5, seconds - (time.monotonic() - t0)))
        except TimeoutError:
            task.cancel()
    return got


@pytest.mark.slow
def test_reliab_api_chat_ends_at_the_call_time_limit(telugu_speech):
    limited = LiveServer(max_sessions=1, server_config=ServerConfig(max_call_seconds=1.5))
    try:
        _, audio = telugu_speech
        t0 = time.monotonic()
        got = asyncio.run(api_chat(f"ws://127.0.0.1:{limited.port}/api/chat", audio, seconds=6.0))
        errors = [m[1:].decode() for m in got if m[:1] == b"\x05"]
        assert any("time limit" in e for e in errors), errors
        assert time.monotonic() - t0 < 5.5, "the call went on past its limit"
        wait_until(lambda: limited.service.seats_in_use() == 0, 5, "the seat was not freed")
    finally:
        limited.close()


@pytest.mark.slow
def test_reliab_call_cap_holds_for_every_transport(telugu_speech):
    """One address, cap 1: a live WebRTC call made the way the page makes it blocks a WebSocket
    call, an /api/chat call and a WebRTC call at /webrtc/offer from the same address. WebRTC calls
    used to be uncounted."""
    capped = LiveServer(max_sessions=3, server_config=ServerConfig(max_calls_per_client=1))
    try:
        _, audio = telugu_speech

        page_call = next(b for b in capped.demo.blocks.values() if getattr(b, "elem_id", None) == "call")

        async def go():
            page = asyncio.create_task(webrtc_call(capped.url, audio, seconds=8.0, page_component=page_call._id))
            deadline = time.monotonic() + 15
            while capped.service.seats_in_use() < 1:
                assert time.monotonic() < deadline, "the page's WebRTC call did not start"
                await asyncio.sleep(0.1)
            ws = await talk(capped.ws_url, audio[:SAMPLE_RATE], tail_seconds=0.3)
            chat = await api_chat(f"ws://127.0.0.1:{capped.port}/api/chat", audio, seconds=1.5)
            rtc = await webrtc_call(capped.url, audio, seconds=2.5)
            in_use = capped.service.seats_in_use()
            return await page, ws, chat, rtc, in_use

        (page_received, _, _), ws, chat, (rtc_received, _, rtc_messages), in_use = asyncio.run(go())
        assert in_use == 1
        assert any("At most 1 call" in e for e in ws.errors), ws.messages
        assert ws.received_seconds == 0
        assert chat[:1] and chat[0][:1] == b"\x05" and b"At most 1 call" in chat[0], chat[:2]
        assert any("At most 1 call" in m for m in rtc_messages), rtc_messages
        assert page_received > 3.0, "the page's call itself was disturbed"
    finally:
        capped.close()


@pytest.mark.slow
def test_reliab_calls_hold_no_thread_each(server, telugu_speech):
    """Eight concurrent WebSocket calls: the server's thread count grows by at most the call-set-up
    pool, not by a thread (or two) per call."""
    _, audio = telugu_speech
    before = threading.active_count()
    peak = {"threads": before}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["threads"] = max(peak["threads"], threading.active_count())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()

    async def calls():
        return await asyncio.gather(*[talk(server.ws_url, audio[:2 * SAMPLE_RATE], tail_seconds=0.3)
                                      for _ in range(8)])
    try:
        results = asyncio.run(calls())
    finally:
        done.set()
        sampler.join()
    assert all(r.received_seconds > 1.0 and not r.errors for r in results), [r.errors for r in results]
    grown = peak["threads"] - 1 - before  # less the sampler itself
    assert grown <= CALL_SETUP_WORKERS + 1, f"threads grew by {grown} for 8 calls"


@pytest.mark.slow
def test_reliab_call_setup_runs_off_the_event_loop(server, telugu_speech, monkeypatch):
    hub = server.service.hub
    seen: list[tuple[str, str]] = []
    real_open, real_close = hub.open, hub.close

    def spy_open(*args, **kwargs):
        seen.append(("open", threading.current_thread().name))
        return real_open(*args, **kwargs)

    def spy_close(*args, **kwargs):
        seen.append(("close", threading.current_thread().name))
        return real_close(*args, **kwargs)

    monkeypatch.setattr(hub, "open", spy_open)
    monkeypatch.setattr(hub, "close", spy_close)
    _, audio = telugu_speech
    asyncio.run(talk(server.ws_url, audio[:SAMPLE_RATE], tail_seconds=0.3))
    asyncio.run(api_chat(f"ws://127.0.0.1:{server.port}/api/chat", audio, seconds=1.0))
    wait_until(lambda: sum(kind == "close" for kind, _ in seen) >= 2, 5, f"calls not closed: {seen}")
    loop_thread = server.server.thread.name
    assert {kind for kind, _ in seen} == {"open", "close"}
    assert all(name != loop_thread for _, name in seen), seen


@pytest.mark.slow
def test_reliab_reused_websocket_id_neither_ends_nor_takes_over_a_call(server, telugu_speech):
    """Two clients send the same websocket_id. The first leaves early; the second's call goes on,
    on the same seat (never reopened), and both seats are freed as soon as each client leaves."""
    _, audio = telugu_speech
    engine = server.service.engine
    started = engine.stats.calls_started

    async def go():
        first = asyncio.create_task(talk(server.ws_url, audio[:SAMPLE_RATE], websocket_id="same", tail_seconds=0.2))
        await asyncio.sleep(0.3)
        second = asyncio.create_task(talk(server.ws_url, audio[:4 * SAMPLE_RATE], websocket_id="same",
                                          tail_seconds=0.3))
        await asyncio.sleep(0.8)
        live_ids = {s.call_id for s in server.service.registry.live()}
        return await first, await second, live_ids

    first, second, live_ids = asyncio.run(go())
    assert len(live_ids) == 2, f"two calls, two ids: {live_ids}"
    assert not first.errors and not second.errors, (first.messages, second.messages)
    assert second.received_seconds >= second.sent_seconds - 1.0
    wait_until(lambda: engine.seats_in_use() == 0, 3, "a seat stayed taken after its client left")
    assert engine.stats.calls_started - started == 2, "a call was ended and reopened"


def test_reliab_vad_inbox_is_bounded():
    tracker = TurnLatencyTracker()
    frame = np.zeros(FRAME_SIZE, np.float32)
    for k in range(4 * MAX_INBOX_CHUNKS):  # the VAD never gets to judge: it has fallen behind
        tracker.on_user_audio(frame, k * 0.08)
        tracker.on_agent_audio(frame, k * 0.08)
    assert tracker.inbox_chunks == MAX_INBOX_CHUNKS
    assert tracker.inbox_dropped == 8 * MAX_INBOX_CHUNKS - MAX_INBOX_CHUNKS
    tracker.process()
    assert tracker.inbox_chunks == 0


# ---------------------------------------------------------------------------------------------
# Encapsulation: the running agent does not know its transports (privates: tests/test_architecture.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reliab_service_knows_no_transport():
    """agent.service (models, engines, calls) imports neither the fastrtc handler nor fastrtc."""
    probe = ("import sys, agent.service; "
             "print(sorted(m for m in sys.modules if m in ('fastrtc', 'agent.transports.fastrtc_handler')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


@contextlib.contextmanager
def server_errors():
    """The ERROR records uvicorn logs meanwhile ("Exception in ASGI application": an unhandled
    exception in a connection). uvicorn's loggers do not propagate to pytest's caplog."""
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = errors.append  # type: ignore[method-assign]
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(handler)
    try:
        yield errors
    finally:
        uvicorn_log.removeHandler(handler)


@pytest.mark.slow
def test_reliab_binary_garbage_and_leaving_before_start_raise_nothing_on_the_server(server, telugu_speech):
    """Found by `python -m agent.tools.loadtest fuzz`: a binary message on fastrtc's WebSocket (a KeyError
    inside starlette) and a client that leaves before "start" (fastrtc's clean-up AttributeError)
    were unhandled exceptions in the server. Now: an error answer, and a quiet close."""
    _, audio = telugu_speech

    async def go():
        async with websockets.connect(server.ws_url) as ws:  # leaves before "start"
            await ws.send(b"\x00\x01 not json")
        async with websockets.connect(server.ws_url):
            pass
        return await talk(server.ws_url, audio[:SAMPLE_RATE], raw_messages=[b"\xff\xfe binary"], tail_seconds=0.3)

    with server_errors() as errors:
        result = asyncio.run(go())
        time.sleep(0.5)
    assert any("binary messages" in e for e in result.errors), result.messages
    assert result.received_seconds > 0.5  # the call went on
    assert not errors, [r.getMessage() for r in errors]


def test_reliab_refused_callers_who_leave_at_once_raise_nothing_on_the_server(server, telugu_speech):
    """Also found by the fuzz run: a refused caller (all seats taken) who is already gone made the
    server's refusal raise (/api/chat), and fastrtc's second close raise (WebSocket)."""
    engine = server.service.engine
    held = [engine.acquire(f"held-{i}") for i in range(engine.num_seats)]

    async def hit_and_run():
        for path in ("/api/chat", "/websocket/offer"):
            for _ in range(3):
                async with websockets.connect(f"ws://127.0.0.1:{server.port}{path}") as ws:
                    if path == "/websocket/offer":
                        await ws.send(json.dumps({"event": "start", "websocket_id": "x"}))
                        await ws.send(json.dumps(encode_media(np.zeros(480, np.float32))))
        await asyncio.sleep(1.5)

    try:
        with server_errors() as errors:
            asyncio.run(hit_and_run())
    finally:
        for seat in held:
            seat.release()
    assert not errors, [r.getMessage() for r in errors]


def test_reliab_rolling_windows_forget_values_past_their_horizon_even_unread():
    """A figure window keeps its last 60 s, read or not. It used to drop old values only when read, so
    the windows nobody polled (a WebSocket call's frame latencies, the engine's step times) filled up
    to 5,000 values each: the 10-minute soak's memory grew until minute 8 and levelled off there."""
    import tracemalloc

    from agent.ops import metrics
    from agent.ops.metrics import RollingWindow

    def held() -> int:  # bytes allocated by metrics.py only: other threads of the process allocate too
        only_metrics = tracemalloc.Filter(True, metrics.__file__)
        return sum(t.size for t in tracemalloc.take_snapshot().filter_traces([only_metrics]).traces)

    window = RollingWindow(horizon=60.0)
    frames_per_minute = 750  # 12.5 frames a second
    began = time.monotonic() - 8 * 60  # eight minutes of a call, ending now
    tracemalloc.start()
    try:
        start = held()
        for i in range(frames_per_minute):
            window.add(float(i), at=began + i / 12.5)
        after_one_minute = held() - start
        for i in range(frames_per_minute, 8 * frames_per_minute):  # seven more minutes, never read
            window.add(float(i), at=began + i / 12.5)
        after_eight_minutes = held() - start
    finally:
        tracemalloc.stop()
    assert after_eight_minutes < 1.2 * after_one_minute, (after_one_minute, after_eight_minutes)
    assert abs(len(window) - frames_per_minute) <= 2  # what a reader sees: the last minute, as before
