"""A client for fastrtc's WebSocket audio protocol, as served at `/websocket/offer`.

Protocol (JSON text messages):
  client -> server  {"event": "start", "websocket_id": "<id>"}
                    {"event": "media", "media": {"payload": "<base64 μ-law, 16-bit PCM at 24 kHz>"}}
                    {"event": "ping"}   (server answers {"event": "pong"})
                    {"event": "stop"}
  server -> client  {"event": "media", "media": {"payload": "<base64 μ-law at 24 kHz>"}}
                    {"type": "call", "call_id": "<the server's id>", "resume_token": "...", "resumed": bool,
                     "message": "..."}
                    {"type": "error" | "warning", "message": "..."}
                    {"status": "failed", "meta": {"error": "concurrency_limit_reached", "limit": N}}

    python -m agent.tools.wsclient ws://127.0.0.1:7860/websocket/offer IN.wav OUT.wav

streams IN.wav at real-time pace, records the agent to OUT.wav, and if the connection drops,
reconnects with backoff and resumes the same call (`?resume=<resume_token>`, the token the server
sent in its "call" message) from where its audio stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import ssl as ssl_module
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import websockets

from agent import SAMPLE_RATE
from agent.audio.stream import to_int16, ulaw_decode, ulaw_encode

log = logging.getLogger(__name__)

CHUNK_SECONDS = 0.02


def encode_media(samples: np.ndarray) -> dict:
    """float [-1, 1] samples -> a fastrtc media event (μ-law)."""
    ulaw = ulaw_encode(to_int16(samples))
    return {"event": "media", "media": {"payload": base64.b64encode(ulaw).decode()}}


def decode_media(message: dict) -> np.ndarray:
    return ulaw_decode(base64.b64decode(message["media"]["payload"])).astype(np.float32) / 32768.0


@dataclass
class CallResult:
    audio: np.ndarray  # everything received, 24 kHz float
    messages: list[dict] = field(default_factory=list)  # non-media messages
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, samples) per media message
    sent_seconds: float = 0.0
    started_at: float = 0.0
    reconnects: int = 0  # connections that dropped and were resumed (talk_with_reconnect)
    cookies: dict[str, str] = field(default_factory=dict)  # set on the handshake (a load balancer's sticky cookie)

    @property
    def errors(self) -> list[str]:
        return [m.get("message", "") for m in self.messages if m.get("type") == "error"] + [
            m["meta"].get("error", "") for m in self.messages if m.get("status") == "failed"]

    @property
    def call_id(self) -> str | None:
        """The server's id for the call (its `start` message's websocket_id is only the client's)."""
        return next((m.get("call_id") for m in self.messages if m.get("type") == "call"), None)

    @property
    def resume_token(self) -> str | None:
        """The latest token the server gave to resume this call after a dropped connection."""
        return next((m.get("resume_token") for m in reversed(self.messages) if m.get("type") == "call"), None)

    @property
    def received_seconds(self) -> float:
        return self.audio.size / SAMPLE_RATE


class ConnectionDropped(ConnectionError):
    """The connection broke while the call was going on (the caller did not hang up)."""


