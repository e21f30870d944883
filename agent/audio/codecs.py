"""The audio codecs of `/api/chat` (agent.transports.kyutai_api), one reader and one writer each:

- `ogg`   Ogg Opus pages (sphn's OpusStreamReader/Writer): Kyutai's own clients
- `opus`  one raw Opus packet a message, as WebCodecs' AudioEncoder makes them and its AudioDecoder
          takes them (the page; PyAV's libopus here, which aiortc already brings)
- `pcm`   16-bit little-endian samples at 24 kHz mono (the page where the browser has no WebCodecs)

A reader turns one message's bytes into (sample rate, float32 samples) — possibly none yet; a writer
turns the agent's 24 kHz float32 frames into the messages to send. Undecodable input raises
`AudioFormatError`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from agent import SAMPLE_RATE
from agent.errors import AudioFormatError

CODECS = ("ogg", "opus", "pcm")
OPUS_FRAME = SAMPLE_RATE // 50  # 20 ms: WebCodecs' default Opus frame
OPUS_BITRATE = 32_000


class Reader(Protocol):
    def read(self, data: bytes) -> tuple[int, np.ndarray]: ...


class Writer(Protocol):
    def write(self, pcm: np.ndarray) -> list[bytes]: ...


class OggReader:
    def __init__(self) -> None:
        import sphn
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)

    def read(self, data: bytes) -> tuple[int, np.ndarray]:
        try:
            return SAMPLE_RATE, self._reader.append_bytes(data)
        except Exception as exc:  # sphn raises its own errors for corrupt pages
            raise AudioFormatError(f"undecodable Ogg Opus data: {exc}") from None


class OggWriter:
    def __init__(self) -> None:
        import sphn
        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)

    def write(self, pcm: np.ndarray) -> list[bytes]:
        pages = self._writer.append_pcm(pcm)
        return [bytes(pages)] if len(pages) else []


class OpusPacketReader:
    def __init__(self) -> None:
        import av
        self._av = av
        self._decoder = av.CodecContext.create("libopus", "r")
        self._decoder.layout = "mono"

    def read(self, data: bytes) -> tuple[int, np.ndarray]:
        try:
            frames = self._decoder.decode(self._av.Packet(data))
        except (self._av.error.FFmpegError, ValueError) as exc:
            raise AudioFormatError(f"undecodable Opus packet: {exc}") from None
        if not frames:
            return SAMPLE_RATE, np.zeros(0, np.float32)
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
        pcm = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)
        return frames[0].sample_rate, pcm


class OpusPacketWriter:
    def __init__(self) -> None:
        import av
        self._av = av
        self._encoder = av.CodecContext.create("libopus", "w")
        self._encoder.sample_rate, self._encoder.layout, self._encoder.format = SAMPLE_RATE, "mono", "s16"
        self._encoder.bit_rate = OPUS_BITRATE
        self._pending = np.zeros(0, np.int16)
        self._pts = 0

    def write(self, pcm: np.ndarray) -> list[bytes]:
        self._pending = np.concatenate([self._pending, to_s16(pcm)])
        packets: list[bytes] = []
        while len(self._pending) >= OPUS_FRAME:
            chunk, self._pending = self._pending[:OPUS_FRAME], self._pending[OPUS_FRAME:]
            frame = self._av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts = SAMPLE_RATE, self._pts
            self._pts += OPUS_FRAME
            packets += [bytes(p) for p in self._encoder.encode(frame)]
        return packets


class PcmReader:
    def read(self, data: bytes) -> tuple[int, np.ndarray]:
        if len(data) % 2:
            raise AudioFormatError("PCM messages are 16-bit samples: an even number of bytes")
        return SAMPLE_RATE, np.frombuffer(data, "<i2").astype(np.float32) / 32768.0


class PcmWriter:
    def write(self, pcm: np.ndarray) -> list[bytes]:
        return [to_s16(pcm).astype("<i2").tobytes()]


def to_s16(pcm: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(pcm, np.float32).reshape(-1), -1.0, 1.0) * 32767).astype(np.int16)


def codec_pair(name: str) -> tuple[Reader, Writer]:
    """The reader and writer of one connection's codec (ValueError for a name not in CODECS)."""
    if name == "ogg":
        return OggReader(), OggWriter()
    if name == "opus":
        return OpusPacketReader(), OpusPacketWriter()
    if name == "pcm":
        return PcmReader(), PcmWriter()
    raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {name!r}")
