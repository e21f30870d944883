"""A real WebRTC client (aiortc) calls the served app through fastrtc's /webrtc/offer endpoint."""

from __future__ import annotations

import asyncio
import fractions
import time
import uuid

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from av import AudioFrame

from agent import SAMPLE_RATE
from agent.audio.stream import resample

WEBRTC_RATE = 48_000
PTIME = 0.02


class SpeechTrack(MediaStreamTrack):
    """A microphone that says the given audio (then silence) at real-time pace, in 20 ms frames."""

    kind = "audio"

    def __init__(self, audio_24k: np.ndarray):
        super().__init__()
        audio = resample(audio_24k, SAMPLE_RATE, WEBRTC_RATE)
        self.pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        self.samples = int(WEBRTC_RATE * PTIME)
        self.sent = 0
        self.t0: float | None = None

    async def recv(self) -> AudioFrame:
        if self.t0 is None:
            self.t0 = time.monotonic()
        await asyncio.sleep(max(0.0, self.t0 + self.sent / WEBRTC_RATE - time.monotonic()))
        chunk = self.pcm[self.sent:self.sent + self.samples]
        chunk = np.pad(chunk, (0, self.samples - chunk.size))
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = WEBRTC_RATE
        frame.pts = self.sent
        frame.time_base = fractions.Fraction(1, WEBRTC_RATE)
        self.sent += self.samples
        return frame


async def webrtc_call(base_url: str, audio: np.ndarray, seconds: float,
                      page_component: int | None = None) -> tuple[float, float, list[str]]:
    """Returns (seconds of audio received, seconds sent, data-channel messages). With
    `page_component` (the page's call component id) the offer goes where the page sends it."""
    pc = RTCPeerConnection()
    channel = pc.createDataChannel("text")  # fastrtc expects a data channel before the offer
    messages: list[str] = []
    channel.on("message", messages.append)
    mic = SpeechTrack(audio)
    pc.addTrack(mic)
    received = {"samples": 0.0}
    done = asyncio.Event()

    @pc.on("track")
    def on_track(track):
        async def reader():
            try:
                while not done.is_set():
                    frame = await track.recv()
                    received["samples"] += frame.samples / frame.sample_rate
            except Exception:
                pass
        asyncio.ensure_future(reader())

    await pc.setLocalDescription(await pc.createOffer())
    webrtc_id = uuid.uuid4().hex
    offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "webrtc_id": webrtc_id}
    url = f"{base_url}/webrtc/offer"
    if page_component is not None:  # what the page's WebRTC component posts (a Gradio server function)
        url = f"{base_url}/gradio_api/component_server"
        offer = {"data": offer, "component_id": page_component, "fn_name": "offer", "session_hash": webrtc_id}
    async with aiohttp.ClientSession() as http, http.post(url, json=offer) as resp:
        answer = await resp.json()
    assert "sdp" in answer, answer
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    await asyncio.sleep(seconds)
    done.set()
    sent = mic.sent / WEBRTC_RATE
    await pc.close()
    return received["samples"], sent, messages


def test_webrtc_client_talks_and_hears_back(live_server, telugu_speech):
    _, audio = telugu_speech
    received, sent, messages = asyncio.run(webrtc_call(live_server.url, audio, seconds=6.0))
    # aiortc's jitter buffer and ICE set-up eat the first few hundred ms; the rest flows at real time
    assert sent > 5.0
    assert received >= sent - 1.5, (received, sent)
    assert not [m for m in messages if '"error"' in m], messages
    engine = live_server.service.engine
    deadline = time.monotonic() + 10
    while engine.seats_in_use() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.seats_in_use() == 0, "the WebRTC call's seat was not freed after hang-up"
