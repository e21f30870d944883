"""Calls that start from a voice/text prompt: the catalogue, the call hub, /api/chat with
PersonaPlex's query names, fastrtc's WebSocket query, /metrics. A real server on 127.0.0.1 serving
the tiny PersonaPlex-layout checkpoint (random weights)."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request

import aiohttp
import numpy as np
import pytest
import websockets

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.config import TINY_MODEL, TINY_PERSONAPLEX_MODEL, EngineConfig, ModelConfig, ServerConfig
from agent.engine.prompts import PromptSpec
from agent.errors import CallRefused, CatalogueError
from agent.tools.wsclient import encode_media
from agent.voices import load_catalogue
from conftest import free_port, wait_until
from tiny_helpers import varied_audio

PERSONA = "మీరు రవి, ఒక స్నేహపూర్వక ప్రయాణ సహాయకుడు."


def test_persona_catalogue_maps_each_voice_to_a_prompt_and_offers_personas(tmp_path):
    cat = load_catalogue()
    assert {v.id: v.prompt for v in cat.voices} == {"lakshmi": "NATF0", "sravani": "NATF1", "ravi": "NATM0",
                                                    "kiran": "NATM1"}
    assert {p.language for p in cat.personas} == {"te", "en"} and len(cat.personas) >= 4
    presets = ["NATF0", "NATF1", "NATF2", "NATM0", "NATM1"]
    resolve = lambda **kw: cat.prompt_voice(cat.settings(**kw), presets)  # noqa: E731
    assert resolve(voice="ravi") == "NATM0"
    assert resolve(voice_prompt="NATF2.pt") == "NATF2"  # as PersonaPlex's web client sends it
    assert resolve(voice_prompt="kiran") == "NATM1"
    for bad in ("NOBODY.pt", "/etc/passwd", "../voices/NATF0.wav", str(tmp_path / "x.wav")):
        with pytest.raises(CatalogueError, match="unknown voice prompt"):
            resolve(voice_prompt=bad)
    assert cat.voice_support("m", {}, presets)["ravi"].supported
    assert not cat.voice_support("m", {}, ["NATF0"])["ravi"].supported
    with pytest.raises(CatalogueError, match="characters"):
        cat.settings(text_prompt="x" * 5000)
    # no emotion LUT on a prompted model: the persona carries the emotion
    happy = cat.emotion("happy").prompt
    assert cat.prompt_text(cat.settings(emotion="happy", text_prompt=PERSONA)) == f"{PERSONA} {happy}"
    assert cat.prompt_text(cat.settings(emotion="happy")) == happy
    assert cat.prompt_text(cat.settings(text_prompt="  ")) is None  # neutral, no persona: no role
    assert all(s.supported for s in cat.emotion_support({}, text_prompts=True).values())
    assert not any(s.supported for s in cat.emotion_support({}).values())


def test_persona_catalogue_wav_voice_needs_a_licence_line(tmp_path):
    raw = json.loads((load_catalogue.__defaults__[0]).read_text(encoding="utf-8"))
    raw["voices"][0]["prompt"] = "voices/lakshmi.wav"
    path = tmp_path / "cat.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(CatalogueError, match="prompt_licence"):
        load_catalogue(path)
    raw["voices"][0]["prompt_licence"] = "Recorded by the operator with the speaker's written consent; CC-BY-4.0"
    path.write_text(json.dumps(raw), encoding="utf-8")
    assert load_catalogue(path).voices[0].prompt_licence.startswith("Recorded")


@pytest.fixture(scope="module")
def persona_server():
    from agent.service import build_service
    from agent.web.server import BackgroundServer, build_app, build_stream
    from agent.web.ui import build_demo

    service = build_service(ModelConfig(model=TINY_PERSONAPLEX_MODEL, device="cpu"), EngineConfig(max_sessions=3),
                            ServerConfig(), warm_up=False)
    app = build_app(service, build_demo(service), build_stream(service))
    server = BackgroundServer(app, "127.0.0.1", free_port()).start()
    yield service, server
    server.stop()
    service.close()


def test_prompt_call_hub_starts_each_call_from_its_prompt(persona_server):
    service, _ = persona_server
    hub = service.hub
    session = hub.open("hub-call", hub.catalogue.settings("sravani", text_prompt=PERSONA))
    try:
        for frame in varied_audio(3, 1).reshape(-1, FRAME_SIZE):
            session.receive(SAMPLE_RATE, frame)
        assert wait_until(lambda: session.seat.prompt, 30) == PromptSpec("NATF1", PERSONA)
    finally:
        hub.close(session, "done")
    sad = hub.open("sad-call", hub.catalogue.settings("ravi", "sad", text_prompt=PERSONA))
    try:
        for frame in varied_audio(2, 2).reshape(-1, FRAME_SIZE):
            sad.receive(SAMPLE_RATE, frame)
        assert wait_until(lambda: sad.seat.prompt, 30).text == f"{PERSONA} {hub.catalogue.emotion('sad').prompt}"
    finally:
        hub.close(sad, "done")
    with pytest.raises(CallRefused, match="unknown voice prompt"):
        hub.open("bad", hub.catalogue.settings(voice_prompt="SOMEONE.wav"))
    assert service.seats_in_use() == 0  # a refused prompt leaves no seat taken


def test_prompt_model_without_prompts_ignores_them():
    """Kyutai's checkpoints (here: tiny, the same layout) take no prompt: calls start as before."""
    from agent.service import build_service

    service = build_service(ModelConfig(model=TINY_MODEL, device="cpu"), EngineConfig(max_sessions=1), warm_up=False)
    try:
        assert service.engine.prompt_presets() is None
        session = service.hub.open("plain", service.catalogue.settings(text_prompt=PERSONA, voice_prompt="NATF2"))
        assert session.seat.prompt is None
        service.hub.close(session, "done")
    finally:
        service.close()


