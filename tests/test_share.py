"""`python app.py --share` for real: a subprocess on a free port. On a machine without internet (this
one, and CI) Gradio's share server and tunnel binary cannot be reached: the page is still served
locally, guarded as the link would be, and the log says why there is no link."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
import requests
import websockets

from app_helpers import AppProcess
from call_helpers import BASIC, refused_status
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def has_internet() -> bool:
    try:
        socket.getaddrinfo("api.gradio.app", 443)
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_share_without_internet_serves_the_page_guarded_and_says_why(tmp_path):
    port = free_port()
    env = dict(os.environ, NO_TORCH_COMPILE="1", GRADIO_ANALYTICS_ENABLED="False", AGENT_AUTH="ana:s3cret",
               HF_HOME=str(tmp_path / "hf"))  # no tunnel binary cached from an earlier run
    app = AppProcess(["--share", "--model", "tiny", "--device", "cpu", "--max-sessions", "1", "--port", str(port),
                      "--drain-seconds", "1"], cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        online = has_internet()
        found = app.wait_for("Public link: https://", "No public link", timeout=240)
        assert found == ("Public link: https://" if online else "No public link"), app.output[-4000:]
        if not online:
            # the reason and what to do, in plain words, and where the page still is
            assert "needs internet" in app.output and f"http://127.0.0.1:{port}" in app.output, app.output[-3000:]
        assert "Traceback" not in app.output, app.output[-4000:]

        # the page is served; --auth guards it and the API, as the link would be
        assert requests.get(url + "/healthz", timeout=10).status_code == 200
        assert requests.get(url + "/config", timeout=10).status_code == 401
        session = requests.Session()
        assert session.post(url + "/login", data={"username": "ana", "password": "s3cret"}, timeout=10).ok
        assert session.get(url + "/config", timeout=10).status_code == 200
        assert "Telugu voice agent" in session.get(url + "/", timeout=10).text
        ws_url = f"ws://127.0.0.1:{port}/websocket/offer"
        assert refused_status(ws_url) == 401

        # --share caps each client at 2 concurrent calls: two connections held open, the third refused
        async def third_connection_status() -> int:
            async with websockets.connect(ws_url, additional_headers=BASIC), \
                    websockets.connect(ws_url, additional_headers=BASIC):
                try:
                    async with websockets.connect(ws_url, additional_headers=BASIC):
                        return 101
                except websockets.InvalidStatus as exc:
                    return exc.response.status_code

        assert asyncio.run(third_connection_status()) == 429
    finally:
        code = app.stop()
    assert code == 0, app.output[-3000:]


def test_share_on_a_space_tries_no_tunnel(monkeypatch):
    from agent.web.share import open_share_link

    monkeypatch.setenv("SPACE_ID", "someone/telugu-agent")
    outcome = open_share_link("0.0.0.0", 7860)
    assert outcome.url is None and "Hugging Face Space" in outcome.reason
