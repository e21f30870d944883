"""Access control for shared links: credentials on the API endpoints, the per-client call cap at the door.

The page itself is guarded by Gradio's own login (same credentials). Machine endpoints
(`/websocket/offer`, `/webrtc/offer`, `/api/chat`, `/telephone/*`) take HTTP Basic auth
(`Authorization: Basic base64(user:pass)`), since they have no login page. `/api/chat` also takes
the page's login cookie, since the page calls over it and a browser cannot send Basic auth on a
WebSocket; only from the page's own site (the handshake's Origin names the host it was sent to), so
another site's script cannot borrow a logged-in visitor's cookie (Gradio's is SameSite=None).
A browser never sees why a WebSocket handshake was refused, so `/api/chat` tells a browser (a
handshake with an Origin) why in the protocol instead: Kyutai's error message, then a close.
WebRTC and TURN settings come from the environment only, never from flags that land in shell history.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from agent.calls.cap import CallCap
from agent.transports.kyutai_api import ERROR as KYUTAI_ERROR

log = logging.getLogger(__name__)

API_PREFIXES = ("/websocket/offer", "/webrtc/offer", "/api/chat", "/telephone/")
CALL_PATHS = ("/websocket/offer", "/webrtc/offer", "/api/chat")  # where a new call starts
PAGE_SOCKET = "/api/chat"  # the page's WebSocket call (assets/web/ws_call.js)
NOT_LOGGED_IN = "Not logged in (a server restart logs every page out): reload the page and log in."
# WebSocket close codes: 1008 policy violation (not logged in), 1013 try again later (a cap)
CLOSE_UNAUTHORIZED, CLOSE_TRY_LATER = 1008, 1013


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str

    @staticmethod
    def parse(text: str | None) -> Credentials | None:
        if not text:
            return None
        user, sep, password = text.partition(":")
        if not sep or not user or not password:
            raise ValueError("--auth / AGENT_AUTH must look like user:password")
        return Credentials(user, password)

    def check_header(self, header: str | None) -> bool:
        """True for `Basic base64(user:password)` with these credentials. Anything else, non-ASCII or
        undecodable included, is False (compared as UTF-8 bytes: compare_digest refuses non-ASCII str)."""
        if not header or not header.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):  # ValueError: non-ASCII characters in the base64 text
            return False
        return (hmac.compare_digest(user, self.user.encode()) & hmac.compare_digest(password, self.password.encode()))


class AccessMiddleware:
    """ASGI middleware: Basic auth on the API endpoints, and the per-client limits (calls.cap: calls,
    open connections) on their WebSocket connections, refused with 429 before anything of the call starts."""

    def __init__(self, app, credentials: Credentials | None, cap: CallCap,
                 logged_in: Callable[[Mapping[str, str]], bool] | None = None):
        self.app = app
        self.credentials = credentials
        self.cap = cap
        self.logged_in = logged_in  # the page's login, from its cookies (fastrtc_compat.gradio_login_user)
        self.flood_refused = 0

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not path.startswith(API_PREFIXES):
            return await self.app(scope, receive, send)
        # latin-1 maps every byte: a header with bytes that are not UTF-8 is refused, not a crash
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        tell = scope["type"] == "websocket" and path == PAGE_SOCKET and bool(headers.get("origin"))
        if self.credentials is not None and not self._authorized(scope, path, headers):
            if tell:
                return await tell_in_protocol(receive, send, NOT_LOGGED_IN, CLOSE_UNAUTHORIZED)
            return await refuse(scope, send, 401, "authentication required (HTTP Basic, or the page's login)")
        if scope["type"] != "websocket" or not (self.cap.limit or self.cap.max_connections):
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("?", 0))[0]  # the caller's, behind a trusted proxy (ops.forwarded)
        if (refusal := self.cap.connect(client)) is not None:
            self._refused(client, refusal)
            if tell and refusal == self.cap.refusal:  # a flood's refusals stay cheap: no accept
                return await tell_in_protocol(receive, send, refusal, CLOSE_TRY_LATER)
            return await refuse(scope, send, 429, refusal)
        try:
            return await self.app(scope, receive, send)
        finally:
            self.cap.disconnect(client)

    def _authorized(self, scope, path: str, headers: dict[str, str]) -> bool:
        """Basic auth with the credentials; on the page's socket, or the page's login from its own site."""
        if self.credentials.check_header(headers.get("authorization")):
            return True
        return (scope["type"] == "websocket" and path == PAGE_SOCKET and self.logged_in is not None
                and same_site(headers) and self.logged_in(HTTPConnection(scope).cookies))

    def _refused(self, client: str, refusal: str) -> None:
        """Log a refusal; a flood's thousands are logged as one line per 100, not one each."""
        if refusal == self.cap.refusal:
            log.warning("refused a call from %s: %d calls already live", client, self.cap.connections(client))
            return
        self.flood_refused += 1
        if self.flood_refused % 100 == 1:
            log.warning("refused a connection from %s: %d already open (%d refused so far)", client,
                        self.cap.connections(client), self.flood_refused)


