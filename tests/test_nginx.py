"""Scale-out with real parts: Debian's nginx in front of two app instances, with the shipped
deploy/nginx/nginx.conf adapted to loopback (its upstream servers, listen ports, certificate and the
process's own files; nothing of its routing is changed). nginx runs as this test's own process
with its own prefix and temp folders, on free ports.

Checked: `nginx -t` accepts the shipped config; a browser (cookie) stays on one instance while new
visitors spread over both; a WebSocket script gets the sticky cookie on its handshake; on SIGTERM an
instance drains: its live call finishes, its /readyz is 503, new calls land on the other one, and
it exits 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from agent import SAMPLE_RATE
from agent.tools.wsclient import talk
from conftest import free_port
from nginx_helpers import need_nginx, nginx_command

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"

# the test's own self-signed certificate
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


def self_signed_certificate(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(folder / "privkey.pem"), "-out", str(folder / "fullchain.pem")],
                   check=True, capture_output=True)
    return folder


def adapt(text: str, prefix: Path, upstreams: list[int] | None = None, http_port: int | None = None,
          https_port: int | None = None) -> str:
    """The shipped config for a process of our own: certificates and the files nginx writes under
    `prefix`; with ports, the upstream servers and the listen addresses on 127.0.0.1."""
    tls = self_signed_certificate(prefix / "tls")
    text = text.replace("/etc/nginx/tls/", f"{tls}/")
    temp = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    files = "".join(f"    {name}_temp_path {prefix}/{name};\n" for name in temp)
    text = text.replace("http {\n", f"http {{\n    access_log {prefix}/access.log;\n{files}", 1)
    if upstreams is not None:
        servers = iter(upstreams)
        text = re.sub(r"(?m)^(\s*)server \d+\.\d+\.\d+\.\d+:\d+",
                      lambda m: f"{m.group(1)}server 127.0.0.1:{next(servers)}", text)
        assert next(servers, None) is None, "the shipped config has fewer upstream servers than the test"
        text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
        text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    return text


def test_nginx_accepts_the_shipped_config(tmp_path):
    need_nginx()
    conf = tmp_path / "nginx.conf"
    conf.write_text(adapt(NGINX_CONF.read_text(), tmp_path))
    check = subprocess.run(nginx_command(conf, tmp_path, "-t"), capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "syntax is ok" in check.stderr and "test is successful" in check.stderr


@dataclass
class Instance:
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict:
        return requests.get(self.url + "/healthz", timeout=5).json()


def start_instance() -> Instance:
    port = free_port()
    env = dict(os.environ, NO_TORCH_COMPILE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "app.py", "--model", "tiny", "--device", "cpu", "--port", str(port),
                             "--max-sessions", "3", "--drain-seconds", "30"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Instance(port, proc)


def wait_up(url: str, proc: subprocess.Popen, verify: bool = True, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url + "/healthz", timeout=1, verify=verify).ok:
                return
        except requests.RequestException:
            pass
        assert proc.poll() is None, f"{proc.args[0]} exited"
        assert time.monotonic() < deadline, f"{url} did not come up"
        time.sleep(0.3)


@dataclass
class Cluster:
    instances: list[Instance]
    nginx: subprocess.Popen
    https: str
    prefix: Path

    @property
    def wss(self) -> str:
        return self.https.replace("https://", "wss://") + "/websocket/offer"

    def by_pid(self, pid: int) -> Instance:
        return next(i for i in self.instances if i.proc.pid == pid)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need_nginx()
    prefix = tmp_path_factory.mktemp("nginx")
    instances = [start_instance(), start_instance()]
    http_port, https_port = free_port(), free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(adapt(NGINX_CONF.read_text(), prefix, [i.port for i in instances], http_port, https_port))
    nginx = subprocess.Popen(nginx_command(conf, prefix, "-g", "daemon off;"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        for instance in instances:
            wait_up(instance.url, instance.proc)
        https = f"https://127.0.0.1:{https_port}"
        wait_up(https, nginx, verify=False, timeout=20)
        yield Cluster(instances, nginx, https, prefix)
    finally:
        nginx.terminate()
        for instance in instances:
            if instance.proc.poll() is None:
                instance.proc.kill()
            instance.proc.communicate()
        nginx_output = nginx.communicate(timeout=10)[0]
        if nginx.returncode not in (0, -signal.SIGTERM):
            print(nginx_output, (prefix / "error.log").read_text())


def insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


@pytest.mark.slow
def test_nginx_keeps_a_browser_on_one_instance_and_spreads_new_ones(cluster):
    pids = {i.proc.pid for i in cluster.instances}
    seen = set()
    for _ in range(16):  # new visitors: each gets its own sticky cookie on the first answer
        browser = requests.Session()
        first = browser.get(cluster.https + "/healthz", verify=False, timeout=5)
        assert "agent_sticky" in browser.cookies, first.headers
        served = {browser.get(cluster.https + "/healthz", verify=False, timeout=5).json()["pid"] for _ in range(5)}
        assert served == {first.json()["pid"]}, "a browser moved between instances"
        seen |= served
    assert seen == pids, f"16 visitors all landed on one instance: {seen} of {pids}"


@pytest.mark.slow
def test_nginx_gives_a_websocket_script_the_cookie_that_finds_its_call_again(cluster, telugu_speech):
    """A script's call lands anywhere; the cookie from its handshake leads back to the same instance
    (what a reconnection to resume a dropped call needs)."""
    _, audio = telugu_speech

    async def go():
        call = asyncio.create_task(talk(cluster.wss, audio[:3 * SAMPLE_RATE], tail_seconds=0.3, ssl=insecure()))
        deadline = time.monotonic() + 10
        while not any(i.health()["seats_in_use"] for i in cluster.instances):
            assert time.monotonic() < deadline, "the call reached no instance"
            await asyncio.sleep(0.1)
        holder = next(i for i in cluster.instances if i.health()["seats_in_use"])
        return await call, holder

    result, holder = asyncio.run(go())
    assert not result.errors and result.received_seconds >= result.sent_seconds - 0.6
    assert "agent_sticky" in result.cookies, "the handshake answer carried no sticky cookie"
    cookie = {"agent_sticky": result.cookies["agent_sticky"]}
    for _ in range(4):
        pid = requests.get(cluster.https + "/healthz", cookies=cookie, verify=False, timeout=5).json()["pid"]
        assert pid == holder.proc.pid


@pytest.mark.slow
def test_nginx_sigterm_drains_one_instance_while_new_calls_land_on_the_other(cluster, telugu_speech):
    _, audio = telugu_speech
    outcome: dict = {}
    call = threading.Thread(target=lambda: outcome.update(result=asyncio.run(
        talk(cluster.wss, audio[:5 * SAMPLE_RATE], tail_seconds=0.5, ssl=insecure()))))
    call.start()
    deadline = time.monotonic() + 10
    while not any(i.health()["seats_in_use"] for i in cluster.instances):
        assert time.monotonic() < deadline, "the call reached no instance"
        time.sleep(0.1)
    draining = next(i for i in cluster.instances if i.health()["seats_in_use"])
    other = next(i for i in cluster.instances if i is not draining)
    started_before = requests.get(other.url + "/metrics", timeout=5).text
    draining.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    ready = requests.get(draining.url + "/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["reason"] == "draining"

    # new calls through nginx while one instance drains: every one is served, by the other instance
    news = [asyncio.run(talk(cluster.wss, audio[:SAMPLE_RATE // 2], tail_seconds=0.2, ssl=insecure()))
            for _ in range(6)]
    assert all(not r.errors and r.received_seconds > 0.2 for r in news), [r.messages for r in news]

    def calls_started(text: str) -> float:
        return float(re.search(r"^agent_calls_started_total ([0-9.e+]+)$", text, re.M).group(1))
    after = requests.get(other.url + "/metrics", timeout=5).text
    assert calls_started(after) - calls_started(started_before) == 6, "new calls did not all land on the other instance"

    call.join(timeout=30)
    result = outcome["result"]  # whole: the instance did not go before its call was done
    assert not result.errors and result.received_seconds >= result.sent_seconds - 0.6, result.messages
    assert result.sent_seconds >= 5.4
    assert draining.proc.wait(timeout=30) == 0
    assert "drained" in draining.proc.stdout.read()
    assert requests.get(cluster.https + "/healthz", verify=False, timeout=5).json()["pid"] == other.proc.pid