async def api_chat(url: str, n_frames: int = 8, while_connected=lambda: None) -> tuple[bytes, int]:
    """Connect, send n Opus frames of audio, return (first message, audio messages received);
    `while_connected()` is called before hanging up."""
    import sphn

    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        first = await ws.receive_bytes(timeout=30)
        if first != b"\x00":
            return first, 0
        writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        received = 0
        for frame in varied_audio(n_frames, 3).reshape(-1, FRAME_SIZE):
            pages = writer.append_pcm(frame)
            if len(pages):
                await ws.send_bytes(b"\x01" + pages)
            await asyncio.sleep(0.08)
        deadline = asyncio.get_running_loop().time() + 10
        while received < 2 and asyncio.get_running_loop().time() < deadline:
            try:
                msg = await ws.receive_bytes(timeout=1)
            except TimeoutError:
                continue
            received += msg[:1] == b"\x01"
        while_connected()
        return first, received


def test_prompt_api_chat_takes_personaplex_query_names(persona_server):
    service, server = persona_server
    base = server.url.replace("http", "ws") + "/api/chat"
    query = urllib.parse.urlencode({  # exactly what PersonaPlex's web client sends (client/src/.../Conversation.tsx)
        "text_temperature": "0.7", "text_topk": "25", "audio_temperature": "0.8", "audio_topk": "250", "pad_mult": "0",
        "text_seed": "-1", "audio_seed": "1234", "repetition_penalty_context": "64", "repetition_penalty": "1",
        "text_prompt": PERSONA, "voice_prompt": "NATM1.pt"})
    calls = []
    first, audio_messages = asyncio.run(api_chat(f"{base}?{query}", while_connected=lambda: calls.extend(
        s for s in service.registry.live() if s.call_id.startswith("kyutai-"))))
    assert first == b"\x00" and audio_messages >= 1
    assert len(calls) == 1 and calls[0].seat.prompt == PromptSpec("NATM1", PERSONA)
    assert calls[0].settings.text_prompt == PERSONA
    for bad, message in (("voice_prompt=NOBODY.pt", b"unknown voice prompt"), ("seed=abc", b"seed"),
                         ("audio_seed=1.5", b"audio_seed"),
                         ("text_prompt=" + "x" * 2500, b"characters")):
        first, _ = asyncio.run(api_chat(f"{base}?{bad}", n_frames=0))
        assert first[:1] == b"\x05" and message in first, first
    metrics = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    assert "agent_prompt_cache_entries" in metrics and "agent_prompts_restored_total" in metrics
    entries = float(next(line.split()[-1] for line in metrics.splitlines()
                         if line.startswith("agent_prompt_cache_entries ")))
    assert entries >= 1


