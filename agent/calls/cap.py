"""The per-client call cap: at most `limit` calls at once from one address, whatever the transport.

The one place that decides. Two gates ask it: the HTTP layer when an API WebSocket connects (refused
with 429 before anything of the call starts; ops.access), and the hub when a call opens (a WebRTC
call's address comes from its offer; calls.hub). Each gate brings its own count: open connections at
the first, live calls at the second.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class CallCap:
    limit: int | None = None  # None or 0: no cap
    # open API WebSocket connections by address; touched only from the event loop
    _connections: Counter[str] = field(default_factory=Counter, repr=False)

    def admits(self, client: str | None, calls_now: int) -> bool:
        """Whether `client`, which has `calls_now` calls already, may start one more."""
        return not self.limit or not client or calls_now < self.limit

    @property
    def refusal(self) -> str:
        """What a refused caller is told."""
        n = self.limit or 0
        return f"At most {n} call{'s' if n > 1 else ''} from one address at once: hang up another call first."

    def connect(self, client: str) -> bool:
        """An API WebSocket from `client` opens: False (and not counted) when the cap refuses it."""
        if not self.admits(client, self._connections[client]):
            return False
        self._connections[client] += 1
        return True

    def disconnect(self, client: str) -> None:
        self._connections[client] -= 1
        if self._connections[client] <= 0:
            del self._connections[client]

    def connections(self, client: str) -> int:
        return self._connections[client]
