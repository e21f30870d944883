// The page's second transport, run once on load: the call over one WebSocket (Kyutai's /api/chat with
// ?codec=opus|pcm, agent/transports/kyutai_api.py), for networks where WebRTC cannot connect (an HTTPS
// proxy with no UDP path and no TURN relay). The Record button of the call component starts either:
// "WebRTC" lets fastrtc's component call; "WebSocket" calls over the socket; "Auto" lets the component
// call and, when its ICE has not connected within fallback_ms, closes that peer connection and calls
// over the socket. #call-transport says which one carries the call.
//   microphone (echo cancellation, noise suppression, AGC, as the WebRTC call asks) -> AudioWorklet
//   (20 ms chunks at 24 kHz) -> Opus (WebCodecs AudioEncoder, else 16-bit PCM) -> the socket;
//   the socket -> AudioDecoder (or PCM) -> a jitter buffer in an AudioWorklet -> the speaker.
// A socket that closes without the caller hanging up (or the server ending the call) is a drop: the
// page calls again with the call's resume token, backing off, until the server's resume window passes.
// window.__agentTransport holds the state the readouts timer and the tests read.
// config: {path, fallback_ms, window_ms, backoff_ms, names} (agent.web.ui).
(config) => {
  if (window.__agentTransport) return;
  const RATE = 24000, CHUNK = 480;  // the server's rate; 20 ms, WebCodecs' Opus frame
  const T = window.__agentTransport = {
    name: "", settings: {}, callId: null, token: "", ws: null, ice: [], fellBack: false,
    stats: {sentSeconds: 0, receivedSeconds: 0, playedSeconds: 0, underruns: 0, bufferedMs: 0, codec: ""},
  };
  const mode = () => (document.querySelector("#transport-choice input:checked") || {}).value || "Auto";
  const show = (name) => {
    T.name = name;
    const box = document.querySelector("#call-transport");
    if (box) box.textContent = name ? `Transport: ${name}` : "";
    const hangUp = document.querySelector("#ws-hang-up");
    if (hangUp) hangUp.style.display = name === "WebSocket" ? "" : "none";
  };
  const say = (text, state) => {  // the same notice box reconnect.js writes for WebRTC calls
    const box = document.querySelector("#reconnect-status");
    if (!box) return;
    box.textContent = text; box.dataset.state = state; box.style.display = text ? "" : "none";
  };
  // the sidebar's settings, by the server's names (agent.transports.settings.PAGE_INPUTS), sent mid-call
  T.setSettings = (values) => {
    T.settings = Object.fromEntries(config.names.map((name, i) => [name, values[i] ?? ""]));
    if (T.ws && T.ws.readyState === WebSocket.OPEN) T.ws.send(frame(4, new TextEncoder().encode(JSON.stringify(T.settings))));
  };
  const frame = (kind, bytes) => { const out = new Uint8Array(1 + bytes.byteLength); out[0] = kind; out.set(bytes, 1); return out; };

  // -- the audio: worklets for the microphone's chunks and the jitter buffer -----------------------
  const WORKLETS = `
  class Capture extends AudioWorkletProcessor {
    constructor() { super(); this.buf = new Float32Array(${CHUNK}); this.n = 0; }
    process(inputs) {
      const ch = inputs[0] && inputs[0][0];
      if (!ch) return true;
      for (let i = 0; i < ch.length; i++) {
        this.buf[this.n++] = ch[i];
        if (this.n === ${CHUNK}) { this.port.postMessage(this.buf); this.buf = new Float32Array(${CHUNK}); this.n = 0; }
      }
      return true;
    }
  }
  class Playback extends AudioWorkletProcessor {
    // starts once START samples are queued, re-buffers after an underrun, drops the oldest beyond MAX
    constructor() {
      super(); this.queue = []; this.offset = 0; this.queued = 0; this.playing = false;
      this.played = 0; this.underruns = 0; this.ticks = 0;
      this.START = ${RATE} * 0.1; this.MAX = ${RATE} * 0.5;
      this.port.onmessage = (e) => {
        this.queue.push(e.data); this.queued += e.data.length;
        while (this.queued - this.offset > this.MAX && this.queue.length > 1) {
          this.queued -= this.queue[0].length; this.queue.shift();
        }
      };
    }
    process(inputs, outputs) {
      const out = outputs[0][0];
      if (!this.playing && this.queued - this.offset >= this.START) this.playing = true;
      let i = 0;
      while (this.playing && i < out.length) {
        if (!this.queue.length) { this.playing = false; this.underruns++; break; }
        const head = this.queue[0], take = Math.min(head.length - this.offset, out.length - i);
        out.set(head.subarray(this.offset, this.offset + take), i);
        i += take; this.offset += take; this.played += take;
        if (this.offset === head.length) { this.queue.shift(); this.queued -= head.length; this.offset = 0; }
      }
      out.fill(0, i);
      if (++this.ticks % 50 === 0) this.port.postMessage({played: this.played, underruns: this.underruns,
                                                           queued: this.queued - this.offset});
      return true;
    }
  }
  registerProcessor("agent-capture", Capture);
  registerProcessor("agent-playback", Playback);`;

  const resample = (samples, from) => {  // linear: a decoder that hands back 48 kHz
    if (from === RATE) return samples;
    const out = new Float32Array(Math.round(samples.length * RATE / from));
    for (let i = 0; i < out.length; i++) {
      const x = i * from / RATE, j = Math.floor(x), f = x - j;
      out[i] = (samples[j] || 0) * (1 - f) + (samples[Math.min(j + 1, samples.length - 1)] || 0) * f;
    }
    return out;
  };

  const opusSupported = async () => {
    if (!window.AudioEncoder || !window.AudioDecoder) return false;
    try {
      const enc = await AudioEncoder.isConfigSupported({codec: "opus", sampleRate: RATE, numberOfChannels: 1, bitrate: 32000});
      const dec = await AudioDecoder.isConfigSupported({codec: "opus", sampleRate: RATE, numberOfChannels: 1});
      return enc.supported && dec.supported;
    } catch { return false; }
  };

  // Audio in and out for one call (kept across reconnections). The agent's voice plays through a
  // MediaStreamAudioDestinationNode into an <audio> element, not straight to ctx.destination: Chromium's
  // echo canceller takes as its reference the audio Chromium renders for media streams (the path a WebRTC
  // call's remote track takes; with Chrome-wide echo cancellation, every stream the audio service plays
  // to the device), so the agent's voice is heard by the canceller of the microphone track here as it is
  // on a WebRTC call, and does not come back to the server as the caller's speech.
  async function openAudio(send) {
    const mic = await navigator.mediaDevices.getUserMedia({audio: {echoCancellation: true, noiseSuppression: true,
      autoGainControl: true, channelCount: 1}});
    const ctx = new AudioContext({sampleRate: RATE, latencyHint: "interactive"});
    await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([WORKLETS], {type: "text/javascript"})));
    const capture = new AudioWorkletNode(ctx, "agent-capture", {numberOfOutputs: 0});
    ctx.createMediaStreamSource(mic).connect(capture);
    const playback = new AudioWorkletNode(ctx, "agent-playback", {outputChannelCount: [1]});
    const sink = ctx.createMediaStreamDestination();
    playback.connect(sink);
    let audio = document.querySelector("#ws-audio");
    if (!audio) { audio = document.createElement("audio"); audio.id = "ws-audio"; audio.autoplay = true; document.body.append(audio); }
    audio.srcObject = sink.stream;
    audio.play().catch(() => {});
    playback.port.onmessage = (e) => {
      T.stats.playedSeconds = e.data.played / RATE; T.stats.underruns = e.data.underruns;
      T.stats.bufferedMs = 1000 * e.data.queued / RATE;
    };
    const codec = (await opusSupported()) ? "opus" : "pcm";
    T.stats.codec = codec;
    let encoder = null, decoder = null, sent = 0, heard = 0;
    const play = (samples, rate) => {
      const pcm = resample(samples, rate);
      T.stats.receivedSeconds += pcm.length / RATE;
      playback.port.postMessage(pcm, [pcm.buffer]);
    };
    if (codec === "opus") {
      encoder = new AudioEncoder({output: (chunk) => { const b = new Uint8Array(chunk.byteLength); chunk.copyTo(b); send(frame(1, b)); },
                                  error: (e) => console.warn("opus encoder", e)});
      encoder.configure({codec: "opus", sampleRate: RATE, numberOfChannels: 1, bitrate: 32000});
      decoder = new AudioDecoder({output: (data) => {
        const samples = new Float32Array(data.numberOfFrames);
        data.copyTo(samples, {planeIndex: 0, format: "f32-planar"});
        const rate = data.sampleRate; data.close(); play(samples, rate);
      }, error: (e) => console.warn("opus decoder", e)});
      decoder.configure({codec: "opus", sampleRate: RATE, numberOfChannels: 1});
    }
    capture.port.onmessage = (e) => {
      const chunk = e.data;
      T.stats.sentSeconds += chunk.length / RATE;
      if (encoder) {
        const data = new AudioData({format: "f32-planar", sampleRate: RATE, numberOfFrames: chunk.length,
                                    numberOfChannels: 1, timestamp: Math.round(sent * 1e6 / RATE), data: chunk});
        sent += chunk.length; encoder.encode(data); data.close();
      } else {
        const pcm = new Int16Array(chunk.length);
        for (let i = 0; i < chunk.length; i++) pcm[i] = Math.max(-1, Math.min(1, chunk[i])) * 32767;
        send(frame(1, new Uint8Array(pcm.buffer)));
      }
    };
    return {
      codec,
      hear(payload) {
        if (decoder) {
          decoder.decode(new EncodedAudioChunk({type: "key", timestamp: Math.round(heard * 1e6 / RATE), data: payload}));
          heard += CHUNK;
        } else {
          // a copy: the payload starts at byte 1 of its message, and an Int16Array must start at an even one
          const pcm = new Int16Array(payload.slice(0, payload.byteLength & ~1).buffer);
          play(Float32Array.from(pcm, (v) => v / 32768), RATE);
        }
      },
      close() {
        mic.getTracks().forEach((t) => t.stop());
        for (const c of [encoder, decoder]) if (c && c.state !== "closed") c.close();
        ctx.close();
        audio.srcObject = null;
      },
    };
  }

  // -- the call over the socket ------------------------------------------------------------------
  let call = null;  // {audio, hungUp, lostAt, attempts, timer}
  const url = (codec) => {
    const u = new URL(config.path, document.baseURI);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    for (const [k, v] of Object.entries(T.settings)) if (v !== "" && v !== null) u.searchParams.set(k, v);
    u.searchParams.set("codec", codec);
    u.searchParams.set("resumable", "1");
    if (T.token) u.searchParams.set("resume", T.token);
    return u.toString();
  };
  function connect() {
    const ws = new WebSocket(url(call.audio.codec));
    ws.binaryType = "arraybuffer";
    T.ws = ws;
    ws.onmessage = (event) => {
      const bytes = new Uint8Array(event.data), kind = bytes[0], body = bytes.subarray(1);
      if (kind === 1) call.audio.hear(body);
      else if (kind === 4) told(JSON.parse(new TextDecoder().decode(body)));
      else if (kind === 5) { call.notice = new TextDecoder().decode(body); say(call.notice, "notice"); }
    };
    ws.onclose = (event) => { if (T.ws === ws) closed(event); };
  }
  function told(message) {
    if (message.type !== "call") return;
    T.callId = message.call_id; T.token = message.resume_token;
    show("WebSocket");
    if (call.lostAt !== null) {
      say(message.resumed ? "Reconnected: the call goes on." : "Reconnected, but the call had ended: this is a new call.",
          message.resumed ? "reconnected" : "new-call");
      call.lostAt = null; call.attempts = 0;
    }
  }
  function closed(event) {
    T.ws = null;
    // the server ended the call (1000), or refused it: not logged in (1008), a cap (1013); it said why
    const ended = [1000, 1008, 1013].includes(event.code);
    if (call.hungUp || ended) { finish(); return; }
    if (T.callId === null && call.lostAt === null) {  // never connected: no call to resume
      finish();
      say("The call could not start: the server or a proxy refused the connection.", "lost");
      return;
    }
    if (call.lostAt === null) { call.lostAt = Date.now(); call.attempts = 0; }
    if (Date.now() - call.lostAt > config.window_ms) {
      finish();
      say("Call lost: the connection did not come back in time. Press Record to call again.", "lost");
      return;
    }
    say(`Connection lost: reconnecting… (attempt ${call.attempts + 1})`, "reconnecting");
    const wait = config.backoff_ms[Math.min(call.attempts, config.backoff_ms.length - 1)];
    call.attempts += 1;
    call.timer = setTimeout(() => call && !call.hungUp && connect(), wait);
  }
  function finish() {
    if (!call) return;
    clearTimeout(call.timer);
    call.audio.close();
    call = null; T.token = "";
    show("");
  }
  async function startSocketCall() {
    if (call) return;
    call = {audio: null, hungUp: false, lostAt: null, attempts: 0, timer: null, notice: ""};
    T.callId = null; T.token = "";
    show("WebSocket");
    try {
      call.audio = await openAudio((bytes) => { if (T.ws && T.ws.readyState === WebSocket.OPEN) T.ws.send(bytes); });
    } catch (exc) {
      call = null; show(""); say(`The call could not start: ${exc}`, "lost"); return;
    }
    connect();
  }
  T.hangUp = () => {
    if (!call) return;
    call.hungUp = true;
    if (T.ws) T.ws.close(1000);
    finish();
  };
  T.start = startSocketCall;

  // -- the choice: Auto tries WebRTC first ------------------------------------------------------
  const Native = window.RTCPeerConnection;
  if (Native) {
    window.RTCPeerConnection = class extends Native {
      constructor(...args) {
        super(...args);
        const pc = this;
        T.ice = []; T.callId = null;
        pc.addEventListener("iceconnectionstatechange", () => {
          T.ice.push(pc.iceConnectionState);
          if (!["connected", "completed"].includes(pc.iceConnectionState)) return;
          T.webrtcConnected = true;
          show("WebRTC");
        });
        // Only a call's first connection falls back: once WebRTC has carried the call, its new peer
        // connections are reconnect.js's (they resume the call; a socket call would be a second one).
        if (mode() !== "Auto" || T.webrtcConnected) return;
        setTimeout(() => {
          if (["connected", "completed"].includes(pc.iceConnectionState) || pc.connectionState === "closed") return;
          T.fellBack = true;
          console.info(`ICE did not connect within ${config.fallback_ms} ms: the call goes over the WebSocket`);
          pc.close();
          startSocketCall();
        }, config.fallback_ms);
      }
    };
  }
  document.addEventListener("click", (event) => {
    if (event.target.closest && event.target.closest("#ws-hang-up")) { T.hangUp(); return; }
    const button = event.target.closest && event.target.closest("#call button");
    if (!button) return;
    // a new call: the caller's own press (reconnect.js's presses are script clicks, not trusted)
    if (/Record/.test(button.textContent) && event.isTrusted) T.webrtcConnected = false;
    if (/Record/.test(button.textContent) && mode() === "WebSocket") {
      event.preventDefault(); event.stopImmediatePropagation();
      startSocketCall();
    } else if (/Stop/.test(button.textContent) && call) {
      T.hangUp();
    }
  }, true);
}
