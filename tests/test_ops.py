"""Operating the server: readiness, Prometheus metrics from real calls, graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import websockets

from agent import SAMPLE_RATE
from agent.tools.wsclient import talk
from conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_readiness_follows_seats_and_drain(live_server, telugu_speech):
    url, service = live_server.url, live_server.service
    assert requests.get(url + "/readyz", timeout=5).status_code == 200
    held = [service.engine.acquire(f"x{i}") for i in range(service.engine.num_seats)]
    full = requests.get(url + "/readyz", timeout=5)
    assert full.status_code == 503 and full.json()["reason"] == "all seats in use"
    held.pop().release()
    assert requests.get(url + "/readyz", timeout=5).status_code == 200
    for seat in held:
        seat.release()

    service.hub.draining = True
    try:
        drained = requests.get(url + "/readyz", timeout=5)
        assert drained.status_code == 503 and drained.json()["reason"] == "draining"
        _, audio = telugu_speech
        # a new call is refused before it starts (503: a load balancer tries another server)
        with pytest.raises(websockets.InvalidStatus) as refused:
            asyncio.run(talk(live_server.ws_url, audio[:SAMPLE_RATE], tail_seconds=0.3))
        assert refused.value.response.status_code == 503 and b"restarting" in refused.value.response.body
        assert "agent_draining 1.0" in requests.get(url + "/metrics", timeout=5).text
    finally:
        service.hub.draining = False
    assert requests.get(url + "/readyz", timeout=5).status_code == 200


@pytest.mark.slow
def test_metrics_change_with_real_calls(live_server, telugu_speech):
    url, service = live_server.url, live_server.service
    before = requests.get(url + "/metrics", timeout=5)
    assert before.headers["content-type"].startswith("text/plain")
    b = before.text
    _, audio = telugu_speech
    asyncio.run(talk(live_server.ws_url, audio[:2 * SAMPLE_RATE], tail_seconds=0.3))
    # a call ends on the hub's call-setup threads, and earlier calls may still be held for resuming
    wait_until(lambda: service.engine.seats_in_use() == 0, 15, "the calls' seats were not freed")
    held = [service.engine.acquire(f"x{i}") for i in range(service.engine.num_seats)]
    asyncio.run(talk(live_server.ws_url, audio[:SAMPLE_RATE // 2], tail_seconds=0.2))  # refused
    in_use = metric(requests.get(url + "/metrics", timeout=5).text, "agent_seats_in_use")
    for seat in held:
        seat.release()
    a = requests.get(url + "/metrics", timeout=5).text
    assert metric(a, "agent_calls_started_total") >= metric(b, "agent_calls_started_total") + 1
    assert metric(a, "agent_calls_refused_total") == metric(b, "agent_calls_refused_total") + 1
    assert metric(a, "agent_step_seconds_count") >= metric(b, "agent_step_seconds_count") + 20
    assert metric(a, "agent_seats_total") == service.engine.num_seats
    assert in_use == service.engine.num_seats and metric(a, "agent_seats_in_use") == 0
    for name in ("agent_input_dropped_total", "agent_output_dropped_total", "agent_late_ticks_total",
                 "agent_voice_to_voice_seconds_count"):
        metric(a, name)


@pytest.mark.slow
def test_sigterm_drains_live_call_then_exits_zero(telugu_speech):
    port = free_port()
    env = dict(os.environ, NO_TORCH_COMPILE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "app.py", "--model", "tiny", "--device", "cpu", "--port", str(port),
                             "--max-sessions", "2", "--drain-seconds", "30"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)

        _, audio = telugu_speech
        outcome: dict = {}
        call = threading.Thread(target=lambda: outcome.update(
            result=asyncio.run(talk(f"ws://127.0.0.1:{port}/websocket/offer", audio[:4 * SAMPLE_RATE],
                                    tail_seconds=0.5))))
        call.start()
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["reason"] == "draining"
        assert proc.poll() is None, "the server quit while a call was live"
        call.join(timeout=30)
        result = outcome["result"]
        assert result.errors == [] and result.received_seconds >= result.sent_seconds - 0.5
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert "draining" in output and "drained" in output, output[-2000:]
