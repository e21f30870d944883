"""What a WebRTC call's audio track costs per packet (fastrtc_compat.PacketAudioCallback), against
fastrtc's own AudioCallback on the same real aiortc/PyAV objects: the handler gets the same samples
bit for bit in one `receive()` per 80 ms frame (not one per 40 ms chunk), and the agent's audio leaves
as Opus packets aiortc sends as they are (not frames it resamples to 48 kHz stereo and encodes on an
executor thread, one hop per 20 ms packet). The figures: docs/benchmarks.md (loadtest cost)."""

from __future__ import annotations

import asyncio
import fractions

import av
import numpy as np
from aiortc import AudioStreamTrack, MediaStreamError
from aiortc.codecs.opus import OpusEncoder
from fastrtc import AsyncStreamHandler

from agent import FRAME_SIZE, SAMPLE_RATE
from agent.audio.stream import resample
from agent.transports import fastrtc_compat
from agent.transports.fastrtc_compat import EncodedAudio, PacketAudioCallback

WEBRTC_RATE, PACKET = 48_000, 960  # what aiortc's Opus decoder hands the track: 20 ms of 48 kHz stereo


def speech_like(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.02
    return (0.4 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) + noise).astype(np.float32)


class DecodedMicrophone(AudioStreamTrack):
    """The remote track of a call as aiortc's receiver fills it: 20 ms s16 stereo frames at 48 kHz
    (here at once, not at real-time pace), then the end of the track."""

    def __init__(self, packets: int):
        super().__init__()
        mono = (speech_like(packets * PACKET / WEBRTC_RATE, WEBRTC_RATE) * 32767).astype(np.int16)
        self.stereo = np.stack([mono, mono // 2], axis=1).reshape(packets, 1, 2 * PACKET)  # interleaved
        self.sent = 0

    async def recv(self) -> av.AudioFrame:
        if self.sent == len(self.stereo):
            raise MediaStreamError
        frame = av.AudioFrame.from_ndarray(self.stereo[self.sent], format="s16", layout="stereo")
        frame.sample_rate, frame.pts = WEBRTC_RATE, self.sent * PACKET
        frame.time_base = fractions.Fraction(1, WEBRTC_RATE)
        self.sent += 1
        return frame


class Recorder(AsyncStreamHandler):
    """Keeps what reaches the handler; says what its next frame lacks, as MoshiHandler does for its call."""

    def __init__(self, out: list[np.ndarray] | None = None):
        super().__init__(expected_layout="mono", output_sample_rate=SAMPLE_RATE, input_sample_rate=SAMPLE_RATE)
        self.received: list[tuple[int, np.ndarray]] = []
        self.out = list(out or [])

    def input_samples_wanted(self) -> int:
        return FRAME_SIZE - sum(s.size for _, s in self.received) % FRAME_SIZE

    async def receive(self, frame: tuple[int, np.ndarray]) -> None:
        self.received.append(frame)

    async def emit(self):
        if not self.out:
            await asyncio.sleep(3600)
        return SAMPLE_RATE, self.out.pop(0)

    def copy(self) -> Recorder:
        return Recorder()


def handed_over(track_type: type, packets: int) -> list[tuple[int, np.ndarray]]:
    async def run() -> list[tuple[int, np.ndarray]]:
        handler = Recorder()
        await track_type(DecodedMicrophone(packets), handler, context=None).process_input_frames()
        return handler.received
    return asyncio.run(run())


def test_webrtc_input_cost_one_receive_per_frame_same_samples():
    packets = 4 * 25  # 2 s
    ours, fastrtcs = handed_over(PacketAudioCallback, packets), handed_over(fastrtc_compat.AudioCallback, packets)
    assert {rate for rate, _ in ours} == {SAMPLE_RATE}
    # the same samples, bit for bit (fastrtc's own resampler to 24 kHz mono), in about a quarter of the calls
    np.testing.assert_array_equal(np.concatenate([s for _, s in ours], axis=1),
                                  np.concatenate([s for _, s in fastrtcs], axis=1))
    total = sum(s.size for _, s in ours)
    assert total >= (packets - 2) * PACKET // 2  # all but the resampler's delay
    assert len(ours) <= total // FRAME_SIZE + 1, f"{len(ours)} receive() calls for {total / FRAME_SIZE:.1f} frames"
    # each call completes a frame (the last may hold the remainder): no frame waits for the next packet
    assert all(s.size % FRAME_SIZE == 0 for _, s in ours[1:-1]) and len(fastrtcs) >= 2 * len(ours) - 1


def queued_output(frames: list[np.ndarray]) -> list:
    """What the track queues for aiortc's sender while the handler emits `frames` (80 ms, 24 kHz int16)."""
    async def run() -> list:
        track = PacketAudioCallback(DecodedMicrophone(1), Recorder(frames), context=None)
        task = asyncio.create_task(track.emit_packets())
        while track.queue.qsize() < 4 * len(frames):
            await asyncio.sleep(0.01)
        task.cancel()
        return [track.queue.get_nowait() for _ in range(track.queue.qsize())]
    return asyncio.run(run())


def test_webrtc_output_cost_preencoded_opus_packets():
    speech = (speech_like(1.0, SAMPLE_RATE, seed=1)[:12 * FRAME_SIZE] * 32767).astype(np.int16)
    queued = queued_output([f.reshape(1, -1) for f in speech.reshape(-1, FRAME_SIZE)])
    # packets, not av frames: aiortc packs them without its resampler and executor hop (rtcrtpsender)
    assert all(isinstance(p, EncodedAudio) for p in queued) and len(queued) == 4 * 12
    sender_side = OpusEncoder()  # what aiortc's sender calls for a pre-encoded item
    stamps = [sender_side.pack(p)[1] for p in queued]
    assert stamps == [960 * k for k in range(len(queued))]  # 20 ms apart on Opus's 48 kHz RTP clock
    assert [p.time for p in queued[:3]] == [0.0, 0.02, 0.04]  # fastrtc's recv paces playback by these
    # a browser's decoder (48 kHz) hears the agent's speech: back at 24 kHz, compared after Opus's delay
    decoder = av.CodecContext.create("libopus", "r")
    decoder.layout, decoder.format = "mono", "s16"
    decoded = np.concatenate([f.to_ndarray().reshape(-1) for p in queued for f in decoder.decode(av.Packet(bytes(p)))])
    heard = resample(decoded.astype(np.float32) / 32767, WEBRTC_RATE, SAMPLE_RATE) * 32767
    assert abs(heard.size - speech.size) <= 16
    lag = int(np.argmax(np.correlate(heard[:4800].astype(float), speech[:4000].astype(float), "valid")))
    n = min(heard.size - lag, speech.size)
    a, b = heard[lag:lag + n].astype(float), speech[:n].astype(float)
    snr_db = 10 * np.log10(np.sum(b ** 2) / np.sum((a - b) ** 2))
    assert lag < 480 and snr_db > 10, (lag, snr_db)


def test_webrtc_decode_cost_on_the_loop_same_frames():
    """The server's receivers decode on the event loop (InlineDecoding, installed by its peer
    connections): the frames aiortc's decoder makes, on the remote track at once, with no hand-off to
    the decoder thread, which sleeps until the receiver stops it."""
    from aiortc import RTCRtpCodecParameters
    from aiortc.codecs.opus import OpusDecoder
    from aiortc.jitterbuffer import JitterFrame
    from aiortc.rtcrtpreceiver import RemoteStreamTrack

    codec = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
    sender = OpusEncoder()
    mono = (speech_like(0.2, WEBRTC_RATE) * 32767).astype(np.int16)
    packets = []
    for k in range(10):
        chunk = mono[k * PACKET:(k + 1) * PACKET].reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = WEBRTC_RATE, k * PACKET, fractions.Fraction(1, WEBRTC_RATE)
        payloads, stamp = sender.encode(frame)
        packets += [JitterFrame(data=p, timestamp=stamp) for p in payloads]

    async def run() -> tuple[list, bool]:
        track = RemoteStreamTrack(kind="audio")
        inline = fastrtc_compat.InlineDecoding(track)
        for packet in packets:
            inline.put((codec, packet))  # as RTCRtpReceiver._handle_rtp_packet hands each one over
        frames = [track._queue.get_nowait() for _ in range(track._queue.qsize())]
        waiting = not inline.stopped.is_set()
        inline.put(None)  # the receiver stops its decoder thread
        return frames, waiting and inline.get() is None

    frames, thread_waited = asyncio.run(run())
    reference = OpusDecoder()
    expected = [f for p in packets for f in reference.decode(p)]
    assert len(frames) == len(expected) == len(packets) and thread_waited
    for got, want in zip(frames, expected):
        assert (got.sample_rate, got.layout.name, got.pts) == (want.sample_rate, want.layout.name, want.pts)
        np.testing.assert_array_equal(got.to_ndarray(), want.to_ndarray())


def test_webrtc_decode_cost_server_connections_only():
    """Installed, fastrtc's peer connections decode on the loop; aiortc's own (a client's) do not."""
    import aiortc
    from fastrtc import webrtc_connection_mixin

    fastrtc_compat.install_packet_audio()
    assert webrtc_connection_mixin.RTCPeerConnection is fastrtc_compat.InlineDecodingPeerConnection
    assert webrtc_connection_mixin.AudioCallback is PacketAudioCallback
    assert aiortc.RTCPeerConnection is not fastrtc_compat.InlineDecodingPeerConnection

    async def decoder_queues() -> tuple[object, object]:
        client, server = aiortc.RTCPeerConnection(), fastrtc_compat.InlineDecodingPeerConnection()
        client.addTrack(DecodedMicrophone(1))
        await client.setLocalDescription(await client.createOffer())
        await server.setRemoteDescription(client.localDescription)
        await server.setLocalDescription(await server.createAnswer())
        await client.setRemoteDescription(server.localDescription)
        queues = (server.getTransceivers()[0].receiver._RTCRtpReceiver__decoder_queue,
                  client.getTransceivers()[0].receiver._RTCRtpReceiver__decoder_queue)
        await client.close()
        await server.close()
        return queues
    server_queue, client_queue = asyncio.run(decoder_queues())
    assert isinstance(server_queue, fastrtc_compat.InlineDecoding)
    assert not isinstance(client_queue, fastrtc_compat.InlineDecoding)
