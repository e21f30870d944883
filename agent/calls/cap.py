"""The per-client limits: at most `limit` calls at once from one address, whatever the transport, and
at most `max_connections` connections open at the door (a flood of idle ones is refused there).

The one place that decides. Two gates ask it: the HTTP layer when an API connection opens (refused
with 429 before anything of the call starts; ops.access), and the hub when a call opens or a WebRTC
offer arrives (a WebRTC call's address comes from its offer; calls.hub). Each gate brings its own
count: open connections at the first, live calls and pending offers at the second. The address is
the caller's, behind a trusted proxy too (ops.forwarded).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class CallCap:
    limit: int | None = None  # calls; None or 0: no cap
    max_connections: int | None = None  # open connections (a flood of idle ones); None or 0: no limit
    # open API WebSockets by address; touched only from the event loop
    _connections: Counter[str] = field(default_factory=Counter, repr=False)

    def admits(self, client: str | None, calls_now: int) -> bool:
        """Whether `client`, which has `calls_now` calls already, may start one more."""
        return not self.limit or not client or calls_now < self.limit

    def admits_connection(self, client: str | None, open_now: int) -> bool:
        """Whether `client`, which has `open_now` connections (or pending offers) open, may open one more."""
        return not self.max_connections or not client or open_now < self.max_connections

    @property
    def refusal(self) -> str:
        """What a caller refused by the call cap is told."""
        n = self.limit or 0
        return f"At most {n} call{'s' if n > 1 else ''} from one address at once: hang up another call first."

    @property
    def flood_refusal(self) -> str:
        """What a client refused by the connection limit is told."""
        return f"At most {self.max_connections} open connections from one address: close some first."

    def connect(self, client: str) -> str | None:
        """An API WebSocket from `client` opens: the refusal it is told, or None when it is admitted
        and counted (each one is a call, so the call cap counts them too)."""
        open_now = self._connections[client]
        if not self.admits_connection(client, open_now):
            return self.flood_refusal
        if not self.admits(client, open_now):
            return self.refusal
        self._connections[client] += 1
        return None

    def disconnect(self, client: str) -> None:
        self._connections[client] -= 1
        if self._connections[client] <= 0:
            del self._connections[client]

    def connections(self, client: str) -> int:
        return self._connections[client]
