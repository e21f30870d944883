"""The served app on 127.0.0.1 with real WebSocket clients (fastrtc's protocol) and the real handler."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import numpy as np
import pytest
import requests
import websockets

from agent import SAMPLE_RATE
from agent.tools.wsclient import encode_media, talk
from agent.transports.fastrtc_handler import MoshiHandler
from agent.web.ui import readouts
from conftest import wait_until


def test_page_and_health(live_server):
    page = requests.get(live_server.url + "/", timeout=10)
    assert page.status_code == 200 and "gradio" in page.text.lower()
    health = requests.get(live_server.url + "/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["random_weights"] is True and health["seats_total"] == 3


@pytest.mark.slow
def test_call_streams_back_at_real_time_pace_with_readouts(live_server, telugu_dialogue):
    _, audio = telugu_dialogue
    result = asyncio.run(talk(live_server.ws_url, audio, tail_seconds=0.5))
    assert result.errors == []
    call_id = result.call_id
    sent = result.sent_seconds
    assert result.received_seconds >= sent - 0.5, (result.received_seconds, sent)
    # continuous: audio arrived in every second of the call, not in a burst at the end
    seconds = {int(at - result.started_at) for at, _ in result.arrivals}
    assert len(seconds) >= int(sent) - 1, sorted(seconds)
    # real-time pace: by the time half the audio was sent, about half had come back
    half = result.started_at + sent / 2
    got_by_half = sum(n for at, n in result.arrivals if at <= half) / SAMPLE_RATE
    assert got_by_half >= sent / 2 - 0.6
    assert np.isfinite(result.audio).all() and np.abs(result.audio).max() > 0

    session = live_server.service.registry.get(call_id)
    assert session is not None, "the call is not in the registry"
    figures = session.figures()
    assert figures.frames_in >= int(sent / 0.08) - 2 and figures.frames_out >= figures.frames_in - 2
    assert figures.frame_latency_ms["p50"] is not None and figures.frame_latency_ms["p50"] > 0
    # both user turns of the dialogue were detected (the random model's reply is noise, not speech)
    assert len(session.latency.turns) == 2, session.latency.turns
    transcript, table, plot, status = readouts(live_server.service, call_id)
    assert "Frame latency" in table and "Step" in table and " ms" in table
    assert set(plot["series"]) >= {"step"} and len(plot) > 10
    assert wait_until(lambda: live_server.service.engine.seats_in_use() == 0), "seat not freed after stop"
    status = readouts(live_server.service, call_id)[3]
    assert "call ended" in status.lower() and "client left" in status and "Record" in status


@pytest.mark.slow
def test_full_house_gets_a_clear_answer_and_others_go_on(live_server, telugu_speech):
    _, audio = telugu_speech
    engine = live_server.service.engine
    held = [engine.acquire(f"page-caller-{i}") for i in range(engine.num_seats)]  # e.g. callers on the page
    try:
        t0 = time.monotonic()
        result = asyncio.run(talk(live_server.ws_url, audio[:SAMPLE_RATE], tail_seconds=0.3))
        assert any(f"All {engine.num_seats} seats are in use" in e for e in result.errors), result.messages
        first_error = min(at for at, _ in result.arrivals) if result.arrivals else None
        assert first_error is None  # no audio was served to the refused caller
        assert time.monotonic() - t0 < 1.0 + 1.3 + 1.0
        assert all(not seat.closed for seat in held), "a refused caller touched an existing call"
    finally:
        for seat in held:
            seat.release()
    result = asyncio.run(talk(live_server.ws_url, audio[:SAMPLE_RATE], tail_seconds=0.3))
    assert result.errors == [] and result.received_seconds > 0.5  # a freed seat serves at once


async def _vanish_after(url: str, audio: np.ndarray, seconds: float) -> None:
    ws = await websockets.connect(url)
    await ws.send(json.dumps({"event": "start", "websocket_id": uuid.uuid4().hex}))
    t0 = time.monotonic()
    for i in range(0, int(seconds * SAMPLE_RATE), 480):
        await ws.send(json.dumps(encode_media(audio[i:i + 480])))
        await asyncio.sleep(max(0.0, t0 + (i + 480) / SAMPLE_RATE - time.monotonic()))
    ws.transport.abort()  # the network drops: no stop event, no close handshake


@pytest.mark.slow
def test_client_vanishing_mid_call_frees_its_seat_and_spares_others(live_server, telugu_speech):
    _, audio = telugu_speech
    engine = live_server.service.engine

    async def scenario():
        steady = asyncio.create_task(talk(live_server.ws_url, audio, tail_seconds=0.5))
        await _vanish_after(live_server.ws_url, audio, 1.5)
        return await steady

    result = asyncio.run(scenario())
    assert result.errors == [] and result.received_seconds >= result.sent_seconds - 0.5
    # its seat waits for it to resume the call, then is freed
    resume_s = live_server.service.hub.resume_seconds
    assert wait_until(lambda: engine.seats_in_use() == 0,
                      timeout=resume_s + 10), "the vanished client's seat was not freed"


@pytest.mark.slow
def test_malformed_messages_are_answered_and_the_call_goes_on(live_server, telugu_speech):
    _, audio = telugu_speech
    bad = ["not json", "[1, 2]", '{"event": "dance"}', '{"event": "media"}',
           '{"event": "media", "media": {"payload": "@@not base64@@"}}',
           json.dumps({"event": "media", "media": {"payload": "A" * 80_000}})]
    result = asyncio.run(talk(live_server.ws_url, audio[:2 * SAMPLE_RATE], raw_messages=bad, tail_seconds=0.3))
    errors = [m["message"] for m in result.messages if m.get("type") == "error"]
    assert len(errors) == len(bad), result.messages
    assert all(e.startswith("bad message:") for e in errors)
    assert result.received_seconds >= result.sent_seconds - 0.5  # the same call still works


def test_handler_takes_any_rate_layout_dtype_and_survives_garbage(live_server):
    """The handler fastrtc calls, given what different transports and broken clients send."""
    service = live_server.service
    handler = MoshiHandler(service.hub)
    t = np.arange(48_000 // 5) / 48_000
    tone48 = np.sin(2 * np.pi * 220 * t)
    chunks = [
        (48_000, (tone48 * 16000).astype(np.int16).reshape(1, -1)),  # browser WebRTC
        (16_000, np.sin(2 * np.pi * 220 * np.arange(3200) / 16_000).astype(np.float32)),  # 16 kHz float
        (44_100, np.stack([tone48[:8820], tone48[:8820]]).astype(np.float64)),  # stereo float64 (C, N)
        (24_000, np.stack([tone48[:4800], tone48[:4800]], axis=1).astype(np.float32)),  # stereo (N, C)
        (24_000, np.full(4800, np.nan, np.float32)),  # NaN
        (24_000, np.full(4800, np.inf, np.float32)),  # Inf
        (24_000, np.zeros(0, np.float32)),  # empty
        (24_000, np.zeros(30 * 24_000, np.float32)),  # 30 s in one chunk: refused
        (0, np.zeros(480, np.int16)),  # no rate: refused
        "garbage",  # not a (rate, samples) pair
    ]

    async def call():
        for chunk in chunks:
            await handler.receive(chunk)
        session = handler.session
        assert session is not None and not session.closed
        assert session.bad_chunks == 2
        assert session._input_report.non_finite == 2 * 4800
        outputs = []
        deadline = time.monotonic() + 10
        while len(outputs) < 6 and time.monotonic() < deadline:
            out = await handler.emit()
            if out is not None:
                outputs.append(out)
        return outputs

    try:
        outputs = asyncio.run(call())
        assert len(outputs) >= 6
        for rate, pcm in outputs:
            assert rate == SAMPLE_RATE and pcm.dtype == np.int16 and pcm.shape == (1, 1920)
    finally:
        handler.shutdown()
    assert wait_until(lambda: service.engine.seats_in_use() == 0)


@pytest.mark.parametrize("voice, emotion", [("ravi", "sad")])
def test_page_inputs_reach_the_session(live_server, voice, emotion):
    handler = MoshiHandler(live_server.service.hub)
    handler.latest_args = ["__webrtc_value__", "some-webrtc-id", voice, emotion]
    try:
        asyncio.run(handler.receive((24_000, np.zeros(1920, np.int16))))
        assert handler.session.settings.voice == voice and handler.session.settings.emotion == emotion
        handler.latest_args = ["__webrtc_value__", "some-webrtc-id", "kiran", emotion]
        asyncio.run(handler.receive((24_000, np.zeros(1920, np.int16))))
        assert handler.session.settings.voice == "kiran"
    finally:
        handler.shutdown()


def test_a_call_whose_seat_the_engine_freed_is_ended_before_the_next_opens():
    """No audio for the idle timeout frees the seat; the next chunk opens a new call, and the old
    one leaves the registry and the VAD thread (nothing of it lingers)."""
    from conftest import make_service

    service = make_service(max_sessions=1, idle_timeout_s=0.3)
    handler = MoshiHandler(service.hub)
    try:
        asyncio.run(handler.receive((24_000, np.zeros(1920, np.int16))))
        first = handler.session
        assert first is not None and len(service.vad) == 1
        assert wait_until(lambda: first.closed, timeout=5), "the idle seat was not freed"
        asyncio.run(handler.receive((24_000, np.zeros(1920, np.int16))))
        second = handler.session
        assert second is not first and not second.closed
        assert service.registry.live() == [second] and len(service.vad) == 1
    finally:
        handler.shutdown()
        service.close()
    assert len(service.vad) == 0 and service.registry.live() == []


@pytest.mark.slow
def test_websocket_client_chooses_voice_and_sampling_in_its_url(live_server, telugu_speech):
    """fastrtc's WebSocket clients have no page inputs: the URL's query carries their choices."""
    from agent.engine.sampling import SeatSampling

    _, speech = telugu_speech
    query = "?voice=kiran&emotion=happy&audio_temperature=0.3&text_topk=5"
    result = asyncio.run(talk(live_server.ws_url + query, speech[:SAMPLE_RATE]))
    assert result.received_seconds > 0.5 and not result.errors
    session = live_server.service.registry.get(result.call_id)
    assert (session.settings.voice, session.settings.emotion) == ("kiran", "happy")
    assert session.figures().sampling == SeatSampling(temp=0.3, temp_text=0.7, top_k=250, top_k_text=5)

    refused = asyncio.run(talk(live_server.ws_url + "?audio_topk=many", speech[:SAMPLE_RATE // 2]))
    assert any("audio_topk" in e for e in refused.errors), refused.messages
