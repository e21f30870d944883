"""A client for fastrtc's WebSocket audio protocol, as served at `/websocket/offer`.

Protocol (JSON text messages):
  client -> server  {"event": "start", "websocket_id": "<id>"}
                    {"event": "media", "media": {"payload": "<base64 μ-law, 16-bit PCM at 24 kHz>"}}
                    {"event": "ping"}   (server answers {"event": "pong"})
                    {"event": "stop"}
  server -> client  {"event": "media", "media": {"payload": "<base64 μ-law at 24 kHz>"}}
                    {"type": "call", "call_id": "<the server's id for this call>", "message": "..."}
                    {"type": "error" | "warning", "message": "..."}
                    {"status": "failed", "meta": {"error": "concurrency_limit_reached", "limit": N}}

    python -m agent.wsclient ws://127.0.0.1:7860/websocket/offer IN.wav OUT.wav

streams IN.wav at real-time pace, records the agent to OUT.wav, and reconnects with backoff if the
connection drops.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
import uuid
import warnings
from dataclasses import dataclass, field

import numpy as np
import websockets

from agent import SAMPLE_RATE
from agent.audio import to_int16

with warnings.catch_warnings():  # fastrtc's protocol is μ-law; audioop is what fastrtc itself uses
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

CHUNK_SECONDS = 0.02


def encode_media(samples: np.ndarray) -> dict:
    """float [-1, 1] samples -> a fastrtc media event (μ-law)."""
    ulaw = audioop.lin2ulaw(to_int16(samples).tobytes(), 2)
    return {"event": "media", "media": {"payload": base64.b64encode(ulaw).decode()}}


def decode_media(message: dict) -> np.ndarray:
    pcm = audioop.ulaw2lin(base64.b64decode(message["media"]["payload"]), 2)
    return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0


@dataclass
class CallResult:
    audio: np.ndarray  # everything received, 24 kHz float
    messages: list[dict] = field(default_factory=list)  # non-media messages
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, samples) per media message
    sent_seconds: float = 0.0
    started_at: float = 0.0

    @property
    def errors(self) -> list[str]:
        return [m.get("message", "") for m in self.messages if m.get("type") == "error"] + [
            m["meta"].get("error", "") for m in self.messages if m.get("status") == "failed"]

    @property
    def call_id(self) -> str | None:
        """The server's id for the call (its `start` message's websocket_id is only the client's)."""
        return next((m.get("call_id") for m in self.messages if m.get("type") == "call"), None)

    @property
    def received_seconds(self) -> float:
        return self.audio.size / SAMPLE_RATE


async def talk(url: str, audio: np.ndarray, *, realtime: bool = True, tail_seconds: float = 1.0,
               websocket_id: str | None = None, chunk_seconds: float = CHUNK_SECONDS,
               raw_messages: list[str] | None = None, stop: bool = True,
               headers: dict[str, str] | None = None) -> CallResult:
    """Stream `audio` (24 kHz float) to the agent, then `tail_seconds` of silence (as a live
    microphone would), and collect what comes back. `raw_messages` are sent verbatim first."""
    result = CallResult(np.zeros(0, np.float32))
    received: list[np.ndarray] = []
    chunk = int(SAMPLE_RATE * chunk_seconds)
    async with websockets.connect(url, max_size=1 << 22, additional_headers=headers) as ws:
        await ws.send(json.dumps({"event": "start", "websocket_id": websocket_id or uuid.uuid4().hex}))
        result.started_at = time.monotonic()

        async def reader() -> None:
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("event") == "media":
                        pcm = decode_media(msg)
                        received.append(pcm)
                        result.arrivals.append((time.monotonic(), pcm.size))
                    else:
                        result.messages.append(msg)
            except websockets.ConnectionClosed:
                pass

        read_task = asyncio.create_task(reader())
        for raw in raw_messages or []:
            await ws.send(raw)
        audio = np.concatenate([audio.astype(np.float32), np.zeros(int(tail_seconds * SAMPLE_RATE), np.float32)])
        t0 = time.monotonic()
        for i in range(0, audio.size, chunk):
            try:
                await ws.send(json.dumps(encode_media(audio[i:i + chunk])))
            except websockets.ConnectionClosed:
                break
            result.sent_seconds = (i + chunk) / SAMPLE_RATE
            if realtime:
                await asyncio.sleep(max(0.0, t0 + result.sent_seconds - time.monotonic()))
        # The last frames' answers: wait until as much came back as went out, or nothing more arrives.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            got = sum(x.size for x in received)
            quiet_for = time.monotonic() - (result.arrivals[-1][0] if result.arrivals else t0)
            if got >= audio.size or (quiet_for > 0.5 and time.monotonic() - t0 > result.sent_seconds + 0.3):
                break
            await asyncio.sleep(0.02)
        if stop:
            try:
                await ws.send(json.dumps({"event": "stop"}))
            except websockets.ConnectionClosed:
                pass
        read_task.cancel()
        await asyncio.gather(read_task, return_exceptions=True)
    result.audio = np.concatenate(received) if received else np.zeros(0, np.float32)
    return result


async def talk_with_reconnect(url: str, audio: np.ndarray, attempts: int = 5, **kwargs) -> CallResult:
    """`talk`, reconnecting with exponential backoff (0.5 s, 1 s, 2 s, ...) when the connection fails."""
    delay = 0.5
    for attempt in range(attempts):
        try:
            return await talk(url, audio, **kwargs)
        except (OSError, websockets.WebSocketException) as exc:
            if attempt == attempts - 1:
                raise
            print(f"connection failed ({exc}); retrying in {delay:.1f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


def main() -> None:
    import soundfile as sf

    from agent.audio import resample

    p = argparse.ArgumentParser(description="Talk to the agent over fastrtc's WebSocket protocol.")
    p.add_argument("url", help="ws://HOST:PORT/websocket/offer")
    p.add_argument("input", help="a WAV file to say (any rate; mixed to mono)")
    p.add_argument("output", help="where to write the agent's audio (24 kHz WAV)")
    args = p.parse_args()
    audio, rate = sf.read(args.input, dtype="float32", always_2d=True)
    audio = resample(audio.mean(axis=1), rate, SAMPLE_RATE)
    result = asyncio.run(talk_with_reconnect(args.url, audio))
    sf.write(args.output, result.audio, SAMPLE_RATE)
    for msg in result.messages:
        print(msg)
    print(f"sent {result.sent_seconds:.1f} s, received {result.received_seconds:.1f} s -> {args.output}")


if __name__ == "__main__":
    main()
