"""`--share`: a public `*.gradio.live` link to the very app the local server serves.

The local server starts as without `--share` (the page, every endpoint, `--auth` and the per-client
call cap in front of all of them); once it listens, Gradio's tunnel (its share server plus the `frpc`
binary Gradio downloads on first use) forwards the public link to that port, so the link exposes
nothing the local server does not guard. Without internet the tunnel cannot open: the page keeps being
served locally and the log says why there is no link. On a Hugging Face Space (`SPACE_ID` set) the
Space's own URL is the public link and no tunnel is tried.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse, urlunparse

from fastapi import FastAPI

from agent.ops.access import rtc_configuration_from_env
from agent.service import AgentService
from agent.transports.fastrtc_compat import open_tunnel, tunnel_facts
from agent.web.server import DrainingServer, listening_port, server_config

log = logging.getLogger(__name__)

WILDCARD_HOSTS = {"0.0.0.0", "::", ""}


@dataclass(frozen=True)
class ShareOutcome:
    url: str | None  # the public link, or None with the reason
    reason: str = ""


def _causes(exc: BaseException | None) -> str:
    """An exception and its distinct causes in one line ("A: B")."""
    parts: list[str] = []
    while exc is not None and len(parts) < 4:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        if text not in parts:
            parts.append(text)
        exc = exc.__cause__ or exc.__context__
    return ": ".join(parts)


def open_share_link(host: str, port: int) -> ShareOutcome:
    """Open Gradio's tunnel to host:port (which must already listen)."""
    if os.environ.get("SPACE_ID"):
        return ShareOutcome(None, "this runs on a Hugging Face Space, whose own URL is already public")
    local_host = "127.0.0.1" if host in WILDCARD_HOSTS else host
    try:
        address, custom_server = open_tunnel(local_host, port)  # GRADIO_SHARE_SERVER_ADDRESS: a self-hosted one
    except Exception as exc:  # the tunnel's failures are many (DNS, HTTP, checksum, frpc log); all mean no link
        return ShareOutcome(None, _causes(exc))
    scheme = "http" if custom_server else "https"  # Gradio's own share servers terminate TLS, as its launch() assumes
    return ShareOutcome(urlunparse((scheme, *urlparse(address)[1:])))


def announce(outcome: ShareOutcome, local_url: str) -> None:
    if outcome.url:
        log.info("Public link: %s  (expires after a week; it serves this machine while the process runs)",
                 outcome.url)
        if rtc_configuration_from_env() is None:
            log.warning("No TURN relay is set (TURN_URLS, TURN_USERNAME, TURN_CREDENTIAL): the page's WebRTC call "
                        "may not connect for people outside this network. The WebSocket endpoint goes through "
                        "the link as it is.")
        return
    tunnel = tunnel_facts()
    binary = "" if os.path.exists(tunnel.binary_path) else f", not there yet: it goes to {tunnel.binary_path}"
    log.warning("No public link: %s. --share needs internet: Gradio's share server (%s) and its tunnel binary, "
                "downloaded on first use (%s%s). The page is served locally only, at %s.",
                outcome.reason, tunnel.api_server, tunnel.binary_url, binary, local_url)


def serve_shared_link(app: FastAPI, service: AgentService, host: str, port: int) -> None:
    """Serve `app` as `server.serve` does (blocking, draining on SIGTERM) and open the public link to it
    as soon as it listens."""
    server = DrainingServer(server_config(app, host, port), service)

    def share_when_listening() -> None:
        while not server.started:  # a server that cannot bind ends the process, and this daemon thread
            if server.should_exit:
                return
            time.sleep(0.1)
        bound = listening_port(server, port)
        announce(open_share_link(host, bound), f"http://{host}:{bound}")

    threading.Thread(target=share_when_listening, name="share-link", daemon=True).start()
    server.run()