def test_prompt_websocket_query_parameters_choose_the_persona(persona_server):
    service, server = persona_server
    query = urllib.parse.urlencode({"voice": "lakshmi", "text_prompt": PERSONA})
    url = f"ws://127.0.0.1:{server.url.rsplit(':', 1)[1]}/websocket/offer?{query}"

    async def call() -> tuple[int, str | None]:
        """(media messages received, the call id the server gave)"""
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"event": "start", "websocket_id": "persona-ws"}))
            audio = varied_audio(6, 4)
            for k in range(0, audio.size, 480):
                await ws.send(json.dumps(encode_media(audio[k:k + 480])))
                await asyncio.sleep(0.02)
            got, call_id = 0, None
            deadline = asyncio.get_running_loop().time() + 10
            while got < 3 and asyncio.get_running_loop().time() < deadline:
                try:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 1))
                except TimeoutError:
                    continue
                got += msg.get("event") == "media"
                if msg.get("type") == "call":  # WebSocket call ids are the server's, told in this message
                    call_id = msg["call_id"]
            return got, call_id

    got, call_id = asyncio.run(call())
    assert got >= 1 and call_id
    session = wait_until(lambda: service.registry.get(call_id), 30)
    assert session.seat.prompt == PromptSpec("NATF0", PERSONA)


def test_persona_box_on_the_page_starts_the_call_and_keeps_it(persona_server):
    """The page sends [webrtc value, voice, emotion, 4 sampling values, persona, preset voice]
    (ui.build_demo): they start the call; a new persona during the call is kept for the next call
    (the caller is warned), while sampling still changes live."""
    from agent.transports.fastrtc_handler import MoshiHandler
    from agent.web.ui import build_demo

    service, _ = persona_server
    config = build_demo(service).config
    ready = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "persona-ready")
    assert {choice[1] for choice in ready["props"]["choices"]} == {p.text for p in service.catalogue.personas}
    preset = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "voice-prompt")
    assert [choice[1] for choice in preset["props"]["choices"]] == ["", "NATF0", "NATF1", "NATM0", "NATM1"]
    handler = MoshiHandler(service.hub)
    handler.latest_args = ["__webrtc_value__", "page-call", "kiran", "neutral", 0.0, 1.0, 0.0, 1.0, PERSONA, ""]
    try:
        asyncio.run(handler.receive((24_000, np.zeros(1920, np.int16))))
        session = handler.session
        assert wait_until(lambda: session.seat.prompt, 30) == PromptSpec("NATM1", PERSONA)
        handler.latest_args[2], handler.latest_args[-2] = "lakshmi", "You are someone else now."
        handler.latest_args[4] = 0.5
        asyncio.run(handler.receive((24_000, np.zeros(1920, np.int16))))
        assert session.settings.text_prompt == PERSONA and session.settings.voice == "kiran"
        assert dict(session.settings.sampling)["temp_text"] == 0.5
        assert session.seat.prompt == PromptSpec("NATM1", PERSONA) and not session.closed
    finally:
        handler.shutdown()
    handler = MoshiHandler(service.hub)  # the preset list chooses a voice prompt of its own
    handler.latest_args = ["__webrtc_value__", "page-call-2", "kiran", "neutral", 0.0, 1.0, 0.0, 1.0, "", "NATF1"]
    try:
        asyncio.run(handler.receive((24_000, np.zeros(1920, np.int16))))
        assert wait_until(lambda: handler.session.seat.prompt, 30) == PromptSpec("NATF1", None)
    finally:
        handler.shutdown()


