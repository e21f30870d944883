"""Who is calling when the server sits behind proxies: the client's address from `X-Forwarded-For` or
`Forwarded` (RFC 7239), believed only when the direct peer is a trusted proxy.

The rule (nginx's `real_ip_recursive on`, uvicorn's ProxyHeadersMiddleware): each proxy appends the
peer it saw, so walk the chain from the right; the first address that is not itself a trusted proxy
is the client. A forged entry can only sit left of what a trusted proxy appended, so it is never
reached. With an untrusted peer the headers change nothing. A malformed entry ("unknown", an
obfuscated name, garbage) stops the walk at the trusted hop that wrote it. `X-Forwarded-For` is read
when present (nginx, Hugging Face, RunPod, Cloudflare set it), else `Forwarded`.
`ForwardedMiddleware` puts the answer in the ASGI scope's `client`, so every transport reads it there.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str) -> IPAddress | None:
    """One forwarded address: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:4711`, quoted or
    not; an IPv4-mapped IPv6 address is its IPv4 one. None when it is not an address."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        text, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    elif text.count(":") == 1:  # IPv4 with a port
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address.ipv4_mapped or address if isinstance(address, ipaddress.IPv6Address) else address


@dataclass(frozen=True)
class TrustedProxies:
    """The proxies whose forwarded headers are believed: addresses and networks."""

    networks: tuple[IPNetwork, ...] = ()

    @staticmethod
    def parse(text: str | Iterable[str] | None) -> TrustedProxies:
        """From `10.0.0.0/8,127.0.0.1,::1` (a string or its items; "none": no proxy is trusted);
        ValueError names a bad entry."""
        items = text.split(",") if isinstance(text, str) else list(text or ())
        if [i.strip().lower() for i in items] == ["none"]:
            return TrustedProxies()
        networks = []
        for item in (i.strip() for i in items):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"--trusted-proxies / TRUSTED_PROXIES: {item!r} is not an address or "
                                 "a network (CIDR)") from None
        return TrustedProxies(tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: IPAddress | str | None) -> bool:
        if isinstance(address, str):
            address = parse_address(address)
        return address is not None and any(address.version == n.version and address in n for n in self.networks)


def forwarded_for(header: str) -> list[str]:
    """The `for=` values of a `Forwarded` header (RFC 7239), left to right; an element without one
    gives "" (malformed, so the walk stops there)."""
    chain = []
    for element in header.split(","):
        value = ""
        for pair in element.split(";"):
            key, sep, raw = pair.partition("=")
            if sep and key.strip().lower() == "for":
                value = raw.strip()
        chain.append(value)
    return chain


def client_address(peer: str | None, headers: dict[str, str], trusted: TrustedProxies) -> str | None:
    """The client's address for a connection from `peer` with these (lower-case) headers."""
    if peer is None or not trusted.trusts(peer):
        return peer
    if "x-forwarded-for" in headers:
        chain = headers["x-forwarded-for"].split(",")
    elif "forwarded" in headers:
        chain = forwarded_for(headers["forwarded"])
    else:
        return peer
    client = str(parse_address(peer))
    for entry in reversed(chain):
        address = parse_address(entry)
        if address is None:
            return client  # malformed: the trusted hop that wrote it is the best we know
        client = str(address)
        if not trusted.trusts(address):
            return client
    return client  # every hop trusted: the left-most is the client


class ForwardedMiddleware:
    """ASGI middleware: a connection from a trusted proxy gets its client's address in `scope["client"]`
    (and `X-Forwarded-Proto`'s scheme); from anyone else, the headers are ignored. The first forwarded
    header ignored from an untrusted peer is logged, so an operator learns which address to trust."""

    def __init__(self, app, trusted: TrustedProxies):
        self.app = app
        self.trusted = trusted
        self._told = False

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            scope = self._resolve(scope)
        return await self.app(scope, receive, send)

    def _resolve(self, scope) -> dict:
        names = {b"x-forwarded-for", b"forwarded", b"x-forwarded-proto"}
        found: dict[str, list[str]] = {}
        for key, value in scope.get("headers", []):
            if key.lower() in names:
                found.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        if not found:
            return scope
        headers = {k: ",".join(v) for k, v in found.items()}
        peer, port = scope.get("client") or (None, 0)
        if not self.trusted.trusts(peer):
            if not self._told and ("x-forwarded-for" in headers or "forwarded" in headers):
                self._told = True
                log.info("forwarded headers from %s ignored (not a trusted proxy; --trusted-proxies / "
                         "TRUSTED_PROXIES names the proxies to believe)", peer)
            return scope
        client = client_address(peer, headers, self.trusted)
        scope = dict(scope, client=(client, port if client == peer else 0))
        proto = headers.get("x-forwarded-proto", "").strip().lower()  # one value, as uvicorn takes it
        if proto in ("http", "https", "ws", "wss"):
            scope["scheme"] = proto.replace("http", "ws") if scope["type"] == "websocket" else proto
        return scope
