"""What each of the page's transports adds, in a real browser: microphone -> server and server -> speaker, ms.

    python -m agent.tools.transport_latency --seconds 20              # WebRTC and WebSocket, tiny model, CPU
    python -m agent.tools.transport_latency --transports WebSocket --json out.json

The real app is served on 127.0.0.1 and Debian's headless Chromium opens its page with a fake microphone
playing a click (a 30 ms tone burst) every second; the page's Transport choice forces WebRTC or WebSocket.
Every time is read from the machine's one wall clock (the page's `performance.timeOrigin + now()`,
the server's `time.time()`), and each onset is found where it passes:

- microphone -> server: the page's microphone track, tapped by an AudioWorklet of its own (the page sees
  the click), to the server's `Session.receive` getting the chunk with it (the engine could use it):
  capture-side encoding, the network, the server's jitter buffer and decoding.
- server -> speaker: the server's transport taking a frame from `Session.wait_output` to the page's
  audio element's stream, tapped the same way: encoding, the network, the page's jitter buffer and
  decoding, up to where the page renders it. Here `wait_output` is a steady real-time source (an 80 ms
  frame per slot, silence with a click every 2 s) instead of the model, so a busy CPU's late engine
  steps do not count as the transport's. The output device's own buffer comes after both transports
  alike and is not in the figures (a headless browser has none).

Loopback has no network delay: the figures are each transport's own buffering and coding. The probes
wrap two public methods of `agent.calls.session.Session` in this process only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent import FRAME_SECONDS, FRAME_SIZE, SAMPLE_RATE
from agent.engine.seats import OutputFrame

CHROMIUM = "/usr/bin/chromium"
CLICK_EVERY_S = 1.0
CLICK_EVERY_FRAMES = 25  # the server's: every 2 s, so a delay up to PAIR_OUT_S pairs with its own click
ONSET_LEVEL, QUIET_S = 0.05, 0.3  # an onset: above this level after this long below half of it
PAIR_IN_S, PAIR_OUT_S = 0.9, 1.8  # an onset seen later than this after its source is not that source's

# An AudioWorklet that reports onsets; hooks that tap every microphone stream the page gets and every
# stream an audio/video element plays (WebRTC's remote track, the WebSocket call's jitter buffer).
PROBE_JS = """(() => {
  const now = () => performance.timeOrigin + performance.now();
  window.__onsets = {mic: [], out: []};
  const WORKLET = `class Onset extends AudioWorkletProcessor {
    constructor(o) { super(); this.level = o.processorOptions.level; this.need = o.processorOptions.quiet * sampleRate;
                     this.quiet = 0; }
    process(inputs) {
      const ch = inputs[0] && inputs[0][0];
      if (!ch) return true;
      for (let i = 0; i < ch.length; i++) {
        const a = Math.abs(ch[i]);
        if (a > this.level) { if (this.quiet >= this.need) this.port.postMessage(0); this.quiet = 0; }
        else if (a < this.level / 2) this.quiet++;
      }
      return true;
    }
  }
  registerProcessor("onset", Onset);`;
  const Native = window.RTCPeerConnection;
  window.__peers = [];
  window.RTCPeerConnection = class extends Native {
    constructor(...args) { super(...args); window.__peers.push(this); }
  };
  const tapped = new WeakSet();
  async function tap(stream, kind) {
    if (tapped.has(stream)) return;
    if (!stream.getAudioTracks().length) {  // a WebRTC remote stream gets its track later
      stream.addEventListener("addtrack", () => tap(stream, kind), {once: true});
      return;
    }
    tapped.add(stream);
    const ctx = new AudioContext();
    await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([WORKLET], {type: "text/javascript"})));
    const node = new AudioWorkletNode(ctx, "onset", {numberOfOutputs: 0,
      processorOptions: {level: LEVEL, quiet: QUIET}});
    node.port.onmessage = () => window.__onsets[kind].push(now());
    ctx.createMediaStreamSource(stream).connect(node);
  }
  const getUserMedia = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (c) => { const s = await getUserMedia(c); tap(s, "mic"); return s; };
  const src = Object.getOwnPropertyDescriptor(HTMLMediaElement.prototype, "srcObject");
  Object.defineProperty(HTMLMediaElement.prototype, "srcObject", {
    get() { return src.get.call(this); },
    set(v) { if (v && v.getAudioTracks) tap(v, "out"); src.set.call(this, v); },
  });
})();""".replace("LEVEL", str(ONSET_LEVEL)).replace("QUIET", str(QUIET_S))


# the page's WebRTC jitter buffer (NetEq): its mean delay, ms, over the audio it played so far
NETEQ_JS = """async () => {
  for (const pc of window.__peers.filter((p) => p.connectionState === "connected")) {
    for (const r of (await pc.getStats()).values())
      if (r.type === "inbound-rtp" && r.kind === "audio" && r.jitterBufferEmittedCount)
        return [r.jitterBufferDelay, r.jitterBufferEmittedCount];
  }
  return null;
}"""
PLAYED_JS = ("() => { const s = window.__agentTransport && window.__agentTransport.stats; "
             "return s && s.playedSeconds ? [s.playedSeconds, s.bufferedMs] : null; }")


def click_wav(path: Path, seconds: float = 10.0, rate: int = 48_000) -> Path:
    """A fake microphone: a 30 ms 1 kHz burst every CLICK_EVERY_S, silence between (Chromium loops it)."""
    import soundfile as sf
    audio = np.zeros(int(seconds * rate), np.float32)
    burst = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(int(0.03 * rate)) / rate).astype(np.float32)
    for start in np.arange(0.5, seconds, CLICK_EVERY_S):
        i = int(start * rate)
        audio[i:i + burst.size] = burst
    sf.write(path, audio, rate, subtype="PCM_16")
    return path


@dataclass
class ServerProbe:
    """Onsets the server heard (`Session.receive`) and clicks it handed its transports (`wait_output`)."""

    heard: list[tuple[str, float]] = field(default_factory=list)  # (call id, when)
    spoke: list[tuple[str, float]] = field(default_factory=list)
    _quiet: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _frames: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    first_frame: dict[str, float] = field(default_factory=dict)  # call id -> its first slot
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on_input(self, call_id: str, rate: int, samples: np.ndarray) -> None:
        arrived = time.time()
        with self._lock:  # the engine's first frame would follow the call's first input
            self.first_frame.setdefault(call_id, time.monotonic() + FRAME_SECONDS)
        x = np.asarray(samples).reshape(-1)
        x = x.astype(np.float32) / 32768 if x.dtype == np.int16 else x.astype(np.float32)
        loud = np.abs(x) > ONSET_LEVEL
        with self._lock:
            quiet = self._quiet[call_id]
            if loud.any():
                first = int(np.argmax(loud))
                if quiet + first >= QUIET_S * rate:
                    self.heard.append((call_id, arrived))
                last = x.size - 1 - int(np.argmax(loud[::-1]))
                self._quiet[call_id] = int((np.abs(x[last:]) < ONSET_LEVEL / 2).sum())
            else:
                self._quiet[call_id] = quiet + x.size

    async def next_frame(self, call_id: str, timeout: float) -> OutputFrame | None:
        """The server's output as a steady real-time source, one 80 ms frame per slot from the call's
        first: silence, a click every CLICK_EVERY_FRAMES (not the model's output, whose pace on a busy
        CPU would be the engine's lateness, not the transport's)."""
        with self._lock:
            first = self.first_frame.get(call_id)
            n = self._frames[call_id]
        if first is None:  # no input yet: no output either, as from the engine
            await asyncio.sleep(timeout)
            return None
        wait = first + n * FRAME_SECONDS - time.monotonic()
        if wait > timeout:
            await asyncio.sleep(timeout)
            return None
        await asyncio.sleep(max(0.0, wait))
        with self._lock:
            self._frames[call_id] = n + 1
        pcm = np.zeros(FRAME_SIZE, np.float32)
        if n % CLICK_EVERY_FRAMES == CLICK_EVERY_FRAMES - 1:
            burst = int(0.03 * SAMPLE_RATE)
            pcm[:burst] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(burst) / SAMPLE_RATE)
            self.spoke.append((call_id, time.time()))
        now = time.monotonic()
        return OutputFrame(pcm=pcm, text="", text_token=0, input_done_at=now, produced_at=now, voiced=True)

    def install(self) -> None:
        """Wrap Session.receive and Session.wait_output (this process only: a benchmark's probe)."""
        from agent.calls.session import Session
        receive, wait_output, probe = Session.receive, Session.wait_output, self

        def probed_receive(session, rate, samples):
            probe.on_input(session.call_id, rate, samples)
            return receive(session, rate, samples)

        async def probed_wait_output(session, timeout):
            if session.closed:
                return await wait_output(session, timeout)
            return await probe.next_frame(session.call_id, timeout)

        Session.receive, Session.wait_output = probed_receive, probed_wait_output


def delays_ms(sources: list[float], seen: list[float], within: float) -> list[float]:
    """For each source time, ms until the first onset seen after it (within `within` s), if any."""
    seen = sorted(seen)
    out = []
    for s in sorted(sources):
        later = [t for t in seen if s <= t <= s + within]
        if later:
            out.append(1e3 * (later[0] - s))
    return out


def summary(values: list[float], of: int) -> dict:
    if not values:
        return {"n": 0, "of": of}
    a = np.asarray(values)
    return {"n": len(values), "of": of, "median_ms": round(statistics.median(values), 1),
            "p10_ms": round(float(np.percentile(a, 10)), 1), "p90_ms": round(float(np.percentile(a, 90)), 1)}


def clock_offset(page, tries: int = 30) -> tuple[float, float]:
    """The page's clock (`performance.timeOrigin + now()`) minus this process's `time.time()`, s, from
    the quickest of `tries` round trips, and that round trip (the offset is within half of it)."""
    best = (0.0, float("inf"))
    for _ in range(tries):
        before = time.time()
        page_now = page.evaluate("() => performance.timeOrigin + performance.now()") / 1e3
        after = time.time()
        if after - before < best[1]:
            best = (page_now - (before + after) / 2, after - before)
    return best


def distinct(times: list[float], apart_s: float = 0.1) -> list[float]:
    """Onsets seen by more than one tap (the page may hold two microphone streams) counted once."""
    out: list[float] = []
    for t in sorted(times):
        if not out or t - out[-1] > apart_s:
            out.append(t)
    return out


def measure(url: str, browser, transport: str, seconds: float, probe: ServerProbe) -> dict:
    context = browser.new_context(permissions=["microphone"], viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.add_init_script(PROBE_JS)
    page.goto(url + "/", wait_until="load")
    page.get_by_text("Click to Access Microphone").click(timeout=60_000)
    page.locator("#transport-choice").get_by_text(transport, exact=True).click()
    page.locator("#call button", has_text="Record").first.click(timeout=30_000)
    page.wait_for_function(f"() => /{transport}/.test(document.querySelector('#call-transport').innerText)",
                           timeout=60_000)
    page.wait_for_timeout(2000)  # past the call's start-up
    offset, round_trip = clock_offset(page)
    page.evaluate("() => { window.__onsets.mic = []; window.__onsets.out = []; }")
    started, played, neteq = time.time(), page.evaluate(PLAYED_JS), page.evaluate(NETEQ_JS)
    page.wait_for_timeout(seconds * 1000)
    onsets = page.evaluate("() => window.__onsets")
    ended, played_after, neteq_after = time.time(), page.evaluate(PLAYED_JS), page.evaluate(NETEQ_JS)
    context.close()
    mic = distinct([t / 1e3 - offset for t in onsets["mic"]])  # on this process's clock
    out = distinct([t / 1e3 - offset for t in onsets["out"]])
    # this page's call only (an earlier page's may still be held for its resume window)
    call = max(probe.first_frame, key=probe.first_frame.get, default=None)
    heard = [t for c, t in probe.heard if c == call and started <= t <= ended]
    spoke = [t for c, t in probe.spoke if c == call and started <= t <= ended - PAIR_OUT_S]
    return {"transport": transport, "seconds": seconds, "clock_offset_ms": round(1e3 * offset, 2),
            "clock_round_trip_ms": round(1e3 * round_trip, 2),
            # the WebSocket call's jitter buffer: how fast the page played (1.0: real time) and what it held
            "page_played_pace": round((played_after[0] - played[0]) / (ended - started), 3) if played_after else None,
            "page_buffered_ms": round(played_after[1], 1) if played_after else None,
            "page_neteq_ms": round(1e3 * (neteq_after[0] - neteq[0]) / (neteq_after[1] - neteq[1]), 1)
            if neteq and neteq_after and neteq_after[1] > neteq[1] else None,
            "mic_to_server": summary(delays_ms(mic, heard, PAIR_IN_S), len(mic)),
            "server_to_speaker": summary(delays_ms(spoke, out, PAIR_OUT_S), len(spoke))}


def serve(model: str):
    """The real app on 127.0.0.1 (a free port), as `python app.py` serves it."""
    from agent.config import EngineConfig, ModelConfig, ServerConfig
    from agent.service import build_service
    from agent.web.server import BackgroundServer, build_app, build_stream
    from agent.web.ui import build_demo

    service = build_service(ModelConfig(model=model, device="cpu" if model == "tiny" else None),
                            EngineConfig(max_sessions=2), ServerConfig(port=0))
    demo, stream = build_demo(service), build_stream(service)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return service, BackgroundServer(build_app(service, demo, stream), "127.0.0.1", port).start()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--seconds", type=float, default=20.0, help="measured time per transport")
    p.add_argument("--transports", default="WebRTC,WebSocket")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    probe = ServerProbe()
    probe.install()
    service, server = serve(args.model)
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
            mic = click_wav(Path(tmp) / "clicks.wav")
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={mic}", "--autoplay-policy=no-user-gesture-required"])
            for transport in args.transports.split(","):
                results.append(measure(server.url, browser, transport.strip(), args.seconds, probe))
            browser.close()
    finally:
        server.stop()
        service.close()
    print(f"{'transport':<10} {'microphone -> server (ms)':<44} {'server -> speaker (ms)':<44} page clock")
    for r in results:
        cells = []
        for key in ("mic_to_server", "server_to_speaker"):
            s = r[key]
            cells.append(f"median {s['median_ms']:6.1f}  p10 {s['p10_ms']:6.1f}  p90 {s['p90_ms']:6.1f}  "
                         f"({s['n']}/{s['of']})" if s["n"] else f"no onsets paired (0/{s['of']})")
        print(f"{r['transport']:<10} {cells[0]:<44} {cells[1]:<44} {r['clock_offset_ms']:+.2f} ms "
              f"(± {r['clock_round_trip_ms'] / 2:.2f})")
        if r["page_neteq_ms"] is not None:
            print(f"{'':<10} of which the page's WebRTC jitter buffer (NetEq) held {r['page_neteq_ms']:.0f} ms")
        if r["page_played_pace"] is not None:
            print(f"{'':<10} of which the page's jitter buffer held {r['page_buffered_ms']:.0f} ms at the end; the "
                  f"page played {r['page_played_pace']:.0%} of real time")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