class DrainGate:
    """ASGI middleware: while the server drains, a new call is refused with 503 before anything of it
    starts, so a load balancer tries another server (nginx: `proxy_next_upstream ... http_503`).
    Resuming a call that lives here (`?resume=`) still gets through; calls already live go on."""

    def __init__(self, app, draining: Callable[[], bool]):
        self.app = app
        self.draining = draining

    async def __call__(self, scope, receive, send):
        if (scope["type"] in ("http", "websocket") and scope.get("path") in CALL_PATHS and self.draining()
                and b"resume=" not in scope.get("query_string", b"")):
            return await refuse(scope, send, 503, "The server is restarting; please reconnect in a moment.")
        return await self.app(scope, receive, send)


def _hostname(netloc: str | None) -> str | None:
    return urlsplit("//" + netloc).hostname if netloc else None


def same_site(headers: Mapping[str, str]) -> bool:
    """A handshake's Origin names the host it was sent to (Host, or a proxy's X-Forwarded-Host): the
    page's own script, not another site's borrowing the visitor's cookie. Cookies do not tell ports
    apart, so neither does this. No Origin: not a browser, which has no visitor's cookie to borrow."""
    origin = headers.get("origin")
    if not origin:
        return True
    try:
        host = urlsplit(origin).hostname
    except ValueError:
        return False
    return host is not None and host in {_hostname(headers.get("host")), _hostname(headers.get("x-forwarded-host"))}


async def tell_in_protocol(receive, send, reason: str, code: int) -> None:
    """Accept an /api/chat WebSocket only to say why it is refused, in its protocol (Kyutai's error
    message), and close it with `code`: a browser sees neither the status nor the body of a refused
    handshake, so the page could only guess."""
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "bytes": KYUTAI_ERROR + reason.encode()})
    await send({"type": "websocket.close", "code": code, "reason": ""})


async def refuse(scope, send, status: int, reason: str) -> None:
    """Answer an HTTP request, or refuse a WebSocket handshake, with this status and reason."""
    headers = [(b"content-type", b"text/plain")] + ([(b"www-authenticate", b"Basic")] if status == 401 else [])
    if scope["type"] == "websocket":
        # before accept: the client sees the handshake refused with this status and body
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": reason.encode()})
        return
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": reason.encode()})


TURN_POLICIES = ("all", "relay")  # RTCPeerConnection's iceTransportPolicy


def rtc_configuration_from_env() -> dict | None:
    """ICE servers for WebRTC from TURN_URLS (comma-separated), TURN_USERNAME, TURN_CREDENTIAL, and
    TURN_POLICY: `relay` makes the page send its media only through the relay (its `iceTransportPolicy`),
    for networks where a direct path must not be tried or used; `all` (the default) lets ICE pick.
    A host behind NAT without a public UDP port needs a TURN relay for WebRTC; the WebSocket transport
    does not (docs/deploy.md, "A TURN relay")."""
    urls = [u.strip() for u in os.environ.get("TURN_URLS", "").split(",") if u.strip()]
    policy = os.environ.get("TURN_POLICY", "").strip().lower() or "all"
    if policy not in TURN_POLICIES:
        raise ValueError(f"TURN_POLICY must be one of {', '.join(TURN_POLICIES)}, not {policy!r}")
    if not urls:
        if policy == "relay":
            raise ValueError("TURN_POLICY=relay needs a relay: set TURN_URLS (and TURN_USERNAME, TURN_CREDENTIAL)")
        return None
    server = {"urls": urls}
    if os.environ.get("TURN_USERNAME"):
        server |= {"username": os.environ["TURN_USERNAME"], "credential": os.environ.get("TURN_CREDENTIAL", "")}
    return {"iceServers": [server]} | ({"iceTransportPolicy": "relay"} if policy == "relay" else {})