def with_resume(url: str, token: str | None) -> str:
    """The URL that resumes the call `token` names (fastrtc's WebSocket and /api/chat take `?resume=`)."""
    if not token:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "resume"] + [("resume", token)]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def talk(url: str, audio: np.ndarray, *, realtime: bool = True, tail_seconds: float = 1.0,
               websocket_id: str | None = None, chunk_seconds: float = CHUNK_SECONDS,
               raw_messages: list[str] | None = None, stop: bool = True,
               headers: dict[str, str] | None = None, result: CallResult | None = None,
               ssl: ssl_module.SSLContext | None = None, until: threading.Event | None = None) -> CallResult:
    """Stream `audio` (24 kHz float) to the agent, then `tail_seconds` of silence (as a live
    microphone would), and collect what comes back. `raw_messages` are sent verbatim first.
    With `until`, `audio` is streamed over and over until that event is set (a call that lasts as long
    as something else takes). With the `result` of a call whose connection dropped, resume that call
    with its token, going on from the audio it had sent; ConnectionDropped if this connection drops mid-call."""
    resuming = result is not None and result.resume_token is not None
    result = result or CallResult(np.zeros(0, np.float32))
    received: list[np.ndarray] = [result.audio] if result.audio.size else []
    chunk = int(SAMPLE_RATE * chunk_seconds)
    first = int(round(result.sent_seconds * SAMPLE_RATE))
    pieces = _microphone(audio.astype(np.float32), np.zeros(int(tail_seconds * SAMPLE_RATE), np.float32),
                         first, chunk, until)
    headers = dict(headers or {})
    if result.cookies:  # back to the server that holds the call, behind a sticky load balancer
        headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in result.cookies.items())
    async with websockets.connect(with_resume(url, result.resume_token if resuming else None), max_size=1 << 22,
                                  additional_headers=headers, ssl=ssl) as ws:
        for cookie in ws.response.headers.get_all("Set-Cookie"):
            name, _, value = cookie.split(";", 1)[0].partition("=")
            result.cookies[name.strip()] = value.strip()
        await ws.send(json.dumps({"event": "start", "websocket_id": websocket_id or uuid.uuid4().hex}))
        result.started_at = result.started_at or time.monotonic()

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
        if not resuming:
            for raw in raw_messages or []:
                await ws.send(raw)
        t0 = time.monotonic()
        sent = first
        try:
            for piece in pieces:
                try:
                    await ws.send(json.dumps(encode_media(piece)))
                except websockets.ConnectionClosedOK:
                    break  # the server ended the call
                except websockets.ConnectionClosed as exc:
                    raise ConnectionDropped(f"connection dropped after {result.sent_seconds:.1f} s: {exc}") from exc
                sent += piece.size
                result.sent_seconds = sent / SAMPLE_RATE
                if realtime:
                    await asyncio.sleep(max(0.0, t0 + (sent - first) / SAMPLE_RATE - time.monotonic()))
            # The last frames' answers: wait until as much came back as went out, or nothing more arrives.
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                got = sum(x.size for x in received)
                quiet_for = time.monotonic() - (result.arrivals[-1][0] if result.arrivals else t0)
                sent_for = (sent - first) / SAMPLE_RATE
                if got >= sent or (quiet_for > 0.5 and time.monotonic() - t0 > sent_for + 0.3):
                    break
                await asyncio.sleep(0.02)
            if stop:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(json.dumps({"event": "stop"}))
        finally:
            read_task.cancel()
            await asyncio.gather(read_task, return_exceptions=True)
            result.audio = np.concatenate(received) if received else np.zeros(0, np.float32)
    return result


def _microphone(audio: np.ndarray, tail: np.ndarray, first: int, chunk: int,
                until: threading.Event | None) -> Iterator[np.ndarray]:
    """The pieces `talk` sends, from sample `first` on: `audio` then `tail`; with `until`, `audio`
    looped until the event is set, then `tail`."""
    if until is None:
        whole = np.concatenate([audio, tail])
        for i in range(first, whole.size, chunk):
            yield whole[i:i + chunk]
        return
    i = first
    while not until.is_set() and audio.size:
        yield np.take(audio, np.arange(i, i + chunk), mode="wrap")
        i += chunk
    for j in range(0, tail.size, chunk):
        yield tail[j:j + chunk]


async def talk_with_reconnect(url: str, audio: np.ndarray, attempts: int = 5, **kwargs) -> CallResult:
    """`talk`, reconnecting with exponential backoff (0.5 s, 1 s, 2 s, ...) when the connection fails.
    A call whose connection dropped is resumed with the server's resume token (same call, same
    conversation) and goes on from where its audio stopped; if the server no longer holds it, it
    says so and a new call starts."""
    result = CallResult(np.zeros(0, np.float32))
    delay = 0.5
    for attempt in range(attempts):
        try:
            return await talk(url, audio, result=result, **kwargs)
        except (OSError, websockets.WebSocketException) as exc:  # ConnectionDropped is an OSError
            if attempt == attempts - 1:
                raise
            if result.resume_token is not None:
                result.reconnects += 1
            log.warning("connection failed (%s); reconnecting in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


def main() -> None:
    import soundfile as sf

    from agent.audio.files import read_audio

    p = argparse.ArgumentParser(description="Talk to the agent over fastrtc's WebSocket protocol.")
    p.add_argument("url", help="ws://HOST:PORT/websocket/offer")
    p.add_argument("input", help="a WAV file to say (any rate; mixed to mono)")
    p.add_argument("output", help="where to write the agent's audio (24 kHz WAV)")
    args = p.parse_args()
    audio = read_audio(args.input)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = asyncio.run(talk_with_reconnect(args.url, audio))
    sf.write(args.output, result.audio, SAMPLE_RATE)
    for msg in result.messages:
        print(msg)
    print(f"sent {result.sent_seconds:.1f} s, received {result.received_seconds:.1f} s "
          f"({result.reconnects} reconnection(s)) -> {args.output}")


if __name__ == "__main__":
    main()
