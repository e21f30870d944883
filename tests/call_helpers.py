"""Clients of a live server, as callers reach it: credentials and a refused handshake's status, an aiortc
WebRTC call with a real-time microphone, Opus pages for Kyutai's /api/chat."""

from __future__ import annotations

import asyncio
import base64
import uuid

import aiohttp
import numpy as np
import sphn
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.tools.callers import speech_track

BASIC = {"Authorization": "Basic " + base64.b64encode(b"ana:s3cret").decode()}


def refused_status(url: str, headers: dict | None = None) -> int:
    async def go():
        try:
            async with websockets.connect(url, additional_headers=headers):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code
    return asyncio.run(go())


def opus_pages(audio: np.ndarray) -> list[bytes]:
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    return [p for f in audio[:audio.size // FRAME_SIZE * FRAME_SIZE].reshape(-1, FRAME_SIZE)
            if len(p := writer.append_pcm(f))]


WEBRTC_RATE = 48_000
PTIME = 0.02


async def webrtc_call(base_url: str, audio: np.ndarray, seconds: float,
                      page_component: int | None = None) -> tuple[float, float, list[str]]:
    """Returns (seconds of audio received, seconds sent, data-channel messages). With
    `page_component` (the page's call component id) the offer goes where the page sends it."""
    pc = RTCPeerConnection()
    channel = pc.createDataChannel("text")  # fastrtc expects a data channel before the offer
    messages: list[str] = []
    channel.on("message", messages.append)
    mic = speech_track(audio)
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
