"""Real callers for benchmarks, one per transport, each at real time (run them in processes of their
own, so the server's CPU figures are the server's):

- `webrtc`: an aiortc peer whose microphone speaks at 48 kHz, Opus-encoded by aiortc, as a browser sends;
- `ws`: fastrtc's WebSocket protocol (μ-law, base64, JSON), agent.tools.wsclient;
- `chat`: Kyutai's /api/chat (Ogg Opus pages of 24 kHz audio, one per 80 ms frame).

Each returns a `Called`: seconds sent and received, and any error.
"""

from __future__ import annotations

import asyncio
import fractions
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from agent import FRAME_SECONDS, FRAME_SIZE, SAMPLE_RATE
from agent.audio.stream import resample

WEBRTC_RATE = 48_000
PTIME = 0.02
SETUP_TIMEOUT_S = 30.0
TRANSPORTS = ("webrtc", "ws", "chat")


@dataclass
class Called:
    sent_s: float = 0.0
    received_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def speech_track(audio_24k: np.ndarray):
    """A microphone (an aiortc track) that says `audio_24k` then silence at real-time pace, 20 ms
    frames at 48 kHz."""
    from aiortc import MediaStreamTrack
    from av import AudioFrame

    class SpeechTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
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

    return SpeechTrack()


async def webrtc_caller(base: str, audio: np.ndarray, seconds: float) -> Called:
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription

    result = Called()
    pc = RTCPeerConnection()
    pc.createDataChannel("text")  # fastrtc expects a data channel before the offer
    mic = speech_track(audio)
    pc.addTrack(mic)
    done, heard = asyncio.Event(), asyncio.Event()

    @pc.on("track")
    def on_track(track) -> None:
        async def reader() -> None:
            try:
                while not done.is_set():
                    frame = await track.recv()
                    heard.set()
                    result.received_s += frame.samples / frame.sample_rate
            except Exception:  # the track ends with the call
                pass
        asyncio.ensure_future(reader())

    try:
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "webrtc_id": uuid.uuid4().hex}
        async with aiohttp.ClientSession() as http, http.post(f"{base}/webrtc/offer", json=offer) as resp:
            answer = await resp.json()
        if "sdp" not in answer:
            result.errors.append(str(answer)[:200])
            return result
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        # ICE and DTLS finish after this; the call lasts `seconds` from the agent's first frame, as
        # the other callers do from their first chunk (their set-up is one request).
        try:
            await asyncio.wait_for(heard.wait(), SETUP_TIMEOUT_S)
        except TimeoutError:
            result.errors.append(f"no agent audio within {SETUP_TIMEOUT_S:.0f} s of the answer")
            return result
        await asyncio.sleep(seconds)
    finally:
        done.set()
        result.sent_s = mic.sent / WEBRTC_RATE
        await pc.close()
    return result


async def ws_caller(base: str, audio: np.ndarray, seconds: float) -> Called:
    from agent.tools.wsclient import talk

    r = await talk(base.replace("http://", "ws://") + "/websocket/offer", audio[:int(seconds * SAMPLE_RATE)],
                   tail_seconds=0.0)
    return Called(r.sent_seconds, r.received_seconds, r.errors)


async def chat_caller(base: str, audio: np.ndarray, seconds: float) -> Called:
    import aiohttp
    import sphn

    result = Called()
    writer, reader = sphn.OpusStreamWriter(SAMPLE_RATE), sphn.OpusStreamReader(SAMPLE_RATE)
    frames = audio[:int(seconds * SAMPLE_RATE) // FRAME_SIZE * FRAME_SIZE].reshape(-1, FRAME_SIZE)
    async with aiohttp.ClientSession() as http, http.ws_connect(base.replace("http://", "ws://") + "/api/chat") as ws:
        first = await ws.receive_bytes()
        if first[:1] != b"\x00":
            result.errors.append(first[1:200].decode(errors="replace"))
            return result

        async def listen() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01":
                    result.received_s += reader.append_bytes(msg.data[1:]).size / SAMPLE_RATE
                elif msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x05":
                    result.errors.append(msg.data[1:200].decode(errors="replace"))

        listening = asyncio.create_task(listen())
        t0 = time.monotonic()
        for k, frame in enumerate(frames):
            page = writer.append_pcm(frame)
            if len(page):
                await ws.send_bytes(b"\x01" + page)
            result.sent_s = (k + 1) * FRAME_SECONDS
            await asyncio.sleep(max(0.0, t0 + (k + 1) * FRAME_SECONDS - time.monotonic()))
        await asyncio.sleep(0.5)
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
    return result


CALLERS = {"webrtc": webrtc_caller, "ws": ws_caller, "chat": chat_caller}


def call_many(transport: str, base: str, calls: int, seconds: float, start_every_s: float = 0.05) -> list[dict]:
    """`calls` callers of one transport at once (in this process), started `start_every_s` apart."""
    from agent.audio.espeak import telugu_speech

    audio = telugu_speech(seconds + 1.0)
    caller = CALLERS[transport]

    async def one(i: int) -> Called:
        await asyncio.sleep(i * start_every_s)
        try:
            return await caller(base, audio, seconds)
        except Exception as exc:  # noqa: BLE001 - a failed call is a figure, not a crash
            return Called(errors=[f"{type(exc).__name__}: {exc}"[:200]])

    async def everyone() -> list[Called]:
        return await asyncio.gather(*(one(i) for i in range(calls)))

    return [{"sent_s": r.sent_s, "received_s": r.received_s, "errors": r.errors} for r in asyncio.run(everyone())]
