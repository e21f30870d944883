// The page's own script, run once on load: it restarts a call whose connection dropped.
// It watches the call's peer connections (fastrtc's component makes them with the page's
// RTCPeerConnection, which this wraps) and the server's messages on their data channel. A connection
// that goes "disconnected" or "failed" without the caller pressing a call button is a drop: the
// script says so in #reconnect-status and presses Record again (backoff, until the server's resume
// window has passed); the call's resume token goes with the new connection as an input, and the
// server's "call" message says whether the call was resumed. A press of Stop (a real click, which a
// script's click() is not) ends the call: its connection is forgotten and nothing reconnects.
// config: {window_ms: the server's resume window, wait_ms: how long an attempt may take to connect,
//          backoff_ms: the waits before attempts 1, 2, ...} (agent.web.ui).
(config) => {
  const WINDOW_MS = config.window_ms, BACKOFF_MS = config.backoff_ms, WAIT_MS = config.wait_ms;
  const Native = window.RTCPeerConnection;
  if (!Native || window.__callReconnects) return;
  window.__callReconnects = true;
  let current = null;   // the call's live connection
  let lostAt = null;    // when its connection dropped; null while not reconnecting
  let attempts = 0, timer = null, gaveUp = false;
  const say = (text, state) => {
    const box = document.querySelector("#reconnect-status");
    if (!box) return;
    box.textContent = text;
    box.dataset.state = state;
    box.style.display = text ? "" : "none";
  };
  const finish = (text, state) => {
    clearTimeout(timer);
    timer = null; lostAt = null; attempts = 0;
    gaveUp = state === "lost";
    say(text, state);
  };
  const recordButton = () => Array.from(document.querySelectorAll("#call button"))
    .find((b) => /Record/.test(b.textContent));
  const tryAgain = () => {
    if (lostAt === null) return;
    if (Date.now() - lostAt > WINDOW_MS) {
      current = null;  // an attempt still under way may fail later: that is no new drop
      finish("Call lost: the connection did not come back in time. Press Record to call again.", "lost");
      return;
    }
    const record = recordButton();
    if (!record) { timer = setTimeout(tryAgain, 250); return; }  // the last attempt is still starting
    attempts += 1;
    say(`Connection lost: reconnecting… (attempt ${attempts})`, "reconnecting");
    record.click();
    timer = setTimeout(tryAgain, WAIT_MS + BACKOFF_MS[Math.min(attempts, BACKOFF_MS.length - 1)]);
  };
  const dropped = (pc) => {
    if (pc !== current) return;  // hung up, or replaced already
    current = null;
    if (lostAt === null) { lostAt = Date.now(); attempts = 0; }
    say("Connection lost: reconnecting…", "reconnecting");
    clearTimeout(timer);
    timer = setTimeout(tryAgain, BACKOFF_MS[Math.min(attempts, BACKOFF_MS.length - 1)]);
  };
  const told = (data) => {
    let message;
    try { message = JSON.parse(data); } catch { return; }
    if (!message || message.type !== "call" || (lostAt === null && !gaveUp)) return;
    finish(message.resumed ? "Reconnected: the call goes on."
                           : "Reconnected, but the call had ended: this is a new call.",
           message.resumed ? "reconnected" : "new-call");
  };
  class WatchedPeerConnection extends Native {
    constructor(...args) {
      super(...args);
      current = this;
      this.addEventListener("connectionstatechange", () => {
        if (this.connectionState === "disconnected" || this.connectionState === "failed") dropped(this);
      });
    }
    createDataChannel(...args) {
      const channel = super.createDataChannel(...args);
      channel.addEventListener("message", (event) => told(event.data));
      return channel;
    }
  }
  window.RTCPeerConnection = WatchedPeerConnection;
  document.addEventListener("click", (event) => {
    if (!event.isTrusted || !event.target.closest || !event.target.closest("#call button")) return;
    if (/Stop/.test(event.target.closest("button").textContent)) current = null;  // a hang-up
    finish("", "");  // the caller acts: the last notice has been seen
  }, true);
}
