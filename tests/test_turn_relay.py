"""WebRTC through a real TURN relay: Debian's coturn (`turnserver`) on 127.0.0.1 with a static user, and
the page in headless Chromium told (TURN_URLS, TURN_USERNAME, TURN_CREDENTIAL, TURN_POLICY=relay) to send
its media only through it. The call's audio goes both ways through coturn: the selected candidate pair's
page side is a relay candidate, and coturn's log shows the page's allocation with its user."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import ServerConfig
from browser_helpers import KEEP_PEERS_JS, launch_chromium
from conftest import LiveServer, free_port, wait_until

pytestmark = pytest.mark.browser

TURN_USER, TURN_PASSWORD, TURN_REALM = "agent", "s3cret-relay", "agent.test"
# The newest peer connection: its configured policy, the selected pair's two candidate types, and the
# audio it received (samples, seconds at its sample rate)
RELAY_STATS_JS = """async () => {
  const pc = window.__peers[window.__peers.length - 1];
  if (!pc) return null;
  const stats = new Map();
  (await pc.getStats()).forEach((r) => stats.set(r.id, r));
  let pair = null, samples = 0, rate = 48000;
  for (const r of stats.values()) {
    if (r.type === "transport" && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId);
    if (r.type === "inbound-rtp" && r.kind === "audio") samples += r.totalSamplesReceived || 0;
    if (r.type === "codec" && r.mimeType === "audio/opus") rate = r.clockRate;
  }
  const kind = (id) => (stats.get(id) || {}).candidateType || null;
  return {policy: pc.getConfiguration().iceTransportPolicy, local: pair && kind(pair.localCandidateId),
          remote: pair && kind(pair.remoteCandidateId), state: pc.connectionState, received_s: samples / rate};
}"""


@dataclass
class Coturn:
    """A running coturn on 127.0.0.1:`port` (UDP and TCP), its verbose log in `log_path`."""

    port: int
    log_path: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def allocations(self) -> list[str]:
        """Log lines of successful allocations, each naming its user."""
        return [line for line in self.log().splitlines() if "ALLOCATE processed, success" in line]


def start_coturn(workdir: Path) -> Coturn:
    """coturn with a static long-term user, listening and relaying on 127.0.0.1 only. Loopback peers
    are allowed (coturn refuses them by default) since both ends of the test's call are on this host."""
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.fail("Debian's coturn is not installed (apt-get install coturn); scripts/test installs it")
    port = free_port()
    log_path = workdir / "turnserver.log"
    process = subprocess.Popen([
        binary, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}",
        "--min-port=40000", "--max-port=60000", "--lt-cred-mech", f"--user={TURN_USER}:{TURN_PASSWORD}",
        f"--realm={TURN_REALM}", "--fingerprint", "--allow-loopback-peers", "--no-cli", "--no-tls", "--no-dtls",
        "--no-multicast-peers", f"--pidfile={workdir / 'turnserver.pid'}", f"--userdb={workdir / 'turndb'}",
        f"--log-file={log_path}", "--simple-log", "--verbose"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    coturn = Coturn(port, log_path, process)
    if not wait_until(lambda: process.poll() is not None or "UDP listener opened" in coturn.log(), 15):
        process.kill()
        pytest.fail(f"coturn did not start:\n{coturn.log()[-2000:]}")
    if process.poll() is not None:
        pytest.fail(f"coturn exited with {process.returncode}:\n{coturn.log()[-2000:]}")
    return coturn


@pytest.fixture(scope="module")
def coturn(tmp_path_factory) -> Iterator[Coturn]:
    relay = start_coturn(tmp_path_factory.mktemp("coturn"))
    yield relay
    relay.process.terminate()
    relay.process.wait(timeout=10)


@pytest.fixture(scope="module")
def relayed_server(coturn) -> Iterator[LiveServer]:
    """The app with the TURN settings an operator would set, read when the page and stream are built."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TURN_URLS", coturn.url)
        env.setenv("TURN_USERNAME", TURN_USER)
        env.setenv("TURN_CREDENTIAL", TURN_PASSWORD)
        env.setenv("TURN_POLICY", "relay")
        live = LiveServer(max_sessions=2, server_config=ServerConfig(resume_seconds=0))
    yield live
    live.close()


@pytest.mark.slow
def test_turn_relay_carries_a_page_call_both_ways(relayed_server, coturn, mic_wav):
    """The page's call goes through coturn and nowhere else: the page's selected candidate is a relay
    one (iceTransportPolicy "relay" from TURN_POLICY), coturn logs the page's allocation for the static
    user, the server hears the caller's Telugu speech (its VAD ends a user turn) and the page receives
    the agent's audio at the stream's pace."""
    from playwright.sync_api import sync_playwright

    service = relayed_server.service
    allocations_before = len(coturn.allocations())
    with sync_playwright() as p:
        browser = launch_chromium(p, mic_wav)
        try:
            page = browser.new_context(permissions=["microphone"]).new_page()
            page.add_init_script(KEEP_PEERS_JS)
            page.goto(relayed_server.url + "/", wait_until="load")
            page.get_by_text("Click to Access Microphone").click(timeout=30_000)
            page.locator("#call button", has_text="Record").first.click(timeout=30_000)
            assert wait_until(lambda: service.registry.live(), 30), "the page's call never reached the engine"
            session = service.registry.live()[0]
            stats = wait_until(lambda: (s := page.evaluate(RELAY_STATS_JS)) and s["local"] and s, 30)
            assert stats and stats["policy"] == "relay", stats
            assert stats["local"] == "relay", f"the page's media did not go through the relay: {stats}"

            # the agent's audio reaches the page at the stream's pace (after a start-up allowance)
            assert wait_until(lambda: page.evaluate(RELAY_STATS_JS)["received_s"] > 0.5, 30), stats
            first, t0 = page.evaluate(RELAY_STATS_JS)["received_s"], time.monotonic()
            page.wait_for_timeout(4000)
            received = page.evaluate(RELAY_STATS_JS)["received_s"] - first
            elapsed = time.monotonic() - t0
            assert received >= 0.8 * elapsed, f"{received:.2f} s of audio in {elapsed:.2f} s through the relay"

            # the server hears the caller: frames arrive and its VAD ends a turn of the fake microphone's
            # speech (5 s of Telugu, then 1 s of silence, looped)
            frames_in = session.seat.counters.frames_in
            assert frames_in > 20, session.seat.counters
            assert wait_until(lambda: session.latency.turns, 20), "the server's VAD heard no user turn"
            page.locator("#call button", has_text="Stop").first.click(timeout=30_000)
        finally:
            browser.close()
    log = coturn.log()
    allocations = coturn.allocations()[allocations_before:]
    assert allocations, f"coturn allocated no relay:\n{log[-3000:]}"
    assert all(f"user <{TURN_USER}>" in line for line in allocations), allocations
    # a relay that carries media gets permissions (or channels) for the peer it sends to
    assert re.search(r"(CREATE_PERMISSION|CHANNEL_BIND) processed, success", log), log[-3000:]
    print(f"turn_relay: {len(allocations)} allocation(s), page {stats['local']} -> server {stats['remote']}, "
          f"{received:.2f} s of agent audio in {elapsed:.2f} s, {session.seat.counters.frames_in} frames in, "
          f"{len(session.latency.turns)} user turn(s)")