@pytest.mark.slow
def test_prompt_api_chat_caller_is_told_when_the_context_is_full():
    """A prompted /api/chat call that reaches the context gets a 0x05 message saying why."""
    from agent.service import build_service
    from agent.web.server import BackgroundServer, build_app, build_stream
    from agent.web.ui import build_demo

    service = build_service(ModelConfig(model=TINY_PERSONAPLEX_MODEL, device="cpu", context=120),
                            EngineConfig(max_sessions=1), ServerConfig(), warm_up=False)
    server = BackgroundServer(build_app(service, build_demo(service), build_stream(service)), "127.0.0.1",
                              free_port()).start()

    async def call() -> bytes:
        import sphn

        url = server.url.replace("http", "ws") + "/api/chat?voice=lakshmi"
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            assert await ws.receive_bytes(timeout=30) == b"\x00"
            writer = sphn.OpusStreamWriter(SAMPLE_RATE)
            frames = iter(varied_audio(200, 8).reshape(-1, FRAME_SIZE))

            async def talk():
                for frame in frames:
                    pages = writer.append_pcm(frame)
                    if len(pages):
                        await ws.send_bytes(b"\x01" + pages)
                    await asyncio.sleep(0.04)  # faster than real time: the engine keeps up on a tiny model

            talker = asyncio.create_task(talk())
            try:
                while True:
                    msg = await ws.receive(timeout=60)
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        return b""
                    if msg.data[:1] == b"\x05":
                        return msg.data
            finally:
                talker.cancel()

    try:
        message = asyncio.run(call())
        assert message.startswith(b"\x05") and b"context" in message and b"persona" in message
    finally:
        server.stop()
        service.close()


@pytest.mark.slow
def test_prompt_websocket_caller_is_told_when_the_call_starts_over_at_the_context():
    """A prompted fastrtc WebSocket call that reaches the context starts over from its prompt, and
    the client gets a warning saying why."""
    from agent.service import build_service
    from agent.web.server import BackgroundServer, build_app, build_stream
    from agent.web.ui import build_demo

    service = build_service(ModelConfig(model=TINY_PERSONAPLEX_MODEL, device="cpu", context=120),
                            EngineConfig(max_sessions=1), ServerConfig(), warm_up=False)
    server = BackgroundServer(build_app(service, build_demo(service), build_stream(service)), "127.0.0.1",
                              free_port()).start()

    async def call() -> list[dict]:
        url = f"ws://127.0.0.1:{server.url.rsplit(':', 1)[1]}/websocket/offer?voice=lakshmi"
        notes: list[dict] = []
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"event": "start", "websocket_id": "context-ws"}))
            audio = varied_audio(200, 9)

            async def talk():
                for k in range(0, audio.size, 960):
                    await ws.send(json.dumps(encode_media(audio[k:k + 960])))
                    await asyncio.sleep(0.02)  # 2x real time: the tiny engine keeps up

            talker = asyncio.create_task(talk())
            try:
                deadline = asyncio.get_running_loop().time() + 60
                while asyncio.get_running_loop().time() < deadline and not notes:
                    try:
                        msg = json.loads(await asyncio.wait_for(ws.recv(), 1))
                    except TimeoutError:
                        continue
                    if msg.get("type") == "warning":
                        notes.append(msg)
            finally:
                talker.cancel()
        return notes

    try:
        notes = asyncio.run(call())
        assert notes and "starts over" in notes[0]["message"] and "context" in notes[0]["message"]
    finally:
        server.stop()
        service.close()
